"""The GenLoc location model: the network (pure PyTorch, no Lightning).

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

The model's other jobs live beside it, one file each, mixed into `LocationModel`: the constraint masks
(`genloc/masks.py`), the likelihood paths of training and scoring (`genloc/likelihood.py`) and the
sampler (`genloc/sampler.py`). This file holds the network: encoders, prefix, decoder inputs and
outputs, and the cascade decoder step the sampler and the scorer share.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_tokenizer import BoxTokenizer
from .config import LocationModelConfig
from .likelihood import Likelihood
from .masks import ConstraintMasks, ExtentMask
from .pretrained import attention_scaling, build_clip_text, build_gpt2, build_vit, cache_field, ordinal_init
from .sampler import SampleOutput, Sampler

__all__ = ["ExtentMask", "LocationModel", "SampleOutput"]


class LocationModel(ConstraintMasks, Likelihood, Sampler, nn.Module):
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

    # ------------------------------------------------------------------ decoder primitives
    def _cache_of(self, output) -> object:
        """The KV cache of a decoder output, whichever name this transformers release gives it."""
        return getattr(output, self._cache_arg)

    def _shared_prefix(self, prefix: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Each image's prefix plus BOS through GPT-2 once: the logits after BOS ``[B, vocab]`` and
        every layer's prefix keys/values ``[B, H, P + 1, d]`` for `_cascade_step`."""
        bos = self.input_embeds(torch.empty(prefix.shape[0], 0, dtype=torch.long, device=prefix.device))
        out = self.decoder(inputs_embeds=torch.cat([prefix, bos], dim=1), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], [(layer.keys, layer.values) for layer in self._cache_of(out).layers]

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

    def forward(self, images: Tensor, categories: Sequence[str], tokens: Tensor) -> Tensor:
        """End-to-end per-token log-probs ``[B, 4]`` of ``tokens`` for (image, category) pairs."""
        prefix = self.build_prefix(self.encode_images(images), self.encode_texts(categories))
        return self.box_log_probs(prefix, tokens)
