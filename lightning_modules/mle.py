"""MLE stage (PIPE pre-training, OPA fine-tuning): teacher-forced NLL of every positive box."""
from __future__ import annotations

import importlib

import lightning as L
import torch

from lightning_modules.optim import AdamWCosine
from genloc import LocationModel, LocationModelConfig
from genloc.config import ArgumentError
from genloc.likelihood import BoxBatch


def flatten_boxes(box_lists) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-sample box lists; returns (boxes [M,4], index of the owning sample [M]).
    A loader's padded collation (`datamodules.pipeline.PaddedBoxes`, ``data.padded_boxes``) flattens itself."""
    if hasattr(box_lists, "flatten"):
        return box_lists.flatten()
    counts = torch.tensor([len(b) for b in box_lists])
    owner = torch.repeat_interleave(torch.arange(len(box_lists)), counts)
    boxes = torch.cat([b.reshape(-1, 4) for b in box_lists]) if len(box_lists) else torch.zeros(0, 4)
    return boxes, owner


def smoothed_token_nll(log_dist: torch.Tensor, tokens: torch.Tensor, sigma_bins: float) -> torch.Tensor:
    """Cross-entropy of each step against a Gaussian over neighbouring bins, ``[M, 4]``.

    ``log_dist`` ``[M, 4, vocab]`` is the validity-masked log-distribution (-inf where a token is not
    allowed), ``tokens`` ``[M, 4]`` the true coordinate ids. The target puts weight
    ``exp(-(k - t)^2 / (2 sigma^2))`` on every allowed bin ``k``, renormalised. Bins are ordered, so a
    near miss is a better guess than a far one; one-hot targets (``sigma_bins == 0``, the plain NLL)
    give no such signal and the coordinate arithmetic (a box's width from its height, say) is learnt
    much more slowly. It is a training loss only: likelihoods and metrics stay the model's own.
    """
    if sigma_bins <= 0:
        return -log_dist.gather(-1, tokens[..., None]).squeeze(-1)
    bins = torch.arange(log_dist.shape[-1], device=tokens.device, dtype=log_dist.dtype)
    allowed = torch.isfinite(log_dist)
    target = torch.exp(-0.5 * ((bins - tokens[..., None].to(log_dist.dtype)) / sigma_bins) ** 2) * allowed
    target = target / target.sum(-1, keepdim=True)
    return -(target * log_dist.masked_fill(~allowed, 0.0)).sum(-1)


class LocationLightningModule(L.LightningModule):
    """Shared by the MLE and DPO modules: the model, the optimiser and the LR schedule.

    `trains_on_pairs`: batches need (chosen, rejected) boxes. `model_from_reference`: the
    architecture comes from a reference checkpoint, not from the config's model group. The
    module's import path is written into every checkpoint (`MODULE_KEY`), so a run is only ever
    resumed by the same kind of module.
    """

    trains_on_pairs = False
    model_from_reference = False

    def __init__(self, model_config: dict, optim: dict, one_pass: bool = False):
        super().__init__()
        self.optim = AdamWCosine(**optim)
        self.model = LocationModel(LocationModelConfig.from_dict(model_config))
        self.one_pass = one_pass

    def token_boxes(self, batch: dict) -> BoxBatch:
        """The batch's token boxes, checked and laid out on the host (`BoxBatch`); a subclass says which."""
        raise NotImplementedError

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Token boxes encoded and checked while the batch is still on the host: the training step then
        never waits on the device to validate them (an invalid box is still an error, raised here)."""
        batch["token_boxes"] = self.token_boxes(batch)
        return batch

    def batch_token_boxes(self, batch: dict) -> BoxBatch:
        """`token_boxes` as the hook left them; a batch that did not pass the hook (a benchmark's, a
        test's) is checked now, on a host copy."""
        boxes = batch.get("token_boxes")
        return self.token_boxes(batch) if boxes is None else boxes

    def prefix(self, batch: dict) -> torch.Tensor:
        images = self.model.encode_images(batch["image"])
        texts = self.model.encode_texts(batch["category"])
        return self.model.build_prefix(images, texts)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODULE_KEY] = module_path(type(self))

    def configure_optimizers(self):
        total = max(1, int(self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches))
        # A fused AdamW unscales fp16 gradients inside its step, after clipping would have seen them
        # scaled: with a gradient scaler (16-mixed) the unfused optimiser runs.
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        return self.optim.build(self.named_parameters(), total, allow_fused=not scaled)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip a fused optimiser's gradients here: Lightning's mixed-precision plugin refuses any fused
        optimiser, for the gradient scaler's sake, also under bf16-mixed, which has none (the gradients
        are unscaled, as in fp32). Every other case is Lightning's own clipping."""
        if not (gradient_clip_val and optimizer.defaults.get("fused")):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)


MODULE_KEY = "genloc_module"
# Spellings of a class path that earlier checkpoints recorded -> the one spelling (`module_path`).
OLD_MODULE_PATHS = {"lightning_modules.mle.MLEModule": "lightning_modules.MLEModule",
                    "lightning_modules.dpo.DPOModule": "lightning_modules.DPOModule"}


def module_path(cls: type) -> str:
    """The class path of a module, spelled as configs name it (``_target_: lightning_modules.MLEModule``)
    and as its checkpoints record it: the package's name for it where the package exports the class,
    else its full import path."""
    package = importlib.import_module(cls.__module__.split(".")[0])
    if getattr(package, cls.__qualname__, None) is cls:
        return f"{package.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def check_args(label_sigma_bins: float = 0.0) -> None:
    """MLEModule's argument check, run by the constructor and by the config before anything is built."""
    if not label_sigma_bins >= 0:
        raise ArgumentError("label_sigma_bins", label_sigma_bins, ">= 0")


class MLEModule(LocationLightningModule):
    """Maximum likelihood on positive boxes; all positives of a sample count, one box = one sequence.

    With ``label_sigma_bins > 0`` the training loss is `smoothed_token_nll` (Gaussian targets over
    neighbouring bins); ``val/loss`` is always the plain NLL. (Measured on toy scenes: a large gain
    with the absolute reading of x2/y2, none with relative extents; README, design choices.)
    ``one_pass``: the prefix and every positive of an image through GPT-2 in one call
    (`LocationModel.batch_log_probs`, same values); off: the prefix pass then the boxes' pass.
    ``compile_step``: the whole forward (image encoder, projections, decoder, loss; `grid_losses`) under
    ``torch.compile``, on the positives laid out per image in power-of-two buckets (`BoxBatch.grid`), so
    batches with other box counts reuse a few compiled graphs; the one-pass layout, same values.
    """

    def __init__(self, model_config: dict, optim: dict, label_sigma_bins: float = 0.0, one_pass: bool = False,
                 compile_step: bool = False):
        check_args(label_sigma_bins)
        super().__init__(model_config, optim, one_pass)
        self.save_hyperparameters()
        self.compile_step = compile_step
        self._compiled_losses = None

    def token_boxes(self, batch: dict) -> BoxBatch:
        boxes, owner = flatten_boxes(batch["positives"])
        return BoxBatch.build(self.model.tokenizer.encode(boxes.cpu()), owner.cpu(), len(batch["key"]),
                              self.model.cfg.num_bins)

    def box_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Mean per-token NLL over all positive boxes, the smoothed training loss (== NLL when
        ``label_sigma_bins`` is 0), token accuracy, and the number of boxes."""
        boxes = self.batch_token_boxes(batch)
        if len(boxes) == 0:
            raise ValueError(f"batch of keys {batch['key'][:4]}... has no positive box to train on")
        sigma = self.hparams.label_sigma_bins if self.training else 0.0
        if self.compile_step:
            tokens, real = boxes.to(batch["image"].device, non_blocking=True).grid()
            texts = self.model.encode_texts(batch["category"])  # outside: a host-side cache of frozen features
            return (*self.step_losses()(batch["image"], texts, tokens, real, sigma), len(boxes))
        prefix = self.prefix(batch)
        boxes = boxes.to(prefix.device, non_blocking=True)
        tokens = boxes.tokens
        # each image's prefix runs through GPT-2 once, however many positives it has
        log_probs, distribution = self.model.batch_log_probs(prefix, boxes, with_distribution=True,
                                                             one_pass=self.one_pass)
        accuracy = (distribution.argmax(-1) == tokens).float().mean()
        nll = -log_probs.mean()
        loss = smoothed_token_nll(distribution, tokens, sigma).mean() if sigma > 0 else nll
        return nll, loss, accuracy, len(boxes)

    def grid_losses(self, images: torch.Tensor, texts: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor,
                    sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`box_nll`'s NLL, training loss and token accuracy from the bucketed boxes (`BoxBatch.grid`:
        ``tokens`` ``[B, K, 4]``, ``real`` ``[B, K]``), averaged over the real boxes: the whole forward in
        one function of tensors, which ``compile_step`` compiles."""
        prefix = self.model.build_prefix(self.model.encode_images(images), texts)
        log_probs, distribution = self.model.grid_log_probs(prefix, tokens, with_distribution=True)
        real = real[..., None].expand(tokens.shape)
        count = real.sum()

        def mean(values: torch.Tensor) -> torch.Tensor:
            return torch.where(real, values, 0.0).sum() / count

        nll = -mean(log_probs)
        accuracy = mean((distribution.argmax(-1) == tokens).float())
        loss = mean(smoothed_token_nll(distribution, tokens, sigma)) if sigma > 0 else nll
        return nll, loss, accuracy

    def step_losses(self):
        """`grid_losses`, compiled on first use (``torch.compile``: one graph per bucket shape, mode and sigma)."""
        if self._compiled_losses is None:
            self._compiled_losses = torch.compile(self.grid_losses)
        return self._compiled_losses

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        nll, loss, accuracy, n_boxes = self.box_nll(batch)
        batch_size = len(batch["key"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/nll", nll, batch_size=batch_size)
        self.log("train/token_acc", accuracy, batch_size=batch_size)
        # a host tensor: Lightning would copy a Python number to the device, waiting for it, every step
        self.log("train/boxes_per_batch", torch.tensor(float(n_boxes)), batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keep = [i for i, p in enumerate(batch["positives"]) if len(p)]
        if not keep:
            return
        nll, _, accuracy, n_boxes = self.box_nll(_select(batch, keep))
        self.log("val/loss", nll, prog_bar=True, sync_dist=True, batch_size=n_boxes)
        self.log("val/token_acc", accuracy, sync_dist=True, batch_size=n_boxes)


def _select(batch: dict, index: list[int]) -> dict:
    """The sub-batch of the given sample indices (tensors, lists and per-sample lists alike)."""
    if len(index) == len(batch["key"]):
        return batch
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim > 0 and len(value) == len(batch["key"]):
            out[key] = value[torch.tensor(index, device=value.device)]
        elif not torch.is_tensor(value) and hasattr(value, "select"):  # BoxBatch, PaddedBoxes
            out[key] = value.select(index)
        elif isinstance(value, (list, tuple)) and len(value) == len(batch["key"]):
            out[key] = [value[i] for i in index]
        else:
            out[key] = value
    return out
