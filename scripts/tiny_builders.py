"""Tiny random stand-ins for pretrained weights (no downloads): diffusers inpainting pipelines and
open_clip models, built in well under a second so tests can exercise the real loading code paths
(`from_pretrained` on a local folder, open_clip `pretrained=<file>`)."""
import gzip
import json
import tempfile
from pathlib import Path

import torch

TINY_CLIP_NAME = "genloc-tiny-clip"


def tiny_clip_tokenizer(out_dir, num_merges=500):
    """transformers `CLIPTokenizer` built from open_clip's bundled BPE file (transformers ships no
    vocab offline). Only the first `num_merges` merges are kept so the text encoder stays tiny;
    `model_max_length=77` is required by diffusers (else OverflowError)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : num_merges + 1]
    merges = [tuple(m.split()) for m in lines]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )


def _tiny_parts(unet_kwargs):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = tiny_clip_tokenizer(tok_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, **unet_kwargs,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=64,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_sd_inpainter(out_dir):
    """Random `StableDiffusionInpaintPipeline` (UNet with 9 input channels) saved to `out_dir`."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(**_tiny_parts({"in_channels": 9}))
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def save_tiny_gligen(out_dir):
    """Random box-conditioned inpainting `StableDiffusionGLIGENPipeline` (gated attention, position
    net, 9-channel UNet like gligen-inpainting-text-box) saved to `out_dir`."""
    from diffusers import StableDiffusionGLIGENPipeline

    pipe = StableDiffusionGLIGENPipeline(**_tiny_parts({"in_channels": 9, "attention_type": "gated"}))
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def save_tiny_open_clip(out_dir):
    """Tiny random open_clip model: registers config `TINY_CLIP_NAME` and writes its weights.

    Returns `(config_json_path, weights_path)`; load with `pretrained=weights_path`."""
    import open_clip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    cfg_path = out_dir / f"{TINY_CLIP_NAME}.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    weights = out_dir / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    return cfg_path, weights
