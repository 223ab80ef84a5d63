"""The location model's sampler: ``n`` boxes per image in one batched, KV-cached decode (pure PyTorch).

Every step applies the model's constraint masks (`genloc.masks`) and then the sampling filters
(`genloc.sampling`), so with temperature 1 and no top-k/top-p a drawn box's log-probability is the
model's likelihood of it (`genloc.likelihood`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .masks import ExtentMask
from .sampling import check_filter_args, draw_tokens, filter_logits


@dataclass
class SampleOutput:
    """``n`` boxes per image from `LocationModel.sample`.

    ``log_probs`` is the log-probability of each token box under the distribution it was actually
    drawn from: at each of the 4 steps the model's logits, masked (validity and region), divided by
    the temperature, then restricted by top-k and top-p and renormalised; summed over the steps.
    With temperature 1, no top-k/top-p and no region it is the model's log-likelihood
    (``box_log_probs(...).sum(-1)``); with a region it is conditional on the region.
    """

    boxes: Tensor       # FloatTensor[B, n, 4]: pixels when image_sizes was given, else normalised
    boxes_norm: Tensor  # FloatTensor[B, n, 4]: normalised bin centres
    tokens: Tensor      # LongTensor[B, n, 4]: coordinate ids
    log_probs: Tensor   # FloatTensor[B, n]


class Sampler:
    """`LocationModel`'s sampling methods (a mixin over the network's decoder primitives)."""

    @torch.no_grad()
    def sample(self, images: Tensor, categories: Sequence[str], n: int = 100, temperature: float = 1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, region: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None, image_sizes: Optional[Tensor] = None,
               size: Optional[Tensor] = None, aspect_ratio: Optional[Tensor] = None,
               cascade: bool = True, bf16: bool = False, graphs: bool = False) -> SampleOutput:
        """Draw ``n`` valid boxes per (image, category) in one batched, KV-cached decode.

        ``region``, ``size`` and ``aspect_ratio`` (normalised, see `region_bounds` and `extent_mask`)
        are masks during decoding, never filters applied afterwards.

        The prefix of each image (plus BOS) goes through GPT-2 once. With ``cascade`` (the default,
        `_decode_cascade`) its keys/values are kept once per image and the ``n`` samples attend to
        them in place; ``cascade=False`` (`_decode_cached`) copies that KV cache ``n`` times, the
        earlier decoder kept for comparison (same tokens and log-probs, ``n`` times the cache memory).
        Runs in eval mode (restored afterwards); ``generator`` must live on the model's device.
        See `SampleOutput` for what ``log_probs`` means.

        ``bf16`` runs the decoding in bf16 autocast (a GPU speed option): the prefix is computed in
        fp32 (the cached text features stay fp32), and logits are cast to fp32 before masking and
        drawing, so only the decoder's matmuls round differently.

        ``graphs`` runs the cascade decode step captured in CUDA graphs (`graphed_cascade_step`): the
        same step, replayed without a kernel launch per operation, so few images are not launch-bound.
        The first calls of each shape compile and record it (seconds). CUDA models and ``cascade`` only.
        """
        if len(categories) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(categories)} categories")
        _check_sampling_args(n, temperature, top_k, top_p)
        if graphs:
            check_graphs(self.image_proj.weight.device, cascade)
        was_training = self.training
        self.eval()
        try:
            prefix = self.build_prefix(self.encode_images(images), self.encode_texts(categories))
            bounds = self.region_bounds(region, prefix.shape[0], prefix.device)
            extents = self.extent_mask(size, aspect_ratio, prefix.shape[0], prefix.device)
            self.check_extents_fit(bounds, extents)
            decode = self._decode_cascade if cascade else self._decode_cached
            graphed = {"decode_step": graphed_cascade_step(type(self))} if graphs else {}
            with torch.autocast(prefix.device.type, dtype=torch.bfloat16, enabled=bf16):
                tokens, log_probs = decode(prefix, n, bounds, temperature, top_k, top_p, generator, extents, **graphed)
        finally:
            self.train(was_training)
        return self._sample_output(tokens, log_probs, image_sizes)

    def _decode_cached(self, prefix: Tensor, n: int, bounds: Tensor, temperature: float, top_k: Optional[int],
                       top_p: Optional[float], generator: Optional[torch.Generator],
                       extents: Optional[ExtentMask] = None) -> tuple[Tensor, Tensor]:
        """Tokens ``[B, n, 4]`` and summed log-probs ``[B, n]``; prefix shared through the KV cache."""
        batch = prefix.shape[0]
        bos = self.input_embeds(torch.empty(batch, 0, dtype=torch.long, device=prefix.device))
        out = self.decoder(inputs_embeds=torch.cat([prefix, bos], dim=1), use_cache=True, logits_to_keep=1)
        cache = self._cache_of(out)
        cache.batch_repeat_interleave(n)

        def next_logits(tokens: Tensor, step: int) -> Tensor:
            return self.decoder(inputs_embeds=self.input_embeds(tokens)[:, -1:], use_cache=True,
                                **{self._cache_arg: cache}).logits[:, -1]

        return self._draw_boxes(out.logits[:, -1], n, bounds, extents, (temperature, top_k, top_p), generator,
                                next_logits)

    def _decode_cascade(self, prefix: Tensor, n: int, bounds: Tensor, temperature: float, top_k: Optional[int],
                        top_p: Optional[float], generator: Optional[torch.Generator],
                        extents: Optional[ExtentMask] = None, decode_step=None) -> tuple[Tensor, Tensor]:
        """`_decode_cached` without copying the prefix cache: each image's prefix keys/values stay
        ``[B, H, P + 1, d]`` and only the box tokens' keys/values are kept per sample. ``decode_step``:
        ``decode_step(model, hidden, position, shared, own)`` (default `_cascade_step`; the graphed one,
        `graphed_cascade_step`)."""
        decode_step = type(self)._cascade_step if decode_step is None else decode_step
        batch = prefix.shape[0]
        first_logits, shared = self._shared_prefix(prefix)
        own: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(shared)
        first_position = prefix.shape[1] + 1

        def next_logits(tokens: Tensor, step: int) -> Tensor:
            hidden = self.input_embeds(tokens)[:, -1].view(batch, n, -1)
            return decode_step(self, hidden, first_position + step, shared, own).reshape(batch * n, -1)

        return self._draw_boxes(first_logits, n, bounds, extents, (temperature, top_k, top_p), generator,
                                next_logits)

    def _draw_boxes(self, first_logits: Tensor, n: int, bounds: Tensor, extents: Optional[ExtentMask],
                    filters: tuple, generator: Optional[torch.Generator], next_logits) -> tuple[Tensor, Tensor]:
        """The four sampling steps shared by both decoders: ``first_logits`` ``[B, vocab]`` after BOS,
        ``next_logits(tokens, step)`` the logits after step ``step``'s token. Returns tokens
        ``[B, n, 4]`` and summed log-probs ``[B, n]``."""
        batch = first_logits.shape[0]
        logits = first_logits.repeat_interleave(n, dim=0)
        bounds = bounds.repeat_interleave(n, dim=0)
        extents = None if extents is None else extents.repeat_interleave(n)
        tokens = torch.empty(batch * n, 0, dtype=torch.long, device=first_logits.device)
        total = torch.zeros(batch * n, device=first_logits.device)
        for step in range(4):
            token, logp = self._sample_step(logits, step, tokens, bounds, *filters, generator, extents)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
            total += logp
            if step < 3:
                logits = next_logits(tokens, step)
        return tokens.view(batch, n, 4), total.view(batch, n)

    def _sample_step(self, logits: Tensor, step: int, prev: Tensor, bounds: Tensor, temperature: float,
                     top_k: Optional[int], top_p: Optional[float], generator: Optional[torch.Generator],
                     extents: Optional[ExtentMask] = None) -> tuple[Tensor, Tensor]:
        """One token per sequence: mask, temperature, top-k, top-p, then draw; returns (ids, log-probs)."""
        logits = self.step_logits(step, logits.float(), prev)
        logits = logits.masked_fill(~self.allowed_tokens(step, prev, bounds, extents), float("-inf"))
        return draw_tokens(filter_logits(logits, temperature, top_k, top_p), generator)

    def sampling_bytes_per_image(self, n: int) -> int:
        """Upper estimate of the memory one image adds to a `sample` call with ``n`` boxes (cascade
        decoder, the model's dtype): its pixels and image-encoder activations, its prefix keys/values,
        the ``n`` samples' box-token keys/values and one layer's step activations, doubled for
        allocator slack and transient copies. Sizes a sampling batch from a memory budget."""
        cfg, item = self.cfg, self.image_proj.weight.element_size()
        tokens, width = self.num_image_tokens + 1, self.image_encoder.num_features
        encoder_heads = getattr(getattr(self.image_encoder.blocks[0], "attn", None), "num_heads", 1)
        heads, d, layers = cfg.gpt2_n_head, cfg.gpt2_n_embd, cfg.gpt2_n_layer
        plen = self.prefix_len + 1
        encoder = 3 * cfg.image_size ** 2 * 4 + (12 * tokens * width + 2 * encoder_heads * tokens ** 2) * item
        prefix = (2 * layers * plen * d + 12 * plen * d + 2 * heads * plen ** 2) * item
        boxes = n * (2 * layers * 3 * d + 3 * heads * (plen + 3) + 12 * d + 8 * self.tokenizer.vocab_size) * item
        return 2 * (encoder + prefix + boxes)

    def sampling_batch_size(self, n: int, budget_bytes: float) -> int:
        """Images per `sample` call of ``n`` boxes within ``budget_bytes`` (at least 1)."""
        return max(1, int(budget_bytes // self.sampling_bytes_per_image(n)))

    def _sample_output(self, tokens: Tensor, log_probs: Tensor, image_sizes: Optional[Tensor]) -> SampleOutput:
        boxes_norm = self.tokenizer.decode(tokens)
        boxes = boxes_norm
        if image_sizes is not None:
            sizes = torch.as_tensor(image_sizes, device=tokens.device)
            if sizes.shape != (tokens.shape[0], 2):
                raise ValueError(f"image_sizes must be [B, 2] of (w, h) with B = {tokens.shape[0]}, "
                                 f"got {tuple(sizes.shape)}")
            boxes = self.tokenizer.decode_pixels(tokens, sizes[:, None, :])
        return SampleOutput(boxes=boxes, boxes_norm=boxes_norm, tokens=tokens, log_probs=log_probs)


GRAPHED_RECOMPILE_LIMIT = 64  # graphs per process: 3 decode steps x image counts x n x precisions
_graphed: dict[type, object] = {}


def check_graphs(device: torch.device, cascade: bool) -> None:
    """``graphs=True`` needs what CUDA graphs capture: ValueError in one line otherwise."""
    if device.type != "cuda" or not cascade:
        where = f"the model is on {device.type}" if device.type != "cuda" else "cascade=False was asked for"
        raise ValueError(f"graphs=True captures the cascade decode step in CUDA graphs, but {where}: "
                         f"sample a CUDA model with cascade=True, or leave graphs off")


def graphed_cascade_step(model_class: type):
    """``model_class._cascade_step`` under ``torch.compile(mode="reduce-overhead")``: compiled once per
    decode step and shape (positions and box-token counts differ per step), then replayed as a CUDA graph.
    The compile cache allows `GRAPHED_RECOMPILE_LIMIT` graphs, not torch's default 8, past which it would
    quietly run the step uncompiled."""
    if model_class not in _graphed:
        import torch._dynamo

        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, GRAPHED_RECOMPILE_LIMIT)
        compiled = torch.compile(model_class._cascade_step, mode="reduce-overhead", dynamic=False)

        def step(model, hidden: Tensor, position: int, shared, own):
            if position == model.prefix_len + 1:  # a new decode: the last one's graph outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            return compiled(model, hidden, position, shared, own)

        _graphed[model_class] = step
    return _graphed[model_class]


def _check_sampling_args(n: int, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Fail before any encoding, not at the first decoding step."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    check_filter_args(temperature, top_k, top_p)
