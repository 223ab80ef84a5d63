"""Test doubles for GenLoc and for tests written against it: tiny random stand-ins for pretrained
weights, built offline in well under a second, so tests, the examples, the benchmarks and `make
smoke-gpu` exercise the real loading code paths (`from_pretrained` on a local folder, open_clip
`pretrained=<file>`), and the slow reference decoder `LocationModel.sample` is checked against.

- `save_tiny_model`: a random tiny location model folder (`GenLocModel.from_pretrained` loads it).
- `save_tiny_sd_inpainter`, `save_tiny_gligen`: random diffusers inpainting pipelines.
- `save_sd`, `save_sdxl`, `save_kandinsky`, `save_flux_fill`, `save_powerpaint`,
  `save_instruct_pix2pix`: one random pipeline per insertion back-end and the instruction editor, at
  a `NATIVE` (64 px) resolution.
- `save_tiny_open_clip`, `TINY_CLIP_NAME`, `tiny_clip_tokenizer`: a random open_clip model and a
  transformers CLIP tokenizer built from open_clip's bundled BPE file.
- `naive_reference_decode`: no KV cache, no prefix sharing (a measuring stick for the sampler).

diffusers (the `insert` extra) is imported inside the pipeline builders only, so `import
genloc.testing` works on the base install.
"""
from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

TINY_CLIP_NAME = "genloc-tiny-clip"
NATIVE = 64  # native resolution of every tiny inpainting pipeline of `save_sd` ... `save_instruct_pix2pix`


def save_tiny_model(out_dir, seed: int = 0, **config):
    """A random `tiny`-preset location model (``config`` overrides preset fields) written as a model
    folder; returns the folder."""
    from .hub import GenLocModel
    from .config import LocationModelConfig

    torch.manual_seed(seed)
    GenLocModel(LocationModelConfig.preset("tiny", **config)).save_pretrained(out_dir,
                                                                             model_card_kwargs={"model_id": str(out_dir)})
    return Path(out_dir)

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


def _sd_parts(in_channels):
    parts = _tiny_parts({"in_channels": in_channels})
    # latent 32 x VAE stride 2 = 64 px native, so crop/whole-image geometry is exercised at a known size
    parts["unet"].register_to_config(sample_size=NATIVE // 2)
    return parts


def save_sd(out_dir):
    """Stable Diffusion (1.5/2 layout) inpainting."""
    from diffusers import StableDiffusionInpaintPipeline

    StableDiffusionInpaintPipeline(**_sd_parts(9)).save_pretrained(out_dir)
    return Path(out_dir)


def save_sdxl(out_dir):
    """SDXL inpainting: two text encoders, micro-conditioning on sizes ("text_time")."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tok = tiny_clip_tokenizer(d)
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
               max_position_embeddings=77, projection_dim=32, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    unet = UNet2DConditionModel(
        sample_size=NATIVE // 2, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=NATIVE)
    pipe = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**cfg)), text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(), requires_aesthetics_score=False,
    )
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def save_kandinsky(out_dir):
    """Kandinsky 2.2 inpainting as `AutoPipelineForInpainting` loads it: prior + MoVQ decoder combined."""
    from diffusers import (DDIMScheduler, KandinskyV22InpaintCombinedPipeline, PriorTransformer, UNet2DConditionModel,
                           UnCLIPScheduler, VQModel)
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tok = tiny_clip_tokenizer(d)
    unet = UNet2DConditionModel(
        sample_size=NATIVE // 2, in_channels=9, out_channels=8, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        addition_embed_type="image", encoder_hid_dim=32, encoder_hid_dim_type="image_proj", cross_attention_dim=32,
        attention_head_dim=4, resnet_time_scale_shift="scale_shift",
    )
    movq = VQModel(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                   up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, vq_embed_dim=4)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        projection_dim=32, max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, image_size=32, patch_size=16, projection_dim=32,
                                                            intermediate_size=37, num_attention_heads=4, num_hidden_layers=1))
    pipe = KandinskyV22InpaintCombinedPipeline(
        unet=unet, movq=movq, prior_prior=PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1),
        prior_image_encoder=vision, prior_text_encoder=text, prior_tokenizer=tok,
        scheduler=DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
                                        clip_sample_range=10.0),
        prior_image_processor=CLIPImageProcessor(size=32, crop_size=32),
    )
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def save_flux_fill(out_dir):
    """FLUX.1 Fill: CLIP + T5 text encoders (a T5 Unigram tokenizer over letters), packed latents."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tok = tiny_clip_tokenizer(d)
    t5_tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
                         + [(chr(c), -2.0) for c in range(ord("a"), ord("z") + 1)], extra_ids=0)
    pipe = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            projection_dim=32, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)),
        tokenizer=tok,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4)),
        tokenizer_2=t5_tok,
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=20, out_channels=8, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        vae=AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                          latent_channels=2, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                          shift_factor=0.0609, scaling_factor=1.5035),
    )
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def save_powerpaint(out_dir, task_words_in_tokenizer=False):
    """PowerPaint v1 layout: SD inpainting whose text encoder has 30 extra rows (the task words' vectors);
    the tokenizer is the base one (as after copying the release's unet/ and text_encoder/ over a base
    folder) unless `task_words_in_tokenizer`."""
    from diffusers import StableDiffusionInpaintPipeline

    from .inpainters.powerpaint import TASK_WORDS, word_tokens

    parts = _sd_parts(9)
    names = [t for w in TASK_WORDS for t in word_tokens(w)]
    text_encoder = parts["text_encoder"]
    text_encoder.resize_token_embeddings(len(parts["tokenizer"]) + len(names))
    torch.manual_seed(1)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[-len(names):] = torch.randn(len(names), text_encoder.config.hidden_size)
    if task_words_in_tokenizer:
        parts["tokenizer"].add_tokens(names)
    StableDiffusionInpaintPipeline(**parts).save_pretrained(out_dir)
    return Path(out_dir)


def save_instruct_pix2pix(out_dir):
    """InstructPix2Pix-family editor: UNet with 8 input channels (noisy latents + image latents)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    StableDiffusionInstructPix2PixPipeline(**_sd_parts(8)).save_pretrained(out_dir)
    return Path(out_dir)


@torch.no_grad()
def naive_reference_decode(model, prefix: Tensor, n: int, temperature: float = 1.0,
                           top_k: Optional[int] = None, top_p: Optional[float] = None,
                           region: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                           size: Optional[Tensor] = None, aspect_ratio: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """No KV cache, no prefix sharing: every step re-runs GPT-2 over the whole sequence (prefix + BOS
    + tokens so far) for each of the ``B * n`` samples, then masks, filters and draws through the
    model's public pieces. Same draws from ``generator`` as `LocationModel.sample`, so for a given
    seed both must return the same tokens ``[B, n, 4]`` and log-probs ``[B, n]``.
    Call with the model in eval mode.
    """
    from .sampling import draw_tokens, filter_logits

    batch = prefix.shape[0]
    bounds = model.region_bounds(region, batch, prefix.device)
    extents = model.extent_mask(size, aspect_ratio, batch, prefix.device)
    model.check_extents_fit(bounds, extents)
    bounds = bounds.repeat_interleave(n, dim=0)
    extents = None if extents is None else extents.repeat_interleave(n)
    prefix = prefix.repeat_interleave(n, dim=0)
    tokens = torch.empty(batch * n, 0, dtype=torch.long, device=prefix.device)
    total = torch.zeros(batch * n, device=prefix.device)
    for step in range(4):
        inputs = torch.cat([prefix, model.input_embeds(tokens)], dim=1)
        logits = model.decoder(inputs_embeds=inputs, use_cache=False).logits[:, -1]
        logits = model.step_logits(step, logits.float(), tokens)
        logits = logits.masked_fill(~model.allowed_tokens(step, tokens, bounds, extents), float("-inf"))
        token, logp = draw_tokens(filter_logits(logits, temperature, top_k, top_p), generator)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        total += logp
    return tokens.view(batch, n, 4), total.view(batch, n)
