"""Model FLOPs of one MLE training step per sample, from the config alone (for MFU in the GPU check).

Counted as `torch.utils.flop_counter.FlopCounterMode` counts: 2 FLOPs per multiply-add of every
matmul, linear layer, convolution and attention (causal attention counted as full); norms,
activations and the optimiser are left out. A backward pass costs twice its forward where inputs
and weights both need gradients and once where only the weights do (the first trainable layer
after a frozen part). The frozen text tower is cached per category, so it costs nothing per sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LocationModelConfig


@dataclass
class _Transformer:
    """Width, depth, MLP width of a pre-norm transformer (enough to count its matmuls)."""

    width: int
    depth: int
    mlp: int

    def forward(self, queries: int, keys: int) -> int:
        """One pass of ``queries`` tokens attending to ``keys`` tokens (their own included)."""
        return self.depth * (2 * queries * self.width * 3 * self.width + self.after_kv(queries, keys))

    def after_kv(self, queries: int, keys: int) -> int:
        """One layer's work after its q, k, v projections: attention, output projection, MLP."""
        d = self.width
        return 2 * 2 * queries * keys * d + 2 * queries * d * d + 2 * 2 * queries * d * self.mlp


def _vit_shape(cfg: LocationModelConfig) -> tuple[_Transformer, int, int, int]:
    """(encoder, tokens incl. class/register tokens, patches, patch-embedding FLOPs) of the config's ViT,
    read from a timm model built on the meta device (no memory, no weights)."""
    import timm

    with torch.device("meta"):
        vit = timm.create_model(cfg.vit, pretrained=False, num_classes=0, img_size=cfg.image_size, **cfg.vit_kwargs)
    patches = vit.patch_embed.num_patches
    conv = vit.patch_embed.proj
    embed = 2 * patches * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    mlp = vit.blocks[0].mlp.fc1.out_features
    return _Transformer(vit.embed_dim, len(vit.blocks), mlp), patches + vit.num_prefix_tokens, patches, embed


def _text_width(cfg: LocationModelConfig) -> int:
    """Output width of the config's open_clip text tower (the text projection's input)."""
    import open_clip

    from .pretrained import register_tiny_clip

    register_tiny_clip()
    return open_clip.get_model_config(cfg.clip_model)["embed_dim"]


def training_flops_per_sample(cfg: LocationModelConfig) -> int:
    """FLOPs of one MLE training step (forward + backward) per sample with one box, as the model
    trains it: the prefix (text token + image patches) through GPT-2 once, then the 4 box-step
    inputs (BOS, x1, y1, x2) attending to the cached prefix, logits for the last prefix position and
    the 4 box steps."""
    vit, vit_tokens, patches, embed = _vit_shape(cfg)
    width = cfg.gpt2_n_embd
    gpt2 = _Transformer(width, cfg.gpt2_n_layer, 4 * width)
    prefix = 1 + patches
    vocab = cfg.num_bins + 2
    vit_forward = embed + vit.forward(vit_tokens, vit_tokens)
    projections = 2 * patches * vit.width * width + 2 * _text_width(cfg) * width
    decoder_forward = gpt2.forward(prefix, prefix) + gpt2.forward(4, prefix + 4) + 2 * (1 + 4) * width * vocab
    frozen_vit = cfg.freeze_image_encoder
    # backward: the decoder needs input and weight gradients (2x), except for the prefix pass's
    # outputs nothing reads (its last layer after the k/v projections, its one logit row); the
    # projections need only weight gradients behind a frozen ViT (1x) and both otherwise; a trained
    # ViT's first layer (the patch embedding) needs weight gradients only
    unused = gpt2.after_kv(prefix, prefix) + 2 * width * vocab
    backward = 2 * (decoder_forward - unused) + (1 if frozen_vit else 2) * projections
    if not frozen_vit:
        backward += 2 * (vit_forward - embed) + embed
    return vit_forward + projections + decoder_forward + backward
