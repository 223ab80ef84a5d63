"""TPR-FPR of the model's own samples on the validation set, logged during training (docs/design/evaluation.md#tpr-fpr).

Every ``every_n_val_epochs`` validation runs (sanity checks excluded) the callback draws
``num_samples`` boxes per validation sample with the model's batched sampler, on the batches the
validation loop already loads (``on_validation_batch_end``), so each DDP rank scores exactly its
own samples. The metrics hold sum states and sync at ``compute()``, so the logged numbers are those
of the whole validation set whatever the per-rank counts. When fit ends after an unscored
validation run (or with none), the validation loader is iterated once more so the final weights
are always scored. Sampling uses a generator re-seeded at every evaluation: the same weights and
the same data order give the same numbers. The ranking metrics (``val/pair_acc``, ``val/rank_auc``,
`metrics.ranking`) score the same samples' labelled boxes with the model's log-probability: no
sampling, no random numbers; their scores are gathered from all ranks before the AUC is computed.
"""
from __future__ import annotations

import math

import lightning as L
import torch
from torchmetrics import MeanMetric

from datamodules.kinds import DataKind, data_kind
from metrics.ranking import RankingMetric
from metrics.scoring import labelled_scores
from metrics.tpr_fpr import DEFAULT_NS, TPRFPR, result_curves
from genloc.sampling import check_filter_args

from .schedule import EveryNValidations

__all__ = ["TprFprCallback"]


def _loader_kind(loader) -> DataKind:
    """The data kind of a loader over a shard folder (its dataset's ``kind``); no hooks otherwise."""
    kind = getattr(getattr(loader, "dataset", None), "kind", None)
    return kind if isinstance(kind, DataKind) else data_kind(None)


def _as_list(loaders) -> list:
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


class TprFprCallback(L.Callback):
    """Logs ``val/tpr@n``, ``val/fpr@n``, ``val/tpr_shared@n``, ``val/fpr_shared@n``,
    ``val/precision@n``, ``val/pair_acc`` and ``val/rank_auc`` (the model's scores of the labelled
    boxes, `metrics.ranking`), ``val/plausible_rate`` (when the validation data's kind has a plausibility
    oracle, see ``datamodules.kinds``: the fraction of sampled boxes it accepts) and the curve image
    ``val/tpr_fpr``.

    Args:
        every_n_val_epochs: score every k-th validation run (0 disables, fit end included).
        num_samples: N boxes per validation sample; the curve uses the first n in ``ns``.
        ns: curve points (default 10, 20, ..., N).
        iou_threshold: tau of the hit test.
        max_eval_samples: score at most this many validation samples in total (split evenly over
            ranks, each rank takes its first ones); None scores all.
        temperature, top_k, top_p: sampler settings.
        seed: sampling seed (offset by the global rank so ranks draw independent boxes).
        log_curve: also log the curve image.
    """

    def __init__(self, every_n_val_epochs: int = 1, num_samples: int = 100, ns=None, iou_threshold: float = 0.5,
                 max_eval_samples: int | None = 256, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, log_curve: bool = True):
        self.every_n_val_epochs = every_n_val_epochs
        self.schedule = EveryNValidations(every_n_val_epochs)
        self.num_samples = num_samples
        self.ns = list(ns) if ns else ([n for n in DEFAULT_NS if n <= num_samples] or [num_samples])
        if max(self.ns) > num_samples:
            raise ValueError(f"ns go up to {max(self.ns)} but num_samples is {num_samples}")
        self.iou_threshold = iou_threshold
        self.max_eval_samples = max_eval_samples
        check_filter_args(temperature, top_k, top_p)
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.seed = seed
        self.log_curve = log_curve
        self._active = False
        self._scored_step = None
        self._metric = self._plausible = self._ranking = None
        self._oracles: list = []
        self._generator = None
        self._seen = 0

    # ------------------------------------------------------------------ evaluation state
    def _start(self, trainer, pl_module, loaders) -> None:
        """Fresh metrics for one evaluation of ``loaders``; the plausible rate only when their data kind
        has an oracle (the same on every rank, so the collective compute stays matched)."""
        device = pl_module.device
        self._metric = TPRFPR(ns=self.ns, iou_threshold=self.iou_threshold).to(device)
        self._ranking = RankingMetric().to(device)
        self._oracles = [_loader_kind(loader).plausible for loader in _as_list(loaders)]
        has_oracle = any(oracle is not None for oracle in self._oracles)
        self._plausible = MeanMetric().set_dtype(torch.float64).to(device) if has_oracle else None
        self._generator = torch.Generator(device=device).manual_seed(self.seed + trainer.global_rank)
        self._seen = 0

    def _rank_quota(self, trainer) -> float:
        if self.max_eval_samples is None:
            return math.inf
        return math.ceil(self.max_eval_samples / trainer.world_size)

    @torch.no_grad()
    def _score_batch(self, trainer, pl_module, batch, dataloader_idx: int = 0) -> None:
        take = int(min(len(batch["category"]), self._rank_quota(trainer) - self._seen))
        if take <= 0:
            return
        device = pl_module.device
        images = batch["image"][:take].to(device)
        categories = list(batch["category"][:take])
        out = pl_module.model.sample(images, categories, n=self.num_samples, generator=self._generator,
                                     **self.sampling)
        boxes = out.boxes_norm
        self._metric.update(boxes, [p.to(device) for p in batch["positives"][:take]],
                            [q.to(device) for q in batch["negatives"][:take]])
        self._ranking.update(*labelled_scores(pl_module.model, batch, take))
        oracle = self._oracles[dataloader_idx] if dataloader_idx < len(self._oracles) else None
        if oracle is not None:
            metas = batch.get("meta") or [{}] * take
            for i in range(take):
                verdict = oracle(metas[i], categories[i], boxes[i].double().cpu().numpy())
                self._plausible.update(torch.as_tensor(verdict, dtype=torch.float64, device=device))
        self._seen += take

    def _finish(self, trainer, pl_module, log_with_module: bool) -> dict:
        """Sync and log; collective, so every rank calls it."""
        result = self._metric.compute()
        metrics = {f"val/{k}": v.double() for k, v in result.items()
                   if k.split("@")[0] in ("tpr", "fpr", "tpr_shared", "fpr_shared", "precision")}
        if self._plausible is not None:
            rate = self._plausible.compute()
            if not torch.isnan(rate):  # NaN: no box was scored on any rank
                metrics["val/plausible_rate"] = rate
        for name, value in self._ranking.compute().items():
            if value is not None:  # None: no positive-negative pair on any rank
                metrics[f"val/{name}"] = torch.tensor(value, dtype=torch.float64, device=pl_module.device)
        metrics["val/tpr_fpr_num_samples"] = result["num_samples"].double()
        if log_with_module:
            pl_module.log_dict({k: v.float() for k, v in metrics.items()}, sync_dist=True)
        elif trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)
        if self.log_curve and trainer.is_global_zero:
            self._log_curve(trainer, {k: v.cpu() for k, v in result.items()})
        self._scored_step = trainer.global_step
        self._metric = self._plausible = self._ranking = self._generator = None
        self._oracles = []
        return metrics

    def _log_curve(self, trainer, result) -> None:
        from metrics.plots import figure_to_array, plot_curves

        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                fig = plot_curves({f"step {trainer.global_step}": result_curves(result, self.ns)},
                                  title=f"TPR-FPR (N={self.num_samples}, IoU>={self.iou_threshold})")
                experiment.add_image("val/tpr_fpr", figure_to_array(fig), global_step=trainer.global_step,
                                     dataformats="HWC")

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._active = self.schedule.due(trainer)
        if self._active:
            self._start(trainer, pl_module, trainer.val_dataloaders)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active:
            self._score_batch(trainer, pl_module, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._active:
            self._active = False
            self._finish(trainer, pl_module, log_with_module=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.every_n_val_epochs or self._scored_step == trainer.global_step:
            return
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
            loaders = trainer.datamodule.val_dataloader()
        if loaders is None:
            return
        self._start(trainer, pl_module, loaders)
        was_training = pl_module.training
        pl_module.eval()
        try:
            for idx, loader in enumerate(_as_list(loaders)):
                for batch in loader:
                    if self._seen >= self._rank_quota(trainer):
                        break
                    self._score_batch(trainer, pl_module, batch, idx)
        finally:
            pl_module.train(was_training)
        self._finish(trainer, pl_module, log_with_module=False)
