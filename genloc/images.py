"""The one image conversion of the framework: any supported image -> 8-bit RGB PIL image.

Placement (`genloc.placement`) and the shard writer (`datamodules`) both convert through
`to_rgb_image`, so a photo reaches the model exactly as the training images did. Pure numpy/PIL:
importing this module loads no torch (a tensor can only be given once torch is imported).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

ImageLike = Union[str, Path, Image.Image, np.ndarray, "torch.Tensor"]


def to_rgb_image(image: ImageLike) -> tuple[Image.Image, list[str]]:
    """Any supported image -> (8-bit RGB PIL image of the same size, notes on lossy conversions)."""
    if isinstance(image, (str, Path)):
        if not str(image).strip():
            raise ValueError(f"image is an empty path {str(image)!r}: give a path, PIL image, numpy array or tensor")
        path = Path(image).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image {path} not found")
        with Image.open(path) as opened:
            opened.load()
            return _from_pil(opened)
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_array(image, "numpy array (H x W [x C])")
    if _is_tensor(image):
        t = image.detach().cpu()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)  # C x H x W -> H x W x C
        elif t.ndim != 2:
            raise ValueError(f"tensor image must be C x H x W or H x W, got shape {tuple(image.shape)}")
        return _from_array(t.numpy(), "tensor (C x H x W)")
    raise TypeError(f"unsupported image type {type(image).__name__}: give a path, PIL image, numpy array or tensor")


def _from_pil(img: Image.Image) -> tuple[Image.Image, list[str]]:
    mode = img.mode
    if mode == "RGB":
        return img.copy(), []
    if mode in ("L", "1") or (mode == "P" and "transparency" not in img.info):  # lossless
        return img.convert("RGB"), []
    if mode.startswith("I;16"):  # 16-bit PNGs and TIFFs
        return _from_array(np.asarray(img), f"{mode} image", sixteen_bit=True)
    if mode == "I":
        a = np.asarray(img)
        if a.size and a.min() >= 0 and a.max() <= 255:  # 8-bit values widened to 32 bits by a conversion
            image, notes = _from_array(a.astype(np.uint8), "I image")
            return image, notes + ["I image with values 0..255 read as 8-bit"]
        return _from_array(a, "I image", sixteen_bit=True)
    if mode == "F":
        a = np.asarray(img)
        if a.size and np.isfinite(a).all() and a.min() >= 0 and 1 < a.max() <= 255:  # PIL's own scale for F
            image, notes = _from_array(a / 255.0, "F image")
            return image, notes + ["F image with values up to 255 read as 8-bit (0..255)"]
        image, notes = _from_array(a, "F image")
        return image, notes + ["F image read as values in [0, 1]"]
    if mode in ("RGBA", "LA", "PA", "RGBa", "La", "P"):
        return _from_array(np.asarray(img.convert("RGBA")), f"{mode} image")
    if mode == "CMYK":
        return img.convert("RGB"), ["CMYK image converted to RGB with PIL's plain formula (no colour profile)"]
    if mode == "LAB":  # PIL's own LAB -> RGB only relabels the channels
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                              "LAB", "RGB")
        return ImageCms.applyTransform(img, lab_to_srgb), ["LAB image converted to sRGB (D50 white point)"]
    try:
        return img.convert("RGB"), [f"{mode} image converted to RGB"]
    except ValueError:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB; convert it first") from None


def _from_array(a: np.ndarray, what: str, sixteen_bit: bool = False) -> tuple[Image.Image, list[str]]:
    """H x W or H x W x C (C = 1, 3 or 4) -> RGB: uint8 / 255, uint16 (and PIL's 32-bit "I" mode holding
    16-bit values) / 65535, float in [0, 1]; alpha composited over white."""
    notes = []
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        channels = a.shape[-1]
    elif a.ndim == 2:
        a, channels = a[..., None], 1
    else:
        raise ValueError(f"{what}: shape {a.shape} is not H x W or H x W x C with C in (1, 3, 4)")
    if a.dtype == np.uint8:
        x = a.astype(np.float64) / 255.0
    elif (a.dtype.kind == "u" and a.dtype.itemsize == 2) or (sixteen_bit and a.dtype.kind in "iu"):
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{what}: values outside the 16-bit range 0..65535")
        x = a.astype(np.float64) / 65535.0
        notes.append(f"{what} of {a.dtype} values read as 16-bit (0..65535) and scaled to 8-bit")
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"{what}: float values must lie in [0, 1], got range "
                             f"[{np.nanmin(a):.4g}, {np.nanmax(a):.4g}]; scale it (e.g. / 255) first")
        x = a.astype(np.float64)
    else:
        raise ValueError(f"{what}: unsupported dtype {a.dtype}, its value range is ambiguous "
                         "(use uint8, uint16 or float in [0, 1])")
    if channels == 4:
        alpha = x[..., 3:4]
        if (alpha < 1).any():
            notes.append(f"{what}: transparent pixels composited over white")
        x = x[..., :3] * alpha + (1.0 - alpha)
    elif channels == 1:
        x = np.repeat(x, 3, axis=-1)
    rgb = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB"), notes


def _is_tensor(image) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(image, torch.Tensor)
