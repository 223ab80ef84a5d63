"""Build the three pretrained parts (timm ViT, open_clip text tower, transformers GPT-2).

Weights come from a local path or the Hugging Face hub cache. We look for them ourselves before
calling any library, because with ``HF_HUB_OFFLINE=1`` the libraries either retry for minutes or
fail with errors that do not say what to download: a missing file raises `PretrainedWeightsError`
at once, naming the weights, what to download, where to put it and which config key to set.
"""
from __future__ import annotations

import math

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

_TINY_CLIP_JSON = Path(__file__).with_name("genloc-tiny-text.json")
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
_GPT2_FILES = ("model.safetensors", "pytorch_model.bin")


class PretrainedWeightsError(FileNotFoundError):
    """Pretrained weights named in the config are neither local nor (when offline) downloadable."""


def hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _cached_file(repo_id: str, filenames: tuple[str, ...]) -> Optional[str]:
    """Path of the first of ``filenames`` present in the local hub cache for ``repo_id``, else None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str):
            return path
    return None


def _missing(what: str, spec: str, key: str, repo_id: str, filenames: tuple[str, ...]) -> PretrainedWeightsError:
    from huggingface_hub.constants import HF_HUB_CACHE

    return PretrainedWeightsError(
        f"{what} weights {spec!r} (config key `{key}`) are not available locally and HF_HUB_OFFLINE=1 "
        f"forbids downloading them. Either download them into the hub cache ({HF_HUB_CACHE}) on a "
        f"machine with network access, e.g. `hf download {repo_id} {filenames[0]}` "
        f"(or run once without HF_HUB_OFFLINE), or save them to a local path and set `{key}` to it; "
        f"set `{key}: null` for random initialisation."
    )


def _first_file(folder: Path, names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        if (folder / name).is_file():
            return str(folder / name)
    return None


# ---------------------------------------------------------------------------------------- timm ViT
def build_vit(name: str, image_size: int, kwargs: dict, weights: Optional[str]) -> nn.Module:
    """timm ViT without classifier head; ``weights``: None, a file/folder (timm format) or a tag."""
    import timm

    common = dict(num_classes=0, img_size=image_size, **kwargs)
    if weights is None:
        return timm.create_model(name, pretrained=False, **common)
    path = Path(weights).expanduser()
    if path.exists():
        file = _first_file(path, _TIMM_FILES) if path.is_dir() else str(path)
        if file is None:
            raise PretrainedWeightsError(
                f"no timm weights ({' or '.join(_TIMM_FILES)}) in folder {path} (config key `vit_weights`)")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=file), **common)
    full = f"{name}.{weights}"
    try:
        hub_id = timm.models.get_pretrained_cfg(full).hf_hub_id
    except Exception as err:  # unknown tag: not a path either
        raise PretrainedWeightsError(
            f"vit_weights={weights!r} is neither an existing path nor a timm pretrained tag of {name!r}") from err
    repo_id = hub_id.rstrip("/")
    file = _cached_file(repo_id, _TIMM_FILES)
    if file is not None:
        return timm.create_model(full, pretrained=True, pretrained_cfg_overlay=dict(file=file), **common)
    if hub_offline():
        raise _missing("timm ViT", full, "vit_weights", repo_id, _TIMM_FILES)
    return timm.create_model(full, pretrained=True, **common)


# ------------------------------------------------------------------------------ open_clip text tower
def register_tiny_clip() -> None:
    """Register our tiny open_clip config (idempotent); its bundled BPE tokenizer works offline."""
    import open_clip

    if open_clip.get_model_config(_TINY_CLIP_JSON.stem) is None:
        open_clip.add_model_config(_TINY_CLIP_JSON)


def build_clip_text(name: str, weights: Optional[str]) -> tuple[nn.Module, object]:
    """(open_clip text tower, its tokenizer). The CLIP image tower is built, loaded and dropped."""
    import open_clip

    register_tiny_clip()
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown open_clip model {name!r} (config key `clip_model`)")
    checkpoint, quick_gelu = None, False
    if weights is not None:
        path = Path(weights).expanduser()
        if path.exists():
            checkpoint = _first_file(path, _OPEN_CLIP_FILES + _TIMM_FILES) if path.is_dir() else str(path)
            if checkpoint is None:
                raise PretrainedWeightsError(
                    f"no open_clip checkpoint ({', '.join(_OPEN_CLIP_FILES)}) in folder {path} "
                    f"(config key `clip_weights`)")
        else:
            cfg = open_clip.get_pretrained_cfg(name, weights)
            if not cfg:
                raise PretrainedWeightsError(
                    f"clip_weights={weights!r} is neither an existing path nor an open_clip pretrained tag of "
                    f"{name!r}; known tags: {open_clip.list_pretrained_tags_by_model(name)}")
            quick_gelu = bool(cfg.get("quick_gelu", False))
            repo_id = cfg.get("hf_hub", "").strip("/")
            checkpoint = _cached_file(repo_id, _OPEN_CLIP_FILES) if repo_id else None
            if checkpoint is None:
                if hub_offline():
                    raise _missing("open_clip", f"{name}/{weights}", "clip_weights", repo_id or cfg.get("url"),
                                   _OPEN_CLIP_FILES)
                checkpoint = open_clip.download_pretrained(cfg)
    clip = open_clip.create_model(name, pretrained=checkpoint, force_custom_text=True, force_quick_gelu=quick_gelu)
    return clip.text, open_clip.get_tokenizer(name)


# ------------------------------------------------------------------------------------------ GPT-2
# torch's scaled_dot_product_attention (flash / memory-efficient kernels on a GPU), named rather than
# left to the library's default
ATTENTION = "sdpa"


def cache_field() -> str:
    """The name of GPT-2's KV-cache argument and output field: transformers renamed ``past_key_values``
    to ``cache`` during 5.x, and the releases our range covers use either one."""
    from dataclasses import fields

    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    return "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithCrossAttentions)} else "past_key_values"


def attention_scaling(attn) -> float:
    """The factor GPT-2's attention scores are multiplied by: transformers 5 keeps it as ``attn.scaling``;
    4.x computes it in the forward from the same settings (1/sqrt(head_dim), then 1/(layer + 1) if set)."""
    if hasattr(attn, "scaling"):
        return attn.scaling
    scaling = attn.head_dim ** -0.5 if attn.scale_attn_weights else 1.0
    return scaling / float(attn.layer_idx + 1) if attn.scale_attn_by_inverse_layer_idx else scaling


def build_gpt2(n_layer: int, n_embd: int, n_head: int, dropout: float, vocab_size: int,
               n_positions: int, weights: Optional[str]) -> nn.Module:
    """transformers GPT2LMHeadModel with ``vocab_size`` tokens and at least ``n_positions`` positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if weights is None:
        config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                            n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, attn_implementation=ATTENTION)
        model = GPT2LMHeadModel(config)
        ordinal_init(model.get_input_embeddings(), vocab_size - 2)
        return model
    path = Path(weights).expanduser()
    if path.exists():
        if _first_file(path, _GPT2_FILES) is None or not (path / "config.json").is_file():
            raise PretrainedWeightsError(
                f"{path} is not a GPT-2 `save_pretrained` folder (config.json + {' or '.join(_GPT2_FILES)}); "
                f"config key `gpt2_weights`")
        source, local_only = str(path), True
    else:
        cached = _cached_file(weights, _GPT2_FILES) and _cached_file(weights, ("config.json",))
        if not cached and hub_offline():
            raise _missing("GPT-2", weights, "gpt2_weights", weights, _GPT2_FILES)
        source, local_only = weights, bool(cached)
    model = GPT2LMHeadModel.from_pretrained(source, local_files_only=local_only, resid_pdrop=dropout,
                                            embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation=ATTENTION)
    c = model.config
    if (c.n_layer, c.n_embd, c.n_head) != (n_layer, n_embd, n_head):
        raise ValueError(
            f"GPT-2 weights {weights!r} have n_layer/n_embd/n_head = {c.n_layer}/{c.n_embd}/{c.n_head} but the "
            f"config asks for {n_layer}/{n_embd}/{n_head}; set gpt2_n_layer/gpt2_n_embd/gpt2_n_head to match")
    if c.n_positions < n_positions:
        raise ValueError(f"GPT-2 weights {weights!r} have {c.n_positions} positions, the prefix needs {n_positions}")
    if c.vocab_size != vocab_size:  # a language model's vocabulary -> our box vocabulary (new rows)
        model.resize_token_embeddings(vocab_size)
        ordinal_init(model.get_input_embeddings(), vocab_size - 2)
    return model


@torch.no_grad()
def ordinal_init(embedding: nn.Embedding, num_bins: int) -> None:
    """Start coordinate-token embeddings as sinusoids of the bin's value (norms kept as initialised).

    Nearby bins get similar vectors and "bin + offset" is a rotation of them, so relations such as
    x2 = x1 + width are learnable from the first steps; random rows make the decoder learn the
    order of 64-256 unrelated symbols first (measured on toy scenes: README, design choices). The
    output head is tied to these embeddings, so predictions start ordinal as well.
    """
    weight = embedding.weight
    dim = weight.shape[1]
    value = (torch.arange(num_bins, dtype=torch.float64) + 0.5) / num_bins
    freqs = torch.logspace(0, math.log10(max(num_bins / 2, 1.0)), dim // 2, dtype=torch.float64) * math.pi
    angles = value[:, None] * freqs[None]
    features = torch.zeros(num_bins, dim, dtype=torch.float64)
    features[:, 0:2 * (dim // 2):2], features[:, 1:2 * (dim // 2):2] = angles.sin(), angles.cos()
    norm = weight[:num_bins].norm(dim=1, keepdim=True).mean()
    features = features / features.norm(dim=1, keepdim=True) * norm
    weight[:num_bins] = features.to(weight.dtype)
