"""DPO stage: preference optimisation of the location model on (chosen, rejected) box pairs
against a frozen reference (the MLE model it starts from).

Design (see docs/ARCHITECTURE.md for the batch and checkpoint contracts):
- The reference checkpoint defines the architecture (`model_config`) and initialises the policy.
  The reference itself is a frozen copy held *outside* the module's registered children, so it is
  never in the optimiser, never wrapped by DDP and never written to DPO checkpoints; on resume it
  is rebuilt from `reference` (the path is in the hyper-parameters) and the policy weights come
  from the DPO checkpoint.
- Per model, the (image, class) prefix runs through the decoder once for the chosen and the rejected
  box (`pair_box_log_probs`): its KV cache shared by both, or with ``one_pass`` the prefix and both
  boxes in one decoder call. The token boxes are checked on the host before the batch moves.
  Frozen encoder features are computed once (by the policy) and fed to both models'
  `build_prefix`; a tower the config leaves trainable is run separately for the reference.
- `precompute_reference`: reference log-probs are memoised per (sample key, category, image
  content, box tokens), so each one is computed once per dataset even though pairs are re-drawn
  every epoch; the image fingerprint keeps a flipped sample apart from the unflipped one.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from genloc.checkpoint import model_state_dict, read_checkpoint
from lightning_modules.dpo_loss import check_dpo_args, dpo_loss
from lightning_modules.mle import LocationLightningModule
from genloc import LocationModel
from genloc.config import ArgumentError
from genloc.likelihood import BoxBatch

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


class FrozenReference(nn.Module):
    """A LocationModel that stays in eval mode with no trainable parameter, whatever is asked of it."""

    def __init__(self, model: LocationModel):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenReference":
        return super().train(False)


def check_args(beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0, sft_weight: float = 0.0) -> None:
    """DPOModule's argument check, run by the constructor and by the config before anything is built."""
    check_dpo_args(beta, loss_type, label_smoothing)
    if not sft_weight >= 0:
        raise ArgumentError("sft_weight", sft_weight, ">= 0")


class DPOModule(LocationLightningModule):
    """DPO on `chosen`/`rejected` boxes of pair batches; `reference` is an MLE checkpoint path.

    `disable_dropout` (default) switches the policy's dropout off, as the reference runs in eval
    mode: otherwise policy == reference would not give zero rewards and the log-ratios are noisy.
    `model_config` is taken from the reference checkpoint; it is an argument only so that the
    saved hyper-parameters round-trip, and must match the reference when given. ``one_pass``: as in
    `MLEModule` (the same values, one decoder call per model).
    """

    trains_on_pairs = True
    model_from_reference = True

    def __init__(self, optim: dict, beta: float, reference: str, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, precompute_reference: bool = False,
                 disable_dropout: bool = True, model_config: Optional[dict] = None, sft_weight: float = 0.0,
                 one_pass: bool = False):
        check_args(beta, loss_type, label_smoothing, sft_weight)
        ckpt = read_checkpoint(reference)
        ref_config = dict(ckpt["hyper_parameters"]["model_config"])
        if model_config is not None and dict(model_config) != ref_config:
            raise ValueError(f"DPOModule: model_config differs from the reference checkpoint {reference}'s; "
                             "the policy must have the reference's architecture")
        model_config = ref_config
        super().__init__(model_config, optim, one_pass)
        self.save_hyperparameters()
        self.model.load_state_dict(model_state_dict(ckpt))
        del ckpt
        # Plain attribute, not a registered child: no state_dict entry, no optimiser, no DDP.
        self.__dict__["reference"] = FrozenReference(copy.deepcopy(self.model))
        if disable_dropout:
            for module in self.model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        self._ref_cache: dict[tuple, float] = {}
        cfg = self.model.cfg
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("_fingerprint_weights", torch.randint(1, 2**20, (3 * cfg.image_size ** 2,),
                                                                   generator=gen), persistent=False)

    # ------------------------------------------------------------------ reference placement
    def _reference(self) -> LocationModel:
        """The frozen reference, on the policy's device and dtype (it is not moved with the module)."""
        param = self.model.image_proj.weight
        ref_param = self.reference.model.image_proj.weight
        if ref_param.device != param.device or ref_param.dtype != param.dtype:
            self.reference.to(device=param.device, dtype=param.dtype)
        return self.reference.model

    def on_fit_start(self) -> None:
        self._reference()

    # ------------------------------------------------------------------ scoring
    def token_boxes(self, batch: dict) -> BoxBatch:
        self._check_pairs(batch)
        tokenizer = self.model.tokenizer
        return pair_boxes(tokenizer.encode(batch["chosen"].cpu()), tokenizer.encode(batch["rejected"].cpu()),
                          self.model.cfg.num_bins)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return super().on_before_batch_transfer(batch, dataloader_idx) if _has_pairs(batch) else batch

    def pair_log_probs(self, batch: dict) -> dict[str, Tensor]:
        """Summed box log-probs of chosen and rejected under policy and reference, each `[B]`."""
        policy, ref = self.model, self._reference()
        cfg = policy.cfg
        images, categories = batch["image"], batch["category"]
        boxes = self.batch_token_boxes(batch)
        img = policy.encode_images(images)
        txt = policy.encode_texts(categories)
        prefix = policy.build_prefix(img, txt)
        boxes = boxes.to(prefix.device, non_blocking=True)
        logps = pair_box_log_probs(policy, prefix, boxes, self.one_pass)
        out = {"policy_chosen": logps[:, 0], "policy_rejected": logps[:, 1]}

        def reference(rows: Optional[Tensor], pairs: BoxBatch) -> Tensor:
            """The reference's `[len(rows), 2]` log-probs of the pairs of ``rows`` (None: every row)."""
            with torch.no_grad():
                if cfg.freeze_image_encoder:
                    ref_img = img if rows is None else img[rows]
                else:
                    ref_img = ref.encode_images(images if rows is None else images[rows.to(images.device)])
                if cfg.freeze_text_encoder:
                    ref_txt = txt if rows is None else txt[rows]
                else:
                    ref_txt = ref.encode_texts(categories if rows is None else [categories[i] for i in rows.tolist()])
                return pair_box_log_probs(ref, ref.build_prefix(ref_img, ref_txt), pairs, self.one_pass)

        if not self.hparams.precompute_reference:  # every row: no host-side bookkeeping, no sync
            ref_logps = reference(None, boxes).to(logps.dtype)
        else:  # the memo is keyed on host values: this path reads the batch back (by design)
            chosen, rejected = boxes.tokens[0::2], boxes.tokens[1::2]
            cache_keys = self._cache_keys(batch, images, chosen, rejected)
            todo = torch.tensor([kc not in self._ref_cache or kr not in self._ref_cache
                                 for kc, kr in zip(*cache_keys)], dtype=torch.bool, device=prefix.device)
            ref_logps = torch.zeros(len(chosen), 2, device=prefix.device)
            rows = todo.nonzero().squeeze(-1)
            if len(rows):
                pairs = pair_boxes(chosen[rows].cpu(), rejected[rows].cpu(), cfg.num_bins).to(prefix.device)
                ref_logps[rows] = reference(rows, pairs).to(ref_logps.dtype)
            self._memoise(cache_keys, ref_logps, todo)
        out["ref_chosen"], out["ref_rejected"] = ref_logps[:, 0], ref_logps[:, 1]
        return out

    def _cache_keys(self, batch: dict, images: Tensor, chosen: Tensor, rejected: Tensor) -> tuple[list, list]:
        """Per-row memo keys of the chosen and the rejected box (exact integer image fingerprint)."""
        bits = images.detach().float().reshape(len(images), -1).contiguous().view(torch.int32).long() & 0xFFFFFFFF
        weights = self._fingerprint_weights.to(bits.device)
        if bits.shape[1] != weights.numel():
            weights = weights.repeat(bits.shape[1] // weights.numel() + 1)[:bits.shape[1]]
        # 16-bit halves times 20-bit weights: integer sums that cannot overflow, so exact on any device
        low = ((bits & 0xFFFF) * weights).sum(-1).tolist()
        high = ((bits >> 16) * weights).sum(-1).tolist()
        rows = zip(batch["key"], batch["category"], zip(low, high), chosen.tolist(), rejected.tolist())
        keys = [((k, c, p, tuple(ch)), (k, c, p, tuple(rj))) for k, c, p, ch, rj in rows]
        return [k[0] for k in keys], [k[1] for k in keys]

    def _memoise(self, cache_keys: tuple[list, list], ref_logps: Tensor, todo: Tensor) -> None:
        """Store freshly computed reference log-probs (`[B, 2]`); fill the other rows from the memo."""
        computed, fresh = ref_logps.tolist(), todo.tolist()
        for i, (kc, kr) in enumerate(zip(*cache_keys)):
            if fresh[i]:
                self._ref_cache[kc], self._ref_cache[kr] = computed[i]
            else:
                computed[i] = [self._ref_cache[kc], self._ref_cache[kr]]
        ref_logps.copy_(torch.tensor(computed, dtype=ref_logps.dtype))

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _check_pairs(batch: dict) -> None:
        for name in ("chosen", "rejected"):
            if name not in batch:
                raise KeyError(f"DPO batches need '{name}' boxes; build the datamodule with pairs=True")

    def dpo_metrics(self, batch: dict) -> dict[str, Tensor]:
        """Loss (mean over pairs) and the per-pair statistics named in `METRICS`, each a scalar."""
        self._check_pairs(batch)
        lp = self.pair_log_probs(batch)
        losses, chosen_r, rejected_r = dpo_loss(lp["policy_chosen"], lp["policy_rejected"], lp["ref_chosen"],
                                                lp["ref_rejected"], self.hparams.beta, self.hparams.loss_type,
                                                self.hparams.label_smoothing)
        # Optional NLL of the chosen box (per token), as in RPO: DPO alone may lower the chosen
        # likelihood too while it pushes the rejected one down; 0 = the paper's plain DPO.
        sft = -lp["policy_chosen"].mean() / 4
        return {
            "loss": losses.mean() + self.hparams.sft_weight * sft,
            "rewards/chosen": chosen_r.mean(),
            "rewards/rejected": rejected_r.mean(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
            "rewards/margins": (chosen_r - rejected_r).mean(),
            "logps/chosen": lp["policy_chosen"].detach().mean(),
            "logps/rejected": lp["policy_rejected"].detach().mean(),
        }

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        stats = self.dpo_metrics(batch)
        size = len(batch["key"])
        # one all-reduce for all statistics: pair-weighted means over every rank's batch
        # new_full fills on the device (new_tensor would copy a host number there and wait for it)
        local = torch.stack([stats[m].detach().float() * size for m in METRICS]
                            + [stats["loss"].detach().float().new_full((), size)])
        total = self.trainer.strategy.reduce(local, reduce_op="sum") if self.trainer.world_size > 1 else local
        for i, name in enumerate(METRICS):
            self.log("train/loss" if name == "loss" else name, total[i] / total[-1],
                     prog_bar=name in ("loss", "rewards/accuracies"), batch_size=size)
        return stats["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        stats = self.dpo_metrics(batch)
        for name in METRICS:
            self.log(f"val/{name}", stats[name], prog_bar=name == "loss", sync_dist=True, batch_size=len(batch["key"]))


def _has_pairs(batch: dict) -> bool:
    return "chosen" in batch and "rejected" in batch


def pair_boxes(chosen: Tensor, rejected: Tensor, num_bins: int) -> BoxBatch:
    """The chosen and rejected token boxes `[B, 4]` (CPU) of each image as one checked `BoxBatch`:
    rows chosen 0, rejected 0, chosen 1, ..."""
    if chosen.shape != rejected.shape or chosen.ndim != 2:
        raise ValueError(f"chosen and rejected must both be [B, 4], got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    tokens = torch.stack([chosen, rejected], dim=1).reshape(-1, 4)
    return BoxBatch.build(tokens, torch.arange(len(chosen)).repeat_interleave(2), len(chosen), num_bins)


def pair_box_log_probs(model: LocationModel, prefix: Tensor, pairs: BoxBatch, one_pass: bool = False) -> Tensor:
    """Summed log-probs `[B, 2]` of each prefix's chosen and rejected token box (`pair_boxes`).

    Same distribution as `LocationModel.box_log_probs` (validity masks included); the prefix goes
    through the decoder once for both boxes (`LocationModel.batch_log_probs`: its KV cache shared, or
    with ``one_pass`` prefix and both boxes in one call), so a pair costs about one prefix pass.
    """
    return model.batch_log_probs(prefix, pairs, one_pass=one_pass).sum(-1).view(pairs.images, 2)
