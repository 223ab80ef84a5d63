"""The field's placement metrics of the model's own samples during training (docs/design/evaluation.md#placement-metrics):
``val/placement_acc`` (the plausibility classifier), ``val/fid`` (against the samples' positive
composites), ``val/lpips_diversity`` and, with an oracle, ``val/placement_oracle_rate`` of the same boxes.

Off until a network is given (``classifier``, ``inception_weights``, ``lpips_weights``: local files,
checked when the callback is built, so a missing one stops before training). Every
``every_n_val_epochs`` validation runs it draws ``boxes_per_image`` boxes for each of the first
validation samples of the batches the validation loop already loads on each rank (``max_eval_samples``
in total, split evenly over ranks), pastes them as copy-paste composites and updates torchmetrics
states that are summed over ranks at the end (`metrics.placement_scores.PlacementScorer`).
Composites need the validation shards on a local disk (backgrounds at full size, foregrounds).
"""
from __future__ import annotations

import math

import lightning as L
import torch

from genloc.boxes import denormalise

from .schedule import EveryNValidations

__all__ = ["PlacementMetricsCallback"]


class PlacementMetricsCallback(L.Callback):
    def __init__(self, classifier: str | None = None, inception_weights: str | None = None,
                 lpips_weights: str | None = None, every_n_val_epochs: int = 1, boxes_per_image: int = 10,
                 max_eval_samples: int = 64, temperature: float = 1.0, seed: int = 0):
        from lightning_modules.plausibility import load_classifier
        from metrics.placement_scores import placement_networks

        loaded = load_classifier(classifier) if classifier is not None else None
        self.networks = placement_networks(loaded, inception_weights, lpips_weights)
        self.enabled = any(net is not None for net in self.networks.values())
        self.schedule = EveryNValidations(every_n_val_epochs if self.enabled else 0)
        self.boxes_per_image, self.max_eval_samples = int(boxes_per_image), int(max_eval_samples)
        self.temperature, self.seed = float(temperature), int(seed)
        self._samples: dict | None = None
        self._scorer = self._generator = None
        self._seen = 0

    def _index(self, loader) -> dict:
        from datamodules.composites import index_samples

        if self._samples is None:
            dataset = loader.dataset
            self._samples = {s.key: s for s in index_samples(dataset.data_dir, dataset.split)}
        return self._samples

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        from metrics.placement_scores import PlacementScorer

        if not self.schedule.due(trainer):
            return
        loader = trainer.val_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        self._index(loader)
        device = pl_module.device
        networks = {k: None if v is None else v.to(device) for k, v in self.networks.items()}
        self._scorer = PlacementScorer(loader.dataset.kind, device=device, **networks)
        self._generator = torch.Generator(device=device).manual_seed(self.seed + trainer.global_rank)
        self._seen = 0

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._scorer is None or dataloader_idx:
            return
        quota = math.ceil(self.max_eval_samples / trainer.world_size)
        take = int(min(len(batch["key"]), quota - self._seen))
        if take <= 0:
            return
        out = pl_module.model.sample(batch["image"][:take].to(pl_module.device), list(batch["category"][:take]),
                                     n=self.boxes_per_image, temperature=self.temperature, generator=self._generator)
        for i in range(take):
            size = tuple(int(v) for v in batch["size"][i])
            self._scorer.add(self._samples[batch["key"][i]], denormalise(out.boxes_norm[i].double().cpu().numpy(), size))
        self._seen += take

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._scorer is None:
            return
        scores = self._scorer.compute()  # collective: every rank gets the sums of all ranks
        names = {"acc": "val/placement_acc", "fid": "val/fid", "lpips": "val/lpips_diversity",
                 "oracle_plausible_rate": "val/placement_oracle_rate"}
        values = {names[k]: float(v) for k, v in scores.items() if k in names}
        pl_module.log_dict(values, sync_dist=False)  # already the same on every rank
        self._scorer = self._generator = None
