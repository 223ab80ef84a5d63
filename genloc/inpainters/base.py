"""The one insertion interface every back-end implements, and the crop/whole-image plumbing they share.

A back-end only has to turn a canvas (an RGB picture at its working size), a canvas mask and a
prompt into a generated canvas (`Inpainter.generate`). `Inpainter.insert` does the rest the same
way for all of them: build the mask from a box or take a free-form mask, pick the context (a crop
around the mask, or the whole image), resize it to the back-end's canvas, generate, resize back and
paste with a feathered alpha that is exactly 0 outside the mask, so pixels outside the mask are
bit-identical to the input in every mode.
"""
from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from genloc.choices import CROP_MARGIN, DEFAULT_STEPS, MODES  # noqa: F401 (re-exported)
from genloc.inpainting import (PROMPT_TEMPLATE, box_mask, composite, context_rect, feathered_alpha, grow_mask,
                               mask_bbox, prompt_for, working_size)


class BackendFolderError(FileNotFoundError):
    """A back-end folder that cannot be loaded; the message names the folder and the layout expected."""


def hub_folder(source, backend: str, layout: str) -> Path:
    """A local folder as given; a Hub id (``owner/name``) that is no local folder -> its snapshot in the
    hub cache, downloaded unless HF_HUB_OFFLINE is set (then a one-line error saying how to get it)."""
    path = Path(source).expanduser()
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    from genloc.pretrained import hub_offline

    offline = hub_offline()
    try:
        return Path(snapshot_download(str(source), local_files_only=offline))
    except HFValidationError:
        return path  # not a Hub id after all: the folder check names it
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if not offline:
            raise BackendFolderError(f"{backend} back-end: could not download {source!r} from the Hub (no network?); "
                                     f"pass a local folder: {layout}") from None
        raise BackendFolderError(
            f"{backend} back-end: {source!r} is not a local folder and not in the hub cache, and HF_HUB_OFFLINE=1 "
            f"forbids downloading it: run once with network access and without HF_HUB_OFFLINE (or `hf download "
            f"{source}`), or pass a local folder") from None
    except RepositoryNotFoundError:
        raise BackendFolderError(f"{backend} back-end: Hub repo {source!r} not found (or private: log in with "
                                 "`hf auth login`)") from None


def require_pipeline_folder(folder, backend: str, layout: str, parts=()) -> Path:
    """Check a diffusers folder (local, or a Hub id's snapshot) before any loading, so a wrong path fails in one line."""
    folder = hub_folder(folder, backend, layout)
    if not folder.is_dir():
        raise BackendFolderError(f"{backend} back-end: folder {folder} does not exist; expected {layout}")
    missing = [p for p in ("model_index.json", *parts) if not (folder / p).exists()]
    if not missing:  # every component model_index.json names must be there (else diffusers names the root)
        try:
            index = json.loads((folder / "model_index.json").read_text())
        except (OSError, ValueError) as err:
            raise BackendFolderError(f"{backend} back-end: {folder / 'model_index.json'} is unreadable ({err}); "
                                     f"expected {layout}") from None
        missing = [f"{name}/" for name, value in index.items() if not name.startswith("_")
                   and isinstance(value, list) and len(value) == 2 and all(value) and not (folder / name).is_dir()]
    if missing:
        raise BackendFolderError(f"{backend} back-end: {folder} lacks {', '.join(missing)}; expected {layout}")
    return folder


def open_pipeline(pipeline_cls, folder: Path, dtype: torch.dtype):
    """A diffusers pipeline from a local folder (`hub_folder` fetched a Hub id's), its progress bar off."""
    pipe = pipeline_cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_dtype(device) -> torch.dtype:
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def call_accepted(fn, **kwargs):
    """Call a pipeline with the keyword arguments its signature accepts (pipelines of one family differ
    in small ways, e.g. Kandinsky has no `strength`)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def to_pil(array: np.ndarray) -> Image.Image:
    """A pipeline's `output_type="np"` image (`float[h, w, 3]` in [0, 1]) -> RGB PIL, rounded."""
    return Image.fromarray((np.asarray(array) * 255).round().clip(0, 255).astype(np.uint8))


@dataclass
class Insertion:
    image: Image.Image  # the edit, same size as the input
    box: tuple[float, float, float, float]  # requested box (or the mask's bounding box), pixels
    mask_box: tuple[int, int, int, int]  # bounding rectangle of the mask: pixels outside it are unchanged
    prompt: str
    mode: str  # "crop" or "whole"
    context: tuple[int, int, int, int]  # the pixel rectangle given to the back-end
    canvas: tuple[int, int]  # the back-end's working (w, h) for that rectangle
    box_canvas_pixels: float  # area of the mask's bounding box on the canvas: the pixels the object is drawn with
    seed: int

    def record(self) -> dict:
        """JSON-ready description (everything but the image)."""
        return {"box": list(self.box), "mask_box": list(self.mask_box), "prompt": self.prompt, "mode": self.mode,
                "context": list(self.context), "canvas": list(self.canvas),
                "box_canvas_pixels": self.box_canvas_pixels, "seed": self.seed}


class Inpainter:
    """Back-end adapter: `insert(image, category, box=... | mask=..., seed=...) -> Insertion`.

    Args:
        pipe: the loaded diffusers pipeline.
        steps: denoising steps.
        guidance_scale: classifier-free guidance (None: the back-end's usual value).
        resolution: canvas long side (None: the back-end's native resolution).
        prompt_template: `str.format` template filled with the category.
    """

    name: ClassVar[str] = ""
    default_guidance: ClassVar[float] = 7.5
    deprecated: ClassVar[str | None] = None  # why, when upstream no longer maintains the pipeline

    def __init__(self, pipe, *, steps: int = DEFAULT_STEPS, guidance_scale: float | None = None,
                 resolution: int | None = None, prompt_template: str = PROMPT_TEMPLATE):
        self.pipe = pipe
        self.steps = steps
        self.guidance_scale = self.default_guidance if guidance_scale is None else guidance_scale
        self.resolution = resolution or self.native_resolution()
        self.prompt_template = prompt_template

    # --- what a back-end provides -------------------------------------------------------------
    def native_resolution(self) -> int:
        """The square side the model was trained at (UNet pipelines: latent sample size x VAE stride)."""
        unet, scale = getattr(self.pipe, "unet", None), getattr(self.pipe, "vae_scale_factor", None)
        if unet is not None and scale:
            return int(unet.config.sample_size) * int(scale)
        raise ValueError(f"cannot tell the native resolution of {type(self.pipe).__name__}: pass resolution=")

    @property
    def multiple(self) -> int:
        """Canvas sides must be multiples of this: the VAE stride, and at least 8 (pipelines check for 8)."""
        return max(8, int(getattr(self.pipe, "vae_scale_factor", 8)))

    def canvas_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return working_size(size, self.resolution, self.multiple)

    def generate(self, canvas: Image.Image, mask: Image.Image, box_norm, prompt: str, category: str,
                 generator: torch.Generator) -> Image.Image:
        """Inpaint `mask` (mode L, 255 = repaint) of `canvas`; `box_norm` is the mask's bounding box
        normalised to the canvas. Returns a picture of the canvas size."""
        raise NotImplementedError

    # --- shared plumbing ------------------------------------------------------------------------
    def insert(self, image: Image.Image, category: str, *, box=None, mask: np.ndarray | None = None, seed: int = 0,
               mode: str = "auto", margin: float = CROP_MARGIN, dilate: int = 0, feather: int = 0) -> Insertion:
        """Draw `category` inside pixel `box` (or boolean `mask[h, w]`) of `image`.

        mode: `crop` inpaints a square context crop (mask long side x (1 + 2 margin)) at the canvas
        resolution; `whole` inpaints the whole image resized to the canvas; `auto` crops when the
        mask's long side is smaller than the canvas resolution. `dilate` grows the mask, `feather`
        softens its inner edge; pixels outside the (grown) mask are never changed."""
        image = image.convert("RGB")
        size = image.size
        if (box is None) == (mask is None):
            raise ValueError("give exactly one of box= (pixels x1,y1,x2,y2) or mask= (bool[h, w])")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mask is not None:
            mask = np.asarray(mask).astype(bool)
            if mask.shape != (size[1], size[0]):
                raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]}")
            region = grow_mask(mask, dilate)
        else:
            region = box_mask(box, size, dilate)
        rect = mask_bbox(region)
        if box is None:
            box = rect
        long_side = max(rect[2] - rect[0], rect[3] - rect[1])
        if mode == "auto":
            mode = "crop" if long_side < self.resolution else "whole"
        context = context_rect(rect, size, margin) if mode == "crop" else (0, 0, *size)
        cw, ch = context[2] - context[0], context[3] - context[1]
        canvas_w, canvas_h = self.canvas_size((cw, ch))
        sx, sy = canvas_w / cw, canvas_h / ch

        crop = image.crop(context).resize((canvas_w, canvas_h), Image.BICUBIC)
        crop_mask = Image.fromarray(region[context[1]:context[3], context[0]:context[2]].astype(np.uint8) * 255)
        crop_mask = crop_mask.resize((canvas_w, canvas_h), Image.BILINEAR).point(lambda v: 255 if v > 0 else 0)
        box_norm = [(rect[0] - context[0]) / cw, (rect[1] - context[1]) / ch,
                    (rect[2] - context[0]) / cw, (rect[3] - context[1]) / ch]
        prompt = prompt_for(category, self.prompt_template)
        generator = torch.Generator().manual_seed(seed)
        out = self.generate(crop, crop_mask, box_norm, prompt, category, generator)
        if out.size != (canvas_w, canvas_h):
            raise RuntimeError(f"{self.name} back-end returned {out.size}, expected the canvas {(canvas_w, canvas_h)}")
        generated = image.copy()
        generated.paste(out.convert("RGB").resize((cw, ch), Image.BICUBIC), context[:2])
        edit = composite(image, generated, feathered_alpha(region, feather))
        area = (rect[2] - rect[0]) * sx * (rect[3] - rect[1]) * sy
        return Insertion(edit, tuple(float(v) for v in box), rect, prompt, mode, context, (canvas_w, canvas_h),
                         float(area), seed)
