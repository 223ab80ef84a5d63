"""Edit-quality metrics for object insertion (docs/design/evaluation.md#inpainting-metrics), as torchmetrics `Metric`s.

Images are float `[B,3,H,W]` in [0,1]; boxes are normalised `x1,y1,x2,y2` (docs/ARCHITECTURE.md) and
rasterised with `genloc.boxes.pixel_rect`, the same rule the insertion mask uses.

- `BackgroundSSIM`: how well the edit preserves the background (paper: ~0.78 for its method).
- `ForegroundCLIPScore`: whether the box now shows the class (raw cosine; paper: ~0.28). torchmetrics'
  CLIPScore needs hub weights and breaks with transformers 5, so open_clip is used directly, from a
  local weights file only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics import MeanMetric
from torchmetrics.functional.image import structural_similarity_index_measure

from genloc.boxes import pixel_rects
from genloc.inpainting import PROMPT_TEMPLATE


def background_ssim(preds: torch.Tensor, target: torch.Tensor, boxes: torch.Tensor, *, data_range: float = 1.0,
                    kernel_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM between edit `preds` and original `target`, averaged over pixels outside the box.

    The box of `preds` is first filled with `target`'s pixels so that SSIM windows straddling the box
    edge compare background with background only: editing inside the box cannot lower the score.
    An image whose box covers everything scores 1 (no background left to damage)."""
    if preds.shape != target.shape or preds.ndim != 4:
        raise ValueError(f"preds and target must both be [B,C,H,W], got {tuple(preds.shape)} and {tuple(target.shape)}")
    b, _, h, w = preds.shape
    outside = torch.ones(b, 1, h, w, dtype=torch.bool, device=preds.device)
    for i, (x0, y0, x1, y1) in enumerate(pixel_rects(boxes, (w, h))):
        outside[i, :, y0:y1, x0:x1] = False
    preds = torch.where(outside, preds, target)
    # float64: with identical windows the float32 variance terms cancel only to ~1e-4 of SSIM
    _, ssim_map = structural_similarity_index_measure(
        preds.double(), target.double(), data_range=data_range, kernel_size=kernel_size, sigma=sigma,
        reduction="none", return_full_image=True,
    )
    weights = outside.double()
    n = weights.sum(dim=(1, 2, 3))
    score = (ssim_map.mean(1, keepdim=True) * weights).sum(dim=(1, 2, 3)) / n.clamp(min=1)
    return torch.where(n > 0, score, torch.ones_like(score)).float()


class BackgroundSSIM(MeanMetric):
    """Mean background SSIM over edits; `update(preds, target, boxes)` with normalised boxes `[B,4]`.
    A torchmetrics `MeanMetric` (float64 states) of the per-edit scores."""

    higher_is_better = True
    is_differentiable = False

    def __init__(self, data_range: float = 1.0, kernel_size: int = 11, sigma: float = 1.5, **kwargs):
        super().__init__(**kwargs)
        self.set_dtype(torch.float64)
        self.ssim_kwargs = dict(data_range=data_range, kernel_size=kernel_size, sigma=sigma)

    def update(self, preds: torch.Tensor, target: torch.Tensor, boxes: torch.Tensor) -> None:
        super().update(background_ssim(preds, target, boxes, **self.ssim_kwargs).to(self.device))

    def compute(self) -> torch.Tensor:
        return super().compute().float()


def load_open_clip(pretrained: str | Path, model_name: str | None = None, model_config: str | Path | None = None,
                   device: str | torch.device = "cpu"):
    """open_clip `(model, preprocess, tokenizer)` from a local weights file; never touches the hub.

    `model_config` (a JSON model config) is registered first for models open_clip does not know;
    its file stem is then the default `model_name` (else "ViT-B-32")."""
    import open_clip

    if model_config is not None:
        open_clip.add_model_config(model_config)
        model_name = model_name or Path(model_config).stem
    model_name = model_name or "ViT-B-32"
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"open_clip weights {pretrained} not found (a local file is required; no downloads)")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(pretrained), device=device, require_pretrained=True
    )
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(model_name)


def to_pil(image: torch.Tensor) -> Image.Image:
    """`[3,H,W]` float in [0,1] -> RGB PIL, rounding (torchvision's to_pil_image truncates)."""
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).numpy()))


class ForegroundCLIPScore(MeanMetric):
    """Mean raw cosine between the open_clip embeddings of each edit's box crop and of
    `template.format(category)`; `update(images, boxes, categories)` with normalised boxes `[B,4]`.

    The crop goes through open_clip's own eval `preprocess`, so the score equals a direct open_clip
    computation on the cropped picture. A torchmetrics `MeanMetric` (float64 states) of the scores."""

    higher_is_better = True
    is_differentiable = False

    def __init__(self, pretrained: str | Path, model_name: str | None = None, model_config: str | Path | None = None,
                 template: str = PROMPT_TEMPLATE, **kwargs):
        super().__init__(**kwargs)
        self.set_dtype(torch.float64)  # before the CLIP tower is attached: set_dtype casts every submodule
        self.clip, self.preprocess, self.tokenizer = load_open_clip(pretrained, model_name, model_config)
        self.template = template

    @torch.no_grad()
    def scores(self, images: torch.Tensor, boxes: torch.Tensor, categories: list[str]) -> torch.Tensor:
        """Per-edit cosine similarities `[B]`."""
        _, _, h, w = images.shape
        device = next(self.clip.parameters()).device
        crops = [self.preprocess(to_pil(img[:, y0:y1, x0:x1]))
                 for img, (x0, y0, x1, y1) in zip(images, pixel_rects(boxes, (w, h)))]
        img_emb = F.normalize(self.clip.encode_image(torch.stack(crops).to(device)).float(), dim=-1)
        texts = self.tokenizer([self.template.format(c) for c in categories]).to(device)
        txt_emb = F.normalize(self.clip.encode_text(texts).float(), dim=-1)
        return (img_emb * txt_emb).sum(-1)

    def update(self, images: torch.Tensor, boxes: torch.Tensor, categories: list[str]) -> None:
        super().update(self.scores(images, boxes, categories).to(self.device))

    def compute(self) -> torch.Tensor:
        return super().compute().float()
