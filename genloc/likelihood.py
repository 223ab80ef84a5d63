"""The location model's likelihood paths (pure PyTorch): teacher-forced log-probabilities of given
token boxes, for training (`box_log_probs`, `box_log_probs_shared`) and for scoring (`score_tokens`).

All of them apply the constraint masks of `genloc.masks`, so a likelihood is that of the distribution
the sampler draws from.
"""
from __future__ import annotations

from dataclasses import dataclass
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

    def box_log_probs_shared(self, prefix: Tensor, owner: Tensor, tokens: Tensor, with_distribution: bool = False,
                             one_pass: bool = False):
        """`box_log_probs(prefix[owner], tokens)` with each image's prefix run through GPT-2 once.

        ``prefix`` ``[B, P, D]``, ``owner`` ``LongTensor[M]`` (the image of each box), ``tokens`` ``[M, 4]``.
        Checks the boxes on the host (`BoxBatch.build`: a copy from the device when they lie there);
        the training step builds its `BoxBatch` before the batch moves and calls `batch_log_probs`.
        """
        boxes = BoxBatch.build(torch.as_tensor(tokens).cpu(), torch.as_tensor(owner).cpu(), prefix.shape[0],
                               self.cfg.num_bins)
        return self.batch_log_probs(prefix, boxes.to(prefix.device, non_blocking=True), with_distribution, one_pass)

    def batch_log_probs(self, prefix: Tensor, boxes: "BoxBatch", with_distribution: bool = False,
                        one_pass: bool = False):
        """Per-token log-probs ``[M, 4]`` of the checked token boxes of ``boxes`` under ``prefix`` ``[B, P, D]``:
        `box_log_probs(prefix[boxes.owner], boxes.tokens)`, without a host-device synchronisation.

        Two ways through GPT-2, same values: the prefix pass then the boxes' pass on its KV cache (the
        cache gathered per box with ``index_select``; ``one_pass=False``), or ``one_pass``: the prefix and
        every box of an image in one sequence (`_one_pass_logits`). Gradients flow into the prefix
        either way and the box steps get positions P..P+3 as in the full-sequence path. In training mode
        the prefix's dropout mask is shared by the boxes of one image (the full path draws one per box);
        in eval mode all paths agree.
        """
        if boxes.images != prefix.shape[0]:
            raise ValueError(f"the boxes belong to {boxes.images} images but the prefix has {prefix.shape[0]}")
        logits = self._one_pass_logits(prefix, boxes) if one_pass else self._cached_pass_logits(prefix, boxes)
        return self._masked_token_log_probs(logits, boxes.tokens, with_distribution, check=False)

    def grid_log_probs(self, prefix: Tensor, tokens: Tensor, with_distribution: bool = False):
        """Per-token log-probs ``[B, K, 4]`` of ``K`` token boxes per image, ``tokens`` ``[B, K, 4]`` (`BoxBatch.grid`:
        empty slots hold a valid filler box), in one decoder pass (`_one_pass_logits`): a box's values
        do not depend on the other slots. The shapes depend on ``B`` and ``K`` only, so a compiled
        training step (``module.compile_step``) sees few of them."""
        batch, k = tokens.shape[:2]
        device = tokens.device
        flat = tokens.reshape(batch * k, 4)
        owner = torch.arange(batch, device=device).repeat_interleave(k)
        boxes = BoxBatch(flat, owner, torch.arange(k, device=device).repeat(batch), batch, k, k == 1)
        out = self._masked_token_log_probs(self._one_pass_logits(prefix, boxes), flat, with_distribution, check=False)
        if with_distribution:
            return out[0].view(batch, k, 4), out[1].view(batch, k, 4, -1)
        return out.view(batch, k, 4)

    def _cached_pass_logits(self, prefix: Tensor, boxes: "BoxBatch") -> Tensor:
        """The box steps' logits ``[M, 4, vocab]``: the prefix pass, then the box tokens on its KV cache."""
        plen = prefix.shape[1]
        cache = self._cache_of(self.decoder(inputs_embeds=prefix, use_cache=True, logits_to_keep=1))
        cache.reorder_cache(boxes.owner)  # index_select on the batch dim of every layer's keys and values
        positions = torch.arange(plen, plen + 4, device=prefix.device)[None]
        return self.decoder(inputs_embeds=self.input_embeds(boxes.tokens[:, :3]), use_cache=True,
                            position_ids=positions, **{self._cache_arg: cache}).logits

    def _one_pass_logits(self, prefix: Tensor, boxes: "BoxBatch") -> Tensor:
        """The box steps' logits ``[M, 4, vocab]`` from one decoder call over ``prefix ++ box 1 ++ ... ++ box K``
        per image (``K = boxes.per_image``, missing boxes padded), under `one_pass_mask`: a box's tokens
        see the prefix and their own earlier tokens only. One box per image, in image order, is the plain
        causal pass of `box_log_probs` (no mask: the fused kernels' causal path)."""
        batch, plen, width = prefix.shape
        embeds = self.input_embeds(boxes.tokens[:, :3])  # [M, 4, D]
        if boxes.one_each:
            # use_cache=True: without a cache and a mask, transformers reads the positions back to the
            # host (a packed-sequence check, one sync per step); the cache holds what backward keeps anyway
            return self.decoder(inputs_embeds=torch.cat([prefix, embeds], dim=1), use_cache=True,
                                logits_to_keep=4).logits
        k = boxes.per_image
        slots = embeds.new_zeros(batch, k, 4, width).index_put((boxes.owner, boxes.slot), embeds)
        sequence = torch.cat([prefix, slots.view(batch, 4 * k, width)], dim=1)
        device = prefix.device
        positions = torch.cat([torch.arange(plen, device=device), plen + torch.arange(4, device=device).repeat(k)])
        logits = self.decoder(inputs_embeds=sequence, attention_mask=one_pass_mask(plen, k, device),
                              position_ids=positions[None], use_cache=False, logits_to_keep=4 * k).logits
        return logits.view(batch, k, 4, -1)[boxes.owner, boxes.slot]

    def _masked_token_log_probs(self, logits: Tensor, tokens: Tensor, with_distribution: bool, check: bool = True):
        """Validity-masked log-softmax of the 4 box steps' ``logits`` ``[M, 4, vocab]``, gathered at ``tokens``.

        ``check``: raise ValueError for a token box the masks exclude (a host-device synchronisation on
        a GPU); off for boxes `BoxBatch.build` checked on the host."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, float64 kept
        if self.extent_embed is not None:
            logits = torch.stack([self.step_logits(j, logits[:, j], tokens[:, :j]) for j in range(4)], dim=1)
        bounds = self.region_bounds(None, len(tokens), tokens.device)
        allowed = torch.stack([self.allowed_tokens(j, tokens[:, :j], bounds) for j in range(4)], dim=1)
        if check:
            ok = allowed.gather(-1, tokens.clamp(0, self.tokenizer.vocab_size - 1)[..., None]).squeeze(-1).all(-1)
            if not ok.all():
                i = int((~ok).nonzero()[0])
                raise ValueError(invalid_box_message(tokens, i))
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


def invalid_box_message(tokens: Tensor, row: int) -> str:
    return (f"token box {tokens[row].tolist()} (row {row}) is not a valid box: "
            f"needs coordinate ids with x2 > x1 and y2 > y1")


def one_pass_mask(prefix_len: int, per_image: int, device: torch.device) -> Tensor:
    """``BoolTensor[1, 1, L, L]`` (true = may attend) of `Likelihood._one_pass_logits`, ``L = prefix_len +
    4 per_image``: the prefix is causal; each box's 4 tokens see the whole prefix and their own box's
    earlier tokens, never another box."""
    i = torch.arange(prefix_len + 4 * per_image, device=device)
    box = torch.where(i < prefix_len, -1, torch.div(i - prefix_len, 4, rounding_mode="floor"))
    visible = (box[None, :] == -1) | (box[None, :] == box[:, None])
    return ((i[None, :] <= i[:, None]) & visible)[None, None]


@dataclass
class BoxBatch:
    """The token boxes of a batch, checked and laid out on the host before they move to the device:
    the shapes a one-pass likelihood needs are host integers, so the training step never waits on
    the device to learn them. Moves with the batch (``to``, as Lightning moves tensors)."""

    tokens: Tensor  # LongTensor[M, 4]: coordinate ids
    owner: Tensor   # LongTensor[M]: the image of each box
    slot: Tensor    # LongTensor[M]: its position among its image's boxes
    images: int     # B
    per_image: int  # slots per image: the most boxes of one image rounded up to a power of two (a bucket:
    #                 the one-pass sequence takes few shapes, so a compiled decoder does not recompile per batch)
    one_each: bool  # one box per image, in image order (owner == arange(B))

    @classmethod
    def build(cls, tokens: Tensor, owner: Tensor, images: int, num_bins: int) -> "BoxBatch":
        """Check ``tokens`` ``[M, 4]`` and ``owner`` ``[M]`` (CPU tensors): ValueError naming the first
        bad row: a valid token box has coordinate ids in ``[0, num_bins)`` with ``x2 > x1`` and ``y2 > y1``
        (the validity masks' rule; every ``tokenizer.encode`` box is one)."""
        tokens, owner = torch.as_tensor(tokens).long(), torch.as_tensor(owner).long()
        if tokens.device.type != "cpu" or owner.device.type != "cpu":
            raise ValueError("BoxBatch.build checks boxes on the host: pass CPU tensors")
        if tokens.ndim != 2 or tokens.shape[1] != 4 or owner.shape != tokens.shape[:1]:
            raise ValueError(f"tokens must be [M, 4] and owner [M], got {tuple(tokens.shape)} and {tuple(owner.shape)}")
        if len(owner) and not (0 <= int(owner.min()) and int(owner.max()) < images):
            raise ValueError(f"owner indices must lie in [0, {images}), got {owner.tolist()}")
        if len(tokens):
            x1, y1, x2, y2 = tokens.unbind(-1)
            bad = ~((x1 >= 0) & (y1 >= 0) & (x2 > x1) & (y2 > y1) & (x2 < num_bins) & (y2 < num_bins))
            if bad.any():
                raise ValueError(invalid_box_message(tokens, int(bad.nonzero()[0])))
        counts = torch.bincount(owner, minlength=images)
        order = torch.argsort(owner, stable=True)
        slot = torch.empty_like(owner)
        slot[order] = torch.arange(len(owner)) - (counts.cumsum(0) - counts)[owner[order]]
        one_each = len(owner) == images and bool((owner == torch.arange(images)).all())
        most = int(counts.max()) if len(owner) else 1
        return cls(tokens, owner, slot, images, 1 << max(0, most - 1).bit_length(), one_each)

    def grid(self) -> tuple[Tensor, Tensor]:
        """The boxes laid out per image: tokens ``[B, per_image, 4]`` (a slot without a box holds the valid
        filler box ``[0, 0, 1, 1]``) and which slots hold a box ``[B, per_image]``; for `grid_log_probs`.
        Index writes only, so it reads nothing back from the device."""
        tokens = self.tokens.new_tensor([0, 0, 1, 1]).repeat(self.images, self.per_image, 1)
        tokens[self.owner, self.slot] = self.tokens
        real = torch.zeros(self.images, self.per_image, dtype=torch.bool, device=self.tokens.device)
        real[self.owner, self.slot] = True
        return tokens, real

    def to(self, device, non_blocking: bool = False) -> "BoxBatch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return BoxBatch(move(self.tokens), move(self.owner), move(self.slot), self.images, self.per_image,
                        self.one_each)

    def select(self, images: list[int]) -> "BoxBatch":
        """The boxes of the given images (sorted indices, every box's image among them), renumbered as the
        sub-batch of those images."""
        index = torch.full((self.images,), -1, dtype=torch.long)
        index[torch.tensor(images, dtype=torch.long)] = torch.arange(len(images))
        owner = index.to(self.owner.device)[self.owner]
        return BoxBatch(self.tokens, owner, self.slot, len(images), self.per_image,
                        self.one_each and len(images) == self.images)

    def __len__(self) -> int:
        return len(self.tokens)
