"""Object insertion into a chosen box with a diffusers inpainting pipeline.

Pure code (no Lightning). Boxes here are *pixel* `x1,y1,x2,y2` of the input image: this is the
edge of the framework where pixels appear (docs/ARCHITECTURE.md). The pipeline works at its own
resolution; its output is resized back and pasted into the original only where the mask is
non-zero, so every pixel outside the mask is bit-identical to the input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .boxes import normalise, pixel_rect, validate_boxes

PROMPT_TEMPLATE = "a photo of a {}"
BACKENDS = ("sd", "gligen")
# The paper's positional instructions, as normalised x1,y1,x2,y2 regions.
REGIONS = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
}


def parse_region(spec: str | None, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """`left|right|top|bottom` or pixel `x1,y1,x2,y2` of an image of `size=(w, h)` -> normalised region."""
    if spec is None:
        return None
    if spec in REGIONS:
        return REGIONS[spec]
    try:
        box = [float(v) for v in spec.split(",")]
        if len(box) != 4:
            raise ValueError
    except ValueError:
        raise ValueError(f"region {spec!r} is neither one of {sorted(REGIONS)} nor pixels x1,y1,x2,y2") from None
    check = validate_boxes(box, size)
    check.raise_first(f"region {spec!r}")
    return tuple(normalise(check.clipped, size).tolist())


def mask_rect(box, size: tuple[int, int], dilate: int = 0, feather: int = 0) -> tuple[int, int, int, int]:
    """The pixel rectangle an insertion may change: the box grown by `dilate + feather`, clipped."""
    w, h = size
    x0, y0, x1, y1 = pixel_rect(box, size)
    g = dilate + feather
    return max(x0 - g, 0), max(y0 - g, 0), min(x1 + g, w), min(y1 + g, h)


def box_alpha(box, size: tuple[int, int], dilate: int = 0, feather: int = 0) -> np.ndarray:
    """Blend weights `float32[h, w]`: 1 on the box grown by `dilate` px, falling linearly to 0 over
    `feather` px outside it (soft seams), exactly 0 beyond `mask_rect`."""
    w, h = size
    x0, y0, x1, y1 = pixel_rect(box, size)
    x0, y0, x1, y1 = x0 - dilate, y0 - dilate, x1 + dilate, y1 + dilate
    xs, ys = np.arange(w), np.arange(h)
    dx = np.maximum(np.maximum(x0 - xs, xs - (x1 - 1)), 0)
    dy = np.maximum(np.maximum(y0 - ys, ys - (y1 - 1)), 0)
    dist = np.maximum(dx[None, :], dy[:, None])  # Chebyshev distance to the grown box
    return np.clip(1.0 - dist / (feather + 1.0), 0.0, 1.0).astype(np.float32)


def composite(original: Image.Image, generated: Image.Image, alpha: np.ndarray) -> Image.Image:
    """Alpha-blend `generated` over `original` (same size); pixels with alpha 0 are copied untouched."""
    orig = np.asarray(original.convert("RGB"))
    gen = np.asarray(generated.convert("RGB").resize(original.size, Image.BICUBIC))
    a = alpha[..., None]
    blend = np.rint(a * gen + (1.0 - a) * orig).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.where(a > 0, blend, orig))


def working_size(size: tuple[int, int], resolution: int, multiple: int = 8) -> tuple[int, int]:
    """Pipeline canvas: long side `resolution`, aspect kept up to rounding to `multiple` (VAE stride)."""
    w, h = size
    scale = resolution / max(w, h)
    return tuple(max(multiple, int(round(v * scale / multiple)) * multiple) for v in (w, h))


def prompt_for(category: str, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(category)


def load_inpainter(path: str | Path, backend: str = "sd", device: str | torch.device = "cpu", dtype=None):
    """Load a local diffusers pipeline folder (never the hub): `sd` -> `AutoPipelineForInpainting`
    (any Stable Diffusion inpainting checkpoint), `gligen` -> box-conditioned GLIGEN inpainting."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    if backend == "sd":
        from diffusers import AutoPipelineForInpainting as cls
    elif backend == "gligen":
        from diffusers import StableDiffusionGLIGENPipeline as cls
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype is None:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class Insertion:
    image: Image.Image  # the edit, same size as the input
    box: tuple[float, float, float, float]  # requested box, pixels
    mask_box: tuple[int, int, int, int]  # pixels outside this rectangle are unchanged
    prompt: str


def insert_object(pipe, image: Image.Image, box, category: str, *, backend: str = "sd", dilate: int = 0,
                  feather: int = 0, steps: int = 30, resolution: int = 512, guidance_scale: float = 7.5,
                  generator: torch.Generator | None = None, prompt_template: str = PROMPT_TEMPLATE) -> Insertion:
    """Inpaint `category` into pixel `box` of `image` and paste the result back outside-mask-exact."""
    image = image.convert("RGB")
    size = image.size
    alpha = box_alpha(box, size, dilate, feather)
    rect = mask_rect(box, size, dilate, feather)
    prompt = prompt_for(category, prompt_template)
    common = dict(num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator, output_type="np")
    if backend == "sd":
        ww, wh = working_size(size, resolution)
        mask = Image.fromarray(((alpha > 0) * 255).astype(np.uint8)).resize((ww, wh), Image.BILINEAR)
        mask = mask.point(lambda v: 255 if v > 0 else 0)  # any touched working pixel is repainted
        out = pipe(prompt=prompt, image=image.resize((ww, wh), Image.BICUBIC), mask_image=mask,
                   height=wh, width=ww, strength=1.0, **common).images[0]
    elif backend == "gligen":
        # GLIGEN inpaints a square canvas of the VAE's sample size; normalised boxes survive the stretch.
        s = int(pipe.vae.config.sample_size)
        grounding = normalise(rect, size).tolist()
        out = pipe(prompt=prompt, gligen_phrases=[category], gligen_boxes=[grounding],
                   gligen_inpaint_image=image.resize((s, s), Image.BICUBIC), gligen_scheduled_sampling_beta=1.0,
                   height=s, width=s, **common).images[0]
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    generated = Image.fromarray((np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8))
    return Insertion(composite(image, generated, alpha), tuple(float(v) for v in box), rect, prompt)
