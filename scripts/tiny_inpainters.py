"""Tiny random pipelines for every insertion back-end and the instruction editor, built offline with the
libraries' own classes and written with `save_pretrained`, so tests load them through the same code
path as a user's folder. All work at a 64 px native resolution and take well under a second to run."""
import tempfile
from pathlib import Path

import torch

from scripts.tiny_builders import _tiny_parts, tiny_clip_tokenizer

NATIVE = 64  # native resolution of every tiny pipeline here


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

    from genloc.inpainters.powerpaint import TASK_WORDS, word_tokens

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

