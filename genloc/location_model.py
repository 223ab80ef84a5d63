"""The GenLoc location model and its KV-cached sampler, in one file (pure PyTorch, no Lightning).

    image --timm ViT--> patch tokens --Linear--> \
                                                  prefix [B, 1 + patches, D] --GPT-2--> x1 y1 x2 y2
    "a photo of a {category}" --open_clip text--> --Linear--> (text token first)

The decoder reads ``inputs_embeds = prefix ++ wte(BOS, x1, y1, x2)`` and predicts ``x1, y1, x2, y2``;
the loss covers the four box tokens only.

Relative extents (``cfg.relative_extents``, ours; off in the `paper` preset): the tokens stay
``x1, y1, x2, y2``, but the decoder's outputs at the ``x2``/``y2`` steps are read as the box's
extent (output ``e`` -> ``x2 = x1 + 1 + e``) and the ``x2`` input also carries a learned embedding of
the width ``x2 - x1``. It is a re-indexing of the same categorical distribution, so likelihoods,
masks and sampling keep their meaning; what changes is what the network must compute: "width =
f(height)" instead of "x2 = x1 + f(height)", the cross-axis arithmetic a small decoder learns slowest.

Validity masks are part of the model's distribution. At every step the logits of tokens that
cannot start or complete a valid box are set to -inf before the softmax: BOS/EOS never; ``x1``/``y1``
not the last bin (room for ``x2``/``y2``); ``x2 > x1``; ``y2 > y1``. With a region, bins whose centre
lies outside the region are also masked, and ``x1``/``y1`` must leave a bin for ``x2``/``y2`` inside
it. `box_log_probs` (training, scoring) and the sampler apply the same masks through
`LocationModel.allowed_tokens`, so with temperature 1, no top-k/top-p and no region the sampler's
log-probability of a box equals ``box_log_probs(...).sum(-1)``.

Size and aspect-ratio control (`ExtentMask`) are masks of the same kind: a table of the allowed
(width, height) extents in bins, with two cumulative tables that let every step look ahead, so a
prefix the masks allow can always be completed (no step ever has nothing left to draw). A box's
width ``x2 - x1`` is allowed when its bin range ``[e - 1/2, e + 1/2] / num_bins`` meets the requested
range, so a returned box has the requested size or aspect ratio to within half a bin per side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_tokenizer import BoxTokenizer
from .config import LocationModelConfig
from .pretrained import attention_scaling, build_clip_text, build_gpt2, build_vit, cache_field, ordinal_init
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


@dataclass
class ExtentMask:
    """Allowed box extents per image, in bins: ``pairs[b, w, h]`` is true when a box of image ``b``
    may be ``w`` bins wide (``x2 - x1``) and ``h`` bins tall (``y2 - y1``).

    ``fits[b, w, j]``: some allowed pair has width ``w`` and height <= ``j``; ``fits_any[b, i, j]``:
    some allowed pair has width <= ``i`` and height <= ``j``. ``owner[m]`` is the image of sequence
    ``m`` (the sampler decodes ``n`` sequences per image without copying the tables).
    """

    pairs: Tensor     # BoolTensor[B, num_bins, num_bins]
    fits: Tensor      # BoolTensor[B, num_bins, num_bins]
    fits_any: Tensor  # BoolTensor[B, num_bins, num_bins]
    owner: Tensor     # LongTensor[M]

    def repeat_interleave(self, n: int) -> "ExtentMask":
        return ExtentMask(self.pairs, self.fits, self.fits_any, self.owner.repeat_interleave(n))


class LocationModel(nn.Module):
    """ViT + CLIP-text conditioned GPT-2 over quantised boxes (see module docstring)."""

    def __init__(self, cfg: LocationModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = BoxTokenizer(cfg.num_bins)
        self.image_encoder = build_vit(cfg.vit, cfg.image_size, cfg.vit_kwargs, cfg.vit_weights)
        self.text_encoder, self._tokenize = build_clip_text(cfg.clip_model, cfg.clip_weights)
        mean, std = self.image_encoder.pretrained_cfg["mean"], self.image_encoder.pretrained_cfg["std"]
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.num_image_tokens = self.image_encoder.patch_embed.num_patches
        self.prefix_len = 1 + self.num_image_tokens
        # positions: prefix + BOS + 4 box tokens (EOS is never fed)
        self.decoder = build_gpt2(cfg.gpt2_n_layer, cfg.gpt2_n_embd, cfg.gpt2_n_head, cfg.gpt2_dropout,
                                  self.tokenizer.vocab_size, self.prefix_len + 5, cfg.gpt2_weights)
        self._cache_arg = cache_field()
        self.extent_embed = None
        if cfg.relative_extents:
            self.extent_embed = nn.Embedding(cfg.num_bins, cfg.gpt2_n_embd)
            nn.init.normal_(self.extent_embed.weight, std=0.02)  # GPT-2's embedding scale
            ordinal_init(self.extent_embed, cfg.num_bins)
        self.image_proj = nn.Linear(self.image_encoder.num_features, cfg.gpt2_n_embd)
        self.text_proj = nn.Linear(self.text_encoder.output_dim, cfg.gpt2_n_embd)
        self.image_encoder.requires_grad_(not cfg.freeze_image_encoder)
        self.text_encoder.requires_grad_(not cfg.freeze_text_encoder)
        if cfg.compile_decoder:
            self.decoder.compile()  # in place: parameter names and checkpoints stay those of eager
        self._text_cache: dict[str, Tensor] = {}
        self.register_load_state_dict_post_hook(LocationModel._clear_text_cache)
        self.train()

    @staticmethod
    def _clear_text_cache(module: "LocationModel", incompatible_keys=None) -> None:
        """Cached text features are stale once new weights are loaded."""
        module._text_cache.clear()

    # ------------------------------------------------------------------ module plumbing
    def train(self, mode: bool = True) -> "LocationModel":
        """Frozen encoders stay in eval mode even when the model trains."""
        super().train(mode)
        if self.cfg.freeze_image_encoder:
            self.image_encoder.eval()
        if self.cfg.freeze_text_encoder:
            self.text_encoder.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        self._clear_text_cache(self)  # device/dtype moves invalidate cached text features
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ conditioning
    def encode_images(self, images: Tensor) -> Tensor:
        """``FloatTensor[B,3,S,S]`` in [0,1] -> ViT patch tokens ``[B, patches, C]`` (no grad when frozen).

        Images of another size are resized (bilinear) to ``cfg.image_size``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        size = self.cfg.image_size
        images = images.to(self.image_mean.device, self.image_mean.dtype)
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = (images - self.image_mean) / self.image_std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_image_encoder):
            tokens = self.image_encoder.forward_features(x)
        return tokens[:, self.image_encoder.num_prefix_tokens:]

    def encode_texts(self, categories: Sequence[str]) -> Tensor:
        """Category names -> open_clip text features ``[B, C]`` of the prompt.

        With a frozen text tower each category is encoded once and kept in a dict cache.
        """
        if isinstance(categories, str):
            raise TypeError("categories must be a sequence of names, not a single string")
        device = self.text_encoder.token_embedding.weight.device
        if not self.cfg.freeze_text_encoder:
            return self.text_encoder(self._prompt_ids(categories).to(device))
        missing = [c for c in dict.fromkeys(categories) if c not in self._text_cache]
        if missing:
            with torch.no_grad():
                feats = self.text_encoder(self._prompt_ids(missing).to(device))
            self._text_cache.update(zip(missing, feats))
        return torch.stack([self._text_cache[c] for c in categories])

    @property
    def cached_categories(self):
        """Categories whose frozen text features are cached (a view of the cache's keys)."""
        return self._text_cache.keys()

    def _prompt_ids(self, categories: Sequence[str]) -> Tensor:
        return self._tokenize([self.cfg.prompt_template.format(category=c) for c in categories])

    def build_prefix(self, img_feats: Tensor, txt_feats: Tensor) -> Tensor:
        """Projected text token followed by projected image tokens: ``[B, 1 + patches, D]``."""
        dtype = self.image_proj.weight.dtype
        txt = self.text_proj(txt_feats.to(dtype)).unsqueeze(1)
        return torch.cat([txt, self.image_proj(img_feats.to(dtype))], dim=1)

    def input_embeds(self, tokens: Tensor) -> Tensor:
        """Decoder inputs for BOS followed by the box tokens chosen so far ``[M, k]`` (k <= 3):
        ``[M, k + 1, D]``. With relative extents the ``x2`` input also embeds the width ``x2 - x1``."""
        bos = torch.full((tokens.shape[0], 1), self.tokenizer.bos, device=tokens.device, dtype=torch.long)
        embeds = self.decoder.get_input_embeddings()(torch.cat([bos, tokens], dim=1))
        if self.extent_embed is not None and tokens.shape[1] >= 3:
            width = self.extent_embed((tokens[:, 2] - tokens[:, 0] - 1).clamp(min=0))
            embeds = torch.cat([embeds[:, :3], embeds[:, 3:4] + width[:, None], embeds[:, 4:]], dim=1)
        return embeds

    def step_logits(self, step: int, logits: Tensor, prev: Tensor) -> Tensor:
        """Decoder outputs ``[M, vocab]`` at box ``step`` -> logits over coordinate tokens.

        The identity, except with relative extents at the ``x2``/``y2`` steps: output ``e`` is the
        logit of token ``start + 1 + e`` with ``start`` = ``x1``/``y1`` (``prev[:, step - 2]``); tokens
        without an extent get -inf (the validity mask excludes them anyway).
        """
        if self.extent_embed is None or step < 2:
            return logits
        k = torch.arange(logits.shape[-1], device=logits.device)
        extent = k[None] - prev[:, step - 2, None] - 1
        valid = (extent >= 0) & (k[None] < self.cfg.num_bins)
        return logits.gather(-1, extent.clamp(min=0)).masked_fill(~valid, float("-inf"))

    # ------------------------------------------------------------------ masks
    def region_bounds(self, region: Optional[Tensor], batch: int, device: torch.device) -> Tensor:
        """Allowed bin range per image, ``LongTensor[batch, 4]`` = (lo_x, lo_y, hi_x, hi_y) inclusive.

        Without a region every bin; with a normalised region ``x1,y1,x2,y2`` the bins whose centre
        ``(k + 0.5) / num_bins`` lies inside it.
        """
        nb = self.cfg.num_bins
        if region is None:
            return torch.tensor([0, 0, nb - 1, nb - 1], device=device).expand(batch, 4)
        region = torch.as_tensor(region, dtype=torch.float64, device=device)
        if region.shape == (4,):
            region = region.expand(batch, 4)
        if region.shape != (batch, 4):
            raise ValueError(f"region must have shape (4,) or ({batch}, 4), got {tuple(region.shape)}")
        if not torch.isfinite(region).all() or (region < 0).any() or (region > 1).any():
            raise ValueError(f"region must be normalised x1,y1,x2,y2 in [0, 1], got {region.tolist()}")
        lo = torch.ceil(region[:, :2] * nb - 0.5).clamp(0, nb - 1)
        hi = torch.floor(region[:, 2:] * nb - 0.5).clamp(0, nb - 1)
        too_small = (hi - lo < 1).any(-1)
        if too_small.any():
            i = int(too_small.nonzero()[0])
            raise ValueError(
                f"region {region[i].tolist()} holds fewer than 2 bin centres per axis at num_bins={nb}, "
                f"so no valid box fits inside it")
        return torch.cat([lo, hi], dim=-1).long()

    def extent_mask(self, size: Optional[Tensor], aspect_ratio: Optional[Tensor], batch: int,
                    device: torch.device) -> Optional[ExtentMask]:
        """`ExtentMask` of the allowed box sizes per image, or None when neither is constrained.

        ``size``: normalised ``(w_min, w_max, h_min, h_max)``, shape (4,) or (batch, 4) (``w_min ==
        w_max`` asks for one width; ``0, 1`` leaves an axis free). ``aspect_ratio``: ``(min, max)`` of
        the *normalised* ratio ``(x2 - x1) / (y2 - y1)``, shape (2,) or (batch, 2); a pixel ratio ``r``
        of a ``W x H`` image is ``r * H / W`` here. An extent ``e`` bins is allowed when its range
        ``[e - 1/2, e + 1/2]`` (in bins) meets the request, a pair when its range of ratios does.
        """
        if size is None and aspect_ratio is None:
            return None
        nb = self.cfg.num_bins
        e = torch.arange(nb, dtype=torch.float64, device=device)
        pairs = (e[:, None] >= 1) & (e[None, :] >= 1)
        pairs = pairs.expand(batch, nb, nb)
        if size is not None:
            size = _per_image(size, 4, batch, "size", device)
            if (size < 0).any() or (size[:, 0] > size[:, 1]).any() or (size[:, 2] > size[:, 3]).any():
                raise ValueError(f"size must be normalised (w_min, w_max, h_min, h_max) with min <= max, "
                                 f"got {size.tolist()}")
            width_ok = ((e + 0.5) / nb >= size[:, 0:1]) & ((e - 0.5) / nb <= size[:, 1:2])
            height_ok = ((e + 0.5) / nb >= size[:, 2:3]) & ((e - 0.5) / nb <= size[:, 3:4])
            pairs = pairs & width_ok[:, :, None] & height_ok[:, None, :]
        if aspect_ratio is not None:
            ratio = _per_image(aspect_ratio, 2, batch, "aspect_ratio", device)
            if (ratio[:, 0] < 0).any() or (ratio[:, 0] > ratio[:, 1]).any():
                raise ValueError(f"aspect_ratio must be a (min, max) >= 0 with min <= max, got {ratio.tolist()}")
            shortest = (e - 0.5).clamp(min=1e-9)  # extent 0 is excluded above
            lowest = (e[:, None] - 0.5) / (e[None, :] + 0.5)     # smallest w/h of a (w, h) bin pair
            highest = (e[:, None] + 0.5) / shortest[None, :]      # largest
            pairs = pairs & (lowest <= ratio[:, 1, None, None]) & (highest >= ratio[:, 0, None, None])
        empty = ~pairs.flatten(1).any(-1)
        if empty.any():
            i = int(empty.nonzero()[0])
            raise ValueError(
                f"no box size fits image {i}: size {None if size is None else size[i].tolist()} and aspect "
                f"ratio {None if aspect_ratio is None else ratio[i].tolist()} (normalised) leave no box of at "
                f"least one bin (1/{nb}) per side inside the image")
        fits = pairs.cumsum(dim=2) > 0
        return ExtentMask(pairs.contiguous(), fits, fits.cumsum(dim=1) > 0, torch.arange(batch, device=device))

    def check_extents_fit(self, bounds: Tensor, extents: Optional[ExtentMask]) -> None:
        """Raise ValueError when no allowed box size fits inside an image's region ``bounds`` ``[B, 4]``."""
        if extents is None:
            return
        room_x, room_y = bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]
        ok = extents.fits_any[torch.arange(len(bounds), device=bounds.device), room_x, room_y]
        if not ok.all():
            i = int((~ok).nonzero()[0])
            raise ValueError(f"no box of the requested size / aspect ratio fits inside the region of image {i} "
                             f"({int(room_x[i])} x {int(room_y[i])} bins wide and tall at most)")

    def allowed_tokens(self, step: int, prev: Tensor, bounds: Tensor, extents: Optional[ExtentMask] = None) -> Tensor:
        """``BoolTensor[M, vocab]``: tokens allowed at ``step`` (0..3 = x1,y1,x2,y2).

        ``prev`` holds the ``step`` tokens already chosen ``[M, step]``; ``bounds`` is
        `region_bounds` per sequence ``[M, 4]``; ``extents`` (optional) restricts the box size, with
        ``extents.owner`` mapping the ``M`` sequences to its images.
        """
        if extents is not None:
            return self._allowed_with_extents(step, prev, bounds, extents)
        axis = step % 2
        if step < 2:  # x1 / y1: leave at least one bin for x2 / y2
            low, high = bounds[:, axis], bounds[:, 2 + axis] - 1
        else:         # x2 / y2: strictly after x1 / y1, inside the bounds
            low, high = prev[:, axis] + 1, bounds[:, 2 + axis]
        k = torch.arange(self.tokenizer.vocab_size, device=bounds.device)
        return (k >= low[:, None]) & (k <= high[:, None])

    def _allowed_with_extents(self, step: int, prev: Tensor, bounds: Tensor, extents: ExtentMask) -> Tensor:
        """`allowed_tokens` under size constraints: a token is allowed when some allowed extent pair
        still fits between it and the region's far edges (the look-ahead tables of `ExtentMask`)."""
        last = self.cfg.num_bins - 1
        k = torch.arange(self.tokenizer.vocab_size, device=bounds.device)[None]
        owner = extents.owner[:, None]
        lo_x, lo_y, hi_x, hi_y = (bounds[:, i:i + 1] for i in range(4))
        if step == 0:    # x1: room for some allowed width, with y1 at the region's top
            room = hi_x - k
            ok = (k >= lo_x) & (room >= 1)
            return ok & extents.fits_any[owner, room.clamp(0, last), hi_y - lo_y]
        if step == 1:    # y1: room for some allowed (width, height) right of x1 and below y1
            room = hi_y - k
            ok = (k >= lo_y) & (room >= 1)
            return ok & extents.fits_any[owner, hi_x - prev[:, 0:1], room.clamp(0, last)]
        if step == 2:    # x2: an allowed width that leaves room for one of its allowed heights
            width = k - prev[:, 0:1]
            ok = (width >= 1) & (k <= hi_x)
            return ok & extents.fits[owner, width.clamp(0, last), hi_y - prev[:, 1:2]]
        height = k - prev[:, 1:2]  # y2: an allowed height for the chosen width
        ok = (height >= 1) & (k <= hi_y)
        return ok & extents.pairs[owner, prev[:, 2:3] - prev[:, 0:1], height.clamp(0, last)]

    # ------------------------------------------------------------------ likelihood
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

    def _cache_of(self, output) -> object:
        """The KV cache of a decoder output, whichever name this transformers release gives it."""
        return getattr(output, self._cache_arg)

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

    def forward(self, images: Tensor, categories: Sequence[str], tokens: Tensor) -> Tensor:
        """End-to-end per-token log-probs ``[B, 4]`` of ``tokens`` for (image, category) pairs."""
        prefix = self.build_prefix(self.encode_images(images), self.encode_texts(categories))
        return self.box_log_probs(prefix, tokens)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, images: Tensor, categories: Sequence[str], n: int = 100, temperature: float = 1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, region: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None, image_sizes: Optional[Tensor] = None,
               size: Optional[Tensor] = None, aspect_ratio: Optional[Tensor] = None,
               cascade: bool = True, bf16: bool = False) -> SampleOutput:
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
        """
        if len(categories) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(categories)} categories")
        _check_sampling_args(n, temperature, top_k, top_p)
        was_training = self.training
        self.eval()
        try:
            prefix = self.build_prefix(self.encode_images(images), self.encode_texts(categories))
            bounds = self.region_bounds(region, prefix.shape[0], prefix.device)
            extents = self.extent_mask(size, aspect_ratio, prefix.shape[0], prefix.device)
            self.check_extents_fit(bounds, extents)
            decode = self._decode_cascade if cascade else self._decode_cached
            with torch.autocast(prefix.device.type, dtype=torch.bfloat16, enabled=bf16):
                tokens, log_probs = decode(prefix, n, bounds, temperature, top_k, top_p, generator, extents)
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
                        extents: Optional[ExtentMask] = None) -> tuple[Tensor, Tensor]:
        """`_decode_cached` without copying the prefix cache: each image's prefix keys/values stay
        ``[B, H, P + 1, d]`` and only the box tokens' keys/values are kept per sample."""
        batch = prefix.shape[0]
        first_logits, shared = self._shared_prefix(prefix)
        own: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(shared)
        first_position = prefix.shape[1] + 1

        def next_logits(tokens: Tensor, step: int) -> Tensor:
            hidden = self.input_embeds(tokens)[:, -1].view(batch, n, -1)
            return self._cascade_step(hidden, first_position + step, shared, own).reshape(batch * n, -1)

        return self._draw_boxes(first_logits, n, bounds, extents, (temperature, top_k, top_p), generator,
                                next_logits)

    def _shared_prefix(self, prefix: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Each image's prefix plus BOS through GPT-2 once: the logits after BOS ``[B, vocab]`` and
        every layer's prefix keys/values ``[B, H, P + 1, d]`` for `_cascade_step`."""
        bos = self.input_embeds(torch.empty(prefix.shape[0], 0, dtype=torch.long, device=prefix.device))
        out = self.decoder(inputs_embeds=torch.cat([prefix, bos], dim=1), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], [(layer.keys, layer.values) for layer in self._cache_of(out).layers]

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

    def _cascade_step(self, hidden: Tensor, position: int, shared: list[tuple[Tensor, Tensor]],
                      own: list[Optional[tuple[Tensor, Tensor]]]) -> Tensor:
        """One token per sample through GPT-2's blocks (eval mode: no dropout): ``hidden`` ``[B, n, D]``
        input embeddings at ``position`` -> logits ``[B, n, vocab]``.

        Attention of a sample's query is one softmax over [its image's prefix keys (``shared[i]``,
        ``[B, H, P + 1, d]``); its own box-token keys (``own[i]``, ``[B, H, n, t, d]``, extended here)]:
        a batched matmul per image for the prefix part, an elementwise product for the own part,
        the scores concatenated (``[B, H, n, P + 1 + t]``) for the joint softmax.
        """
        gpt2 = self.decoder.transformer
        batch, n, width = hidden.shape
        x = hidden + gpt2.wpe.weight[position].to(hidden.dtype)
        for i, block in enumerate(gpt2.h):
            attn = block.attn
            heads = attn.num_heads
            q, k, v = attn.c_attn(block.ln_1(x)).split(width, dim=-1)
            q, k, v = (t.view(batch, n, heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, n, d]
            if own[i] is None:
                own[i] = (k[..., None, :], v[..., None, :])
            else:
                own[i] = (torch.cat([own[i][0], k[..., None, :]], dim=3), torch.cat([own[i][1], v[..., None, :]], dim=3))
            own_k, own_v = own[i]
            prefix_k, prefix_v = shared[i]
            scores = torch.cat([q @ prefix_k.transpose(-1, -2), (q[..., None, :] * own_k).sum(-1)], dim=-1)
            weights = (scores * attention_scaling(attn)).softmax(dim=-1).to(prefix_v.dtype)
            plen = prefix_k.shape[2]
            context = weights[..., :plen] @ prefix_v + (weights[..., plen:, None] * own_v).sum(3)
            x = x + attn.c_proj(context.transpose(1, 2).reshape(batch, n, width))
            x = x + block.mlp(block.ln_2(x))
        return self.decoder.lm_head(gpt2.ln_f(x))

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

    # ------------------------------------------------------------------ scoring
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


def _per_image(value, width: int, batch: int, name: str, device: torch.device) -> Tensor:
    """A (width,) or (batch, width) constraint -> float64 ``[batch, width]``; NaN is an error."""
    value = torch.as_tensor(value, dtype=torch.float64, device=device)
    if value.shape == (width,):
        value = value.expand(batch, width)
    if value.shape != (batch, width):
        raise ValueError(f"{name} must have shape ({width},) or ({batch}, {width}), got {tuple(value.shape)}")
    if torch.isnan(value).any():
        raise ValueError(f"{name} holds NaN: {value.tolist()}")
    return value


def _check_sampling_args(n: int, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Fail before any encoding, not at the first decoding step."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    check_filter_args(temperature, top_k, top_p)

