"""The location model's likelihood paths (pure PyTorch): teacher-forced log-probabilities of given
token boxes, for training (`box_log_probs`, `box_log_probs_shared`) and for scoring (`score_tokens`).

All of them apply the constraint masks of `genloc.masks`, so a likelihood is that of the distribution
the sampler draws from.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .masks import ExtentMask


class Likelihood:
    """`LocationModel`'s likelihood methods (a mixin over the network's decoder primitives)."""

    def box_log_probs(self, prefix: Tensor, tokens: Tensor, with_distribution: bool = False):
        """Per-token log-probs ``[B, 4]`` of box ``tokens`` ``[B, 4]`` under the validity-masked model.

        With ``with_distribution`` also returns the masked log-distribution ``[B, 4, vocab]`` of every
        step (teacher-forced), e.g. for token accuracy. Raises ValueError for token boxes the masks
        exclude (their probability is 0); boxes from ``tokenizer.encode`` are always allowed.
        """
        if tokens.ndim != 2 or tokens.shape[1] != 4 or tokens.shape[0] != prefix.shape[0]:
            raise ValueError(f"tokens must be [B, 4] with B = {prefix.shape[0]}, got {tuple(tokens.shape)}")
        tokens = tokens.to(prefix.device)
        plen = prefix.shape[1]
        embeds = self.input_embeds(tokens[:, :3])
        logits = self.decoder(inputs_embeds=torch.cat([prefix, embeds], dim=1), use_cache=False).logits
        return self._masked_token_log_probs(logits[:, plen:plen + 4], tokens, with_distribution)

    def box_log_probs_shared(self, prefix: Tensor, owner: Tensor, tokens: Tensor, with_distribution: bool = False):
        """`box_log_probs(prefix[owner], tokens)` with each image's prefix run through GPT-2 once.

        ``prefix`` ``[B, P, D]``, ``owner`` ``LongTensor[M]`` (the image of each box), ``tokens`` ``[M, 4]``.
        Images with several boxes (OPA positives, DPO chosen + rejected) otherwise pay the P-token
        prefix once per box. The prefix KV cache is gathered per box with ``index_select``, so
        gradients flow through the cache into the prefix; the box steps get positions P..P+3 exactly
        as in the full-sequence path. In training mode the prefix's dropout mask is shared by the
        boxes of one image (the full path draws one per box); in eval mode both paths agree.
        """
        owner = torch.as_tensor(owner).long()  # checked where it lies: an owner on the CPU costs no GPU sync
        if tokens.ndim != 2 or tokens.shape[1] != 4 or owner.shape != tokens.shape[:1]:
            raise ValueError(f"tokens must be [M, 4] and owner [M], got {tuple(tokens.shape)} and {tuple(owner.shape)}")
        if len(owner) and not (0 <= int(owner.min()) and int(owner.max()) < prefix.shape[0]):
            raise ValueError(f"owner indices must lie in [0, {prefix.shape[0]}), got {owner.tolist()}")
        owner = owner.to(prefix.device, non_blocking=True)
        tokens = tokens.to(prefix.device)
        plen = prefix.shape[1]
        cache = self._cache_of(self.decoder(inputs_embeds=prefix, use_cache=True, logits_to_keep=1))
        cache.reorder_cache(owner)  # index_select on the batch dim of every layer's keys and values
        embeds = self.input_embeds(tokens[:, :3])
        positions = torch.arange(plen, plen + 4, device=prefix.device)[None]
        logits = self.decoder(inputs_embeds=embeds, use_cache=True, position_ids=positions,
                              **{self._cache_arg: cache}).logits
        return self._masked_token_log_probs(logits, tokens, with_distribution)

    def _masked_token_log_probs(self, logits: Tensor, tokens: Tensor, with_distribution: bool):
        """Validity-masked log-softmax of the 4 box steps' ``logits`` ``[M, 4, vocab]``, gathered at ``tokens``."""
        logits = logits.float()
        if self.extent_embed is not None:
            logits = torch.stack([self.step_logits(j, logits[:, j], tokens[:, :j]) for j in range(4)], dim=1)
        bounds = self.region_bounds(None, len(tokens), tokens.device)
        allowed = torch.stack([self.allowed_tokens(j, tokens[:, :j], bounds) for j in range(4)], dim=1)
        ok = allowed.gather(-1, tokens.clamp(0, self.tokenizer.vocab_size - 1)[..., None]).squeeze(-1).all(-1)
        if not ok.all():
            i = int((~ok).nonzero()[0])
            raise ValueError(f"token box {tokens[i].tolist()} (row {i}) is not a valid box: "
                             f"needs coordinate ids with x2 > x1 and y2 > y1")
        logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
        token_logp = logp.gather(-1, tokens[..., None]).squeeze(-1)
        return (token_logp, logp) if with_distribution else token_logp

    @torch.no_grad()
    def score_tokens(self, images: Tensor, categories: Sequence[str], tokens: Tensor, owner: Tensor,
                     region: Optional[Tensor] = None, size: Optional[Tensor] = None,
                     aspect_ratio: Optional[Tensor] = None) -> Tensor:
        """Log-probability ``[M]`` of each token box ``tokens[m]`` (``[M, 4]``) for image ``owner[m]``
        under the distribution `sample` draws from with temperature 1 and no top-k/top-p: validity
        masks and ``region`` / ``size`` / ``aspect_ratio`` (normalised, as in `sample`), renormalised.

        Teacher-forced through the cascade decoder of `sample`: each image's prefix goes through GPT-2
        once, however many boxes it has, and the boxes' steps run as the sampler's do, so a box the
        sampler drew scores the sampler's log-probability. A box the masks exclude scores -inf (its
        probability is 0). Runs in eval mode (restored afterwards); float64 models score in float64.
        """
        if len(categories) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(categories)} categories")
        batch = images.shape[0]
        owner = torch.as_tensor(owner).long().cpu()
        tokens = torch.as_tensor(tokens).long().cpu()
        if tokens.ndim != 2 or tokens.shape[1] != 4 or owner.shape != tokens.shape[:1]:
            raise ValueError(f"tokens must be [M, 4] and owner [M], got {tuple(tokens.shape)} and {tuple(owner.shape)}")
        if len(owner) and not (0 <= int(owner.min()) and int(owner.max()) < batch):
            raise ValueError(f"owner indices must lie in [0, {batch}), got {owner.tolist()}")
        if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < self.cfg.num_bins):
            raise ValueError(f"token ids must be coordinate ids in [0, {self.cfg.num_bins}), got {tokens.tolist()}")
        counts = torch.bincount(owner, minlength=batch)
        slot = torch.empty_like(owner)  # position of each box among its image's boxes
        order = torch.argsort(owner, stable=True)
        slot[order] = torch.arange(len(owner)) - (counts.cumsum(0) - counts)[owner[order]]
        n = int(counts.max()) if len(owner) else 1
        padded = torch.tensor([0, 0, 1, 1]).repeat(batch, n, 1)  # unused slots: any box, scores discarded
        padded[owner, slot] = tokens
        was_training = self.training
        self.eval()
        try:
            prefix = self.build_prefix(self.encode_images(images), self.encode_texts(categories))
            bounds = self.region_bounds(region, batch, prefix.device)
            extents = self.extent_mask(size, aspect_ratio, batch, prefix.device)
            self.check_extents_fit(bounds, extents)
            log_probs = self._teacher_forced(prefix, padded.to(prefix.device), bounds, extents)
        finally:
            self.train(was_training)
        return log_probs[owner.to(log_probs.device), slot.to(log_probs.device)]

    def _teacher_forced(self, prefix: Tensor, tokens: Tensor, bounds: Tensor,
                        extents: Optional[ExtentMask]) -> Tensor:
        """Summed masked log-probs ``[B, n]`` of ``tokens`` ``[B, n, 4]``: `_decode_cascade`'s steps with
        the tokens given instead of drawn."""
        batch, n = tokens.shape[:2]
        first_logits, shared = self._shared_prefix(prefix)
        own: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(shared)
        flat = tokens.view(batch * n, 4)
        logits = first_logits.repeat_interleave(n, dim=0)
        bounds = bounds.repeat_interleave(n, dim=0)
        extents = None if extents is None else extents.repeat_interleave(n)
        total = torch.zeros(batch * n, dtype=torch.promote_types(logits.dtype, torch.float32), device=prefix.device)
        for step in range(4):
            prev = flat[:, :step]
            step_logits = self.step_logits(step, logits.to(total.dtype), prev)
            allowed = self.allowed_tokens(step, prev, bounds, extents)
            logp = step_logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
            token = flat[:, step:step + 1]
            ok = allowed.gather(-1, token).squeeze(-1)  # a row with no allowed token would give NaN
            total = total + torch.where(ok, logp.gather(-1, token).squeeze(-1), float("-inf"))
            if step < 3:
                hidden = self.input_embeds(flat[:, :step + 1])[:, -1].view(batch, n, -1)
                logits = self._cascade_step(hidden, prefix.shape[1] + 1 + step, shared, own).reshape(batch * n, -1)
        return total.view(batch, n)
