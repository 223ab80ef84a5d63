"""Typed, validated configuration of the location model, with the `tiny` and `paper` presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

# Name under which the tiny open_clip text tower is registered (see genloc/genloc-tiny-text.json).
TINY_CLIP_MODEL = "genloc-tiny-text"


class ArgumentError(ValueError):
    """An argument out of its range. Constructors raise it from their own checks; the training config
    (configs/schema.py) calls the same checks before building anything and names the config key."""

    def __init__(self, name: str, value: Any, allowed: str):
        super().__init__(f"{name}: {value!r} is out of range; allowed: {allowed}")
        self.name, self.value, self.allowed = name, value, allowed


@dataclass
class LocationModelConfig:
    """Everything needed to build a `LocationModel`; stored in checkpoints via `to_dict()`.

    Weight fields (`vit_weights`, `clip_weights`, `gpt2_weights`) are ``None`` for random
    initialisation (never touches the network), a local path, or a hub name: a timm pretrained tag
    (e.g. ``"augreg2_in21k_ft_in1k"``), an open_clip pretrained tag (e.g. ``"openai"``) and a
    Hugging Face model id for ``GPT2LMHeadModel.from_pretrained`` respectively.

    ``pretrained=False`` is random initialisation of every part, spelled once: `preset` then drops
    the preset's weight fields, and a weight field set beside it is an error. Configs saved before
    this field existed load as ``pretrained=True`` (their weight fields meant what they say).
    """

    image_size: int = 64
    num_bins: int = 64
    # False: random initialisation of every part (the *_weights fields must be None)
    pretrained: bool = True
    # timm image encoder; vit_kwargs are passed to timm.create_model (patch_size, embed_dim, ...)
    vit: str = "vit_tiny_patch16_224"
    vit_kwargs: dict = field(default_factory=dict)
    vit_weights: Optional[str] = None
    # open_clip model whose text tower encodes the prompt (its image tower is discarded)
    clip_model: str = TINY_CLIP_MODEL
    clip_weights: Optional[str] = None
    # transformers GPT-2 decoder; vocabulary = box tokenizer vocabulary
    gpt2_n_layer: int = 3
    gpt2_n_embd: int = 128
    gpt2_n_head: int = 4
    gpt2_dropout: float = 0.1
    gpt2_weights: Optional[str] = None
    # read the x2/y2 outputs as the box's width/height and embed the width at the x2 input (ours;
    # see genloc/location_model.py); the tokens and the distribution's meaning are unchanged
    relative_extents: bool = False
    freeze_image_encoder: bool = True
    freeze_text_encoder: bool = True
    prompt_template: str = "a photo of a {category}"
    # torch.compile the GPT-2 decoder in place (state_dict keys unchanged); a GPU speed option
    compile_decoder: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"LocationModelConfig: {msg}")

        for name in ("image_size", "num_bins", "gpt2_n_layer", "gpt2_n_embd", "gpt2_n_head"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive int, got {value!r}")
        need(self.num_bins >= 2, f"num_bins must be >= 2, got {self.num_bins}")
        need(self.gpt2_n_embd % self.gpt2_n_head == 0,
             f"gpt2_n_embd ({self.gpt2_n_embd}) must be divisible by gpt2_n_head ({self.gpt2_n_head})")
        need(isinstance(self.gpt2_dropout, (int, float)) and 0.0 <= self.gpt2_dropout < 1.0,
             f"gpt2_dropout must be in [0, 1), got {self.gpt2_dropout!r}")
        for name in ("vit", "clip_model"):
            need(isinstance(getattr(self, name), str) and getattr(self, name),
                 f"{name} must be a non-empty model name, got {getattr(self, name)!r}")
        need(isinstance(self.vit_kwargs, dict), f"vit_kwargs must be a dict, got {self.vit_kwargs!r}")
        bad = [k for k in self.vit_kwargs if not (isinstance(k, str) and k.isidentifier())]
        need(not bad, f"vit_kwargs keys must be argument names, got {bad} (on the command line write "
                      f"'model.vit_kwargs={{patch_size: 16}}' with a space after each colon)")
        need("img_size" not in self.vit_kwargs and "num_classes" not in self.vit_kwargs,
             "vit_kwargs must not set img_size/num_classes (use image_size; the head is removed)")
        patch = self.vit_kwargs.get("patch_size")
        need(patch is None or self.image_size % patch == 0,
             f"image_size ({self.image_size}) must be a multiple of vit_kwargs.patch_size ({patch})")
        for name in WEIGHT_FIELDS:
            value = getattr(self, name)
            need(value is None or (isinstance(value, str) and value),
                 f"{name} must be None (random init) or a non-empty path/name, got {value!r}")
        need(isinstance(self.pretrained, bool), "pretrained must be a bool")
        loaded = [name for name in WEIGHT_FIELDS if getattr(self, name) is not None]
        need(self.pretrained or not loaded,
             f"pretrained=False (random init) but {loaded} set; drop them or set pretrained=True")
        for name in ("freeze_image_encoder", "freeze_text_encoder", "compile_decoder", "relative_extents"):
            need(isinstance(getattr(self, name), bool), f"{name} must be a bool")
        need(isinstance(self.prompt_template, str) and "{category}" in self.prompt_template,
             f"prompt_template must contain '{{category}}', got {self.prompt_template!r}")

    # ------------------------------------------------------------------ presets / serialisation
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LocationModelConfig":
        """`tiny` (CPU tests, random weights) or `paper` (ViT-B/16, CLIP ViT-B/32 text, GPT-2 small).

        `paper` defaults to pretrained weights from the hub cache; pass ``pretrained=False`` for random
        initialisation (the preset's weight fields are dropped). A weight field in ``overrides``
        means ``pretrained=True`` unless ``pretrained`` is given too (both at once is an error).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        base = dict(PRESETS[name])
        if overrides.get("pretrained") is False:
            base.update(dict.fromkeys(WEIGHT_FIELDS))
        elif any(overrides.get(key) is not None for key in WEIGHT_FIELDS):
            base["pretrained"] = True
        return cls.from_dict({**base, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LocationModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LocationModelConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        if "vit_kwargs" in data:
            data["vit_kwargs"] = dict(data["vit_kwargs"])  # e.g. an OmegaConf DictConfig
        return cls(**data)


WEIGHT_FIELDS = ("vit_weights", "clip_weights", "gpt2_weights")

PRESETS: dict[str, dict] = {
    # Seconds per step on CPU: 64 px ViT (patch 16 -> 16 patches, depth 2, width 128), a 2-layer
    # 64-wide open_clip text tower, a 3-layer 128-wide GPT-2, 64 bins. Random weights. Patch 16
    # (not 8) measured on toy scenes: 0.32 vs 0.21 plausible after 600 steps, at half the step time.
    "tiny": dict(
        pretrained=False,
        image_size=64,
        num_bins=64,
        vit="vit_tiny_patch16_224",
        vit_kwargs=dict(patch_size=16, embed_dim=128, depth=2, num_heads=4),
        vit_weights=None,
        clip_model=TINY_CLIP_MODEL,
        clip_weights=None,
        gpt2_n_layer=3,
        gpt2_n_embd=128,
        gpt2_n_head=4,
        gpt2_weights=None,
    ),
    # The paper's encoders/decoder; num_bins=256 is our choice (the paper does not state it).
    "paper": dict(
        pretrained=True,
        image_size=224,
        num_bins=256,
        vit="vit_base_patch16_224",
        vit_kwargs={},
        vit_weights="augreg2_in21k_ft_in1k",
        clip_model="ViT-B-32",
        clip_weights="openai",
        gpt2_n_layer=12,
        gpt2_n_embd=768,
        gpt2_n_head=12,
        gpt2_weights="openai-community/gpt2",
    ),
}
