"""Instruction-editor baselines (InstructPix2Pix, MagicBrush ports, Paint-by-Inpaint's models): the
whole image plus "add a {category}" -> an edited image, with no mask and no box.

To score them like the mask-based methods (background SSIM outside the inserted region, CLIP
score of the region), the inserted region is recovered from the edit (`changed_region`):

1. difference map: per-pixel max over RGB of |edit - input| / 255, both at the editor's canvas
   (so resampling to and from the canvas never counts as a change);
2. Gaussian blur (`blur_sigma` canvas px) to merge the speckle of re-generated texture;
3. threshold (`threshold`, in [0, 1]);
4. cleaning: binary opening (`open_px`) drops isolated specks, closing (`close_px`) fills holes;
5. the largest connected component is the inserted object; its bounding box, scaled to the
   input's pixels, is the region the metrics use. No component left: no region (`None`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from genloc.inpainters.base import (BackendFolderError, DEFAULT_STEPS, default_dtype, open_pipeline,
                                    require_pipeline_folder, to_pil)
from genloc.inpainting import working_size

EDIT_TEMPLATE = "add a {}"
LAYOUT = ("a StableDiffusionInstructPix2PixPipeline folder (model_index.json, unet/ with 8 input channels, vae/, "
          "text_encoder/, tokenizer/, scheduler/; e.g. timbrooks/instruct-pix2pix or a MagicBrush / Paint-by-Inpaint "
          "port saved with save_pretrained)")


@dataclass(frozen=True)
class DiffRegion:
    """Settings of the changed-region detector (module docstring); values are for the editor's canvas."""

    threshold: float = 0.15
    blur_sigma: float = 2.0
    open_px: int = 2
    close_px: int = 6


def changed_region(before: np.ndarray, after: np.ndarray, cfg: DiffRegion = DiffRegion()) -> np.ndarray:
    """`bool[h, w]` mask of the largest cleaned changed region between two `uint8[h, w, 3]` pictures."""
    from scipy import ndimage

    if before.shape != after.shape:
        raise ValueError(f"pictures differ in shape: {before.shape} vs {after.shape}")
    diff = np.abs(after.astype(np.float32) - before.astype(np.float32)).max(axis=-1) / 255.0
    if cfg.blur_sigma > 0:
        diff = ndimage.gaussian_filter(diff, cfg.blur_sigma)
    mask = diff > cfg.threshold
    if cfg.open_px > 0:
        mask = ndimage.binary_opening(mask, structure=np.ones((2 * cfg.open_px + 1,) * 2, bool))
    if cfg.close_px > 0:
        # pad so that closing does not erode regions touching the border
        p = cfg.close_px
        mask = ndimage.binary_closing(np.pad(mask, p, mode="edge"), structure=np.ones((2 * p + 1,) * 2, bool))[p:-p, p:-p]
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


@dataclass
class Edit:
    image: Image.Image  # the edit at the input's size
    region: tuple[float, float, float, float] | None  # changed region's bounding box in input pixels (None: none found)
    region_mask: np.ndarray  # bool[h, w] at the input's size
    prompt: str
    canvas: tuple[int, int]
    seed: int

    def record(self) -> dict:
        return {"region": None if self.region is None else list(self.region), "prompt": self.prompt,
                "canvas": list(self.canvas), "seed": self.seed}


class InstructEditor:
    """`StableDiffusionInstructPix2PixPipeline` on the whole image (resized to `resolution` long side)."""

    name = "instruct-pix2pix"

    @classmethod
    def load(cls, folder, *, device="cpu", dtype=None, **options):
        from diffusers import StableDiffusionInstructPix2PixPipeline

        folder = require_pipeline_folder(folder, cls.name, LAYOUT, parts=("unet",))
        pipe = open_pipeline(StableDiffusionInstructPix2PixPipeline, folder, dtype or default_dtype(device))
        if pipe.unet.config.in_channels != 8:
            raise BackendFolderError(f"{cls.name}: {folder}/unet has {pipe.unet.config.in_channels} input channels, "
                                     f"an instruction editor's has 8; expected {LAYOUT}")
        return cls(pipe.to(device), **options)

    def __init__(self, pipe, *, steps: int = DEFAULT_STEPS, guidance_scale: float = 7.5,
                 image_guidance_scale: float = 1.5, resolution: int | None = None, template: str = EDIT_TEMPLATE,
                 region: DiffRegion = DiffRegion()):
        self.pipe = pipe
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.image_guidance_scale = image_guidance_scale
        self.resolution = resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        self.template = template
        self.region_cfg = region

    def edit(self, image, category: str, *, seed: int = 0) -> Edit:
        image = image.convert("RGB")
        canvas_size = working_size(image.size, self.resolution, max(8, int(self.pipe.vae_scale_factor)))
        canvas = image.resize(canvas_size, Image.BICUBIC)
        prompt = self.template.format(category)
        out = self.pipe(prompt=prompt, image=canvas, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                        image_guidance_scale=self.image_guidance_scale,
                        generator=torch.Generator().manual_seed(seed), output_type="np")
        edited = to_pil(out.images[0])
        if edited.size != canvas_size:
            edited = edited.resize(canvas_size, Image.BICUBIC)
        mask = changed_region(np.asarray(canvas), np.asarray(edited), self.region_cfg)
        full_mask = np.asarray(Image.fromarray(mask).resize(image.size, Image.NEAREST))
        region = None
        if mask.any():
            ys, xs = np.nonzero(mask)
            sx, sy = image.size[0] / canvas_size[0], image.size[1] / canvas_size[1]
            region = (xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy)
            region = tuple(float(v) for v in region)
        return Edit(edited.resize(image.size, Image.BICUBIC), region, full_mask, prompt, canvas_size, seed)
