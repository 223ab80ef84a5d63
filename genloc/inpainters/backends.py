"""Mask-conditioned back-ends that diffusers ships: `sd` (AutoPipelineForInpainting), `flux-fill`
(FluxFillPipeline) and `gligen` (box-grounded GLIGEN inpainting, deprecated upstream)."""
from __future__ import annotations

import json

import torch

from genloc.inpainters.base import (BackendFolderError, Inpainter, call_accepted, default_dtype,
                                    open_pipeline, require_pipeline_folder, to_pil)

SD_LAYOUT = ("a diffusers inpainting pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
             "scheduler/; e.g. stable-diffusion-inpainting, stable-diffusion-2-inpainting, "
             "stable-diffusion-xl-1.0-inpainting-0.1 or kandinsky-2-2-decoder-inpaint saved with save_pretrained)")
FLUX_LAYOUT = ("a FluxFillPipeline folder (model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, "
               "tokenizer/, tokenizer_2/, scheduler/; e.g. black-forest-labs/FLUX.1-Fill-dev saved with save_pretrained)")
GLIGEN_LAYOUT = ("a StableDiffusionGLIGENPipeline inpainting folder (model_index.json, unet/ with 9 input channels "
                 "and gated attention, vae/, text_encoder/, tokenizer/, scheduler/; e.g. "
                 "masterful/gligen-1-4-inpainting-text-box saved with save_pretrained)")


def pipeline_class_name(folder) -> str:
    return json.loads((folder / "model_index.json").read_text()).get("_class_name", "")


class SDInpainter(Inpainter):
    """Any pipeline `AutoPipelineForInpainting` maps: Stable Diffusion 1.5/2 and SDXL inpainting, Kandinsky."""

    name = "sd"

    @classmethod
    def load(cls, folder, *, device="cpu", dtype=None, **options):
        from diffusers import AutoPipelineForInpainting

        folder = require_pipeline_folder(folder, cls.name, SD_LAYOUT)
        try:
            pipe = open_pipeline(AutoPipelineForInpainting, folder, dtype or default_dtype(device))
        except (ValueError, OSError) as err:
            raise BackendFolderError(f"{cls.name} back-end: cannot load {folder} ({err}); expected {SD_LAYOUT}") from None
        return cls(pipe.to(device), **options)

    def native_resolution(self) -> int:
        movq = getattr(self.pipe, "movq", None)  # Kandinsky: a MoVQ decoder instead of a VAE
        if movq is not None:
            return int(self.pipe.unet.config.sample_size) * 2 ** (len(movq.config.block_out_channels) - 1)
        return super().native_resolution()

    @property
    def multiple(self) -> int:
        movq = getattr(self.pipe, "movq", None)
        return max(8, 2 ** (len(movq.config.block_out_channels) - 1)) if movq is not None else super().multiple

    def generate(self, canvas, mask, box_norm, prompt, category, generator):
        w, h = canvas.size
        out = call_accepted(self.pipe.__call__, prompt=prompt, image=canvas, mask_image=mask, height=h, width=w,
                            strength=1.0, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                            generator=generator, output_type="np")
        return to_pil(out.images[0])


class FluxFillInpainter(Inpainter):
    """FLUX.1 Fill: a rectified-flow transformer conditioned on the masked image (guidance-distilled,
    hence its large default guidance)."""

    name = "flux-fill"
    default_guidance = 30.0

    @classmethod
    def load(cls, folder, *, device="cpu", dtype=None, **options):
        from diffusers import FluxFillPipeline

        folder = require_pipeline_folder(folder, cls.name, FLUX_LAYOUT, parts=("transformer",))
        if pipeline_class_name(folder) != "FluxFillPipeline":
            raise BackendFolderError(f"{cls.name} back-end: {folder} holds a {pipeline_class_name(folder)!r}, "
                                     f"not a FluxFillPipeline; expected {FLUX_LAYOUT}")
        if dtype is None and torch.device(device).type == "cuda":
            dtype = torch.bfloat16  # FLUX is trained in bf16; fp16 overflows
        pipe = open_pipeline(FluxFillPipeline, folder, dtype or torch.float32)
        return cls(pipe.to(device), **options)

    def native_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)

    @property
    def multiple(self) -> int:
        return max(8, 2 * int(self.pipe.vae_scale_factor))  # latents are packed in 2x2 patches

    def generate(self, canvas, mask, box_norm, prompt, category, generator):
        w, h = canvas.size
        out = self.pipe(prompt=prompt, image=canvas, mask_image=mask, height=h, width=w,
                        num_inference_steps=self.steps, guidance_scale=self.guidance_scale, generator=generator,
                        output_type="np")
        return to_pil(out.images[0])


class GLIGENInpainter(Inpainter):
    """GLIGEN box-grounded inpainting: the phrase is tied to the box, and GLIGEN repaints the box.

    It works on a square canvas of the VAE's sample size whatever `resolution` says (the pipeline
    centre-crops anything else), so the context is stretched to that square; normalised boxes
    survive the stretch. `resolution` still decides crop vs whole image in `auto` mode."""

    name = "gligen"
    deprecated = ("diffusers moved StableDiffusionGLIGENPipeline to pipelines/deprecated (huggingface/diffusers "
                  "PR #13157): it is no longer tested upstream and may be removed")

    @classmethod
    def load(cls, folder, *, device="cpu", dtype=None, **options):
        from diffusers import StableDiffusionGLIGENPipeline

        folder = require_pipeline_folder(folder, cls.name, GLIGEN_LAYOUT, parts=("unet",))
        if pipeline_class_name(folder) != "StableDiffusionGLIGENPipeline":
            raise BackendFolderError(f"{cls.name} back-end: {folder} holds a {pipeline_class_name(folder)!r}; "
                                     f"expected {GLIGEN_LAYOUT}")
        pipe = open_pipeline(StableDiffusionGLIGENPipeline, folder, dtype or default_dtype(device))
        if pipe.unet.config.in_channels != 9:
            raise BackendFolderError(f"{cls.name} back-end: {folder} is GLIGEN generation (UNet with "
                                     f"{pipe.unet.config.in_channels} input channels), not inpainting; expected {GLIGEN_LAYOUT}")
        return cls(pipe.to(device), **options)

    def native_resolution(self) -> int:
        return int(self.pipe.vae.config.sample_size)

    def canvas_size(self, size):
        s = self.native_resolution()
        return (s, s)

    def generate(self, canvas, mask, box_norm, prompt, category, generator):
        s = canvas.size[0]
        # the pipeline encodes the inpainting image with the global RNG: seed it from our generator, leave it as it was
        cuda = [self.pipe.device] if self.pipe.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(generator.initial_seed())
            out = self.pipe(prompt=prompt, gligen_phrases=[category], gligen_boxes=[list(box_norm)],
                            gligen_inpaint_image=canvas, gligen_scheduled_sampling_beta=1.0, height=s, width=s,
                            num_inference_steps=self.steps, guidance_scale=self.guidance_scale, generator=generator,
                            output_type="np")
        return to_pil(out.images[0])

