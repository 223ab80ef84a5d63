"""Object insertion on a few validation images during training, with edit-quality metrics (docs/design/evaluation.md#inpainting-metrics).

Every ``every_n_val_epochs`` validation runs (sanity checks excluded) the callback takes the first
``num_images`` samples of the first validation batch, samples one box per image with the model,
inpaints the class there with a local diffusers pipeline and logs, on global rank zero only:
``val/inpaint_background_ssim``, ``val/inpaint_clip_score`` (when open_clip weights are given) and
one picture per edit (``val/inpaint/{i}``: original | edit, box drawn). Cheap enough to leave on:
few images, few steps, a small canvas. Without an inpainter folder it logs one line and does nothing.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from metrics.inpainting import BackgroundSSIM, ForegroundCLIPScore, to_pil
from genloc.boxes import denormalise
from genloc.inpainters import BACKENDS, load_backend
from genloc.inpainting import working_size

from .schedule import EveryNValidations

__all__ = ["InpaintingCallback"]


class InpaintingCallback(L.Callback):
    """Args:
        inpainter: local diffusers pipeline folder (None or missing: disabled, one log line).
        every_n_val_epochs: run on every k-th validation run (0 disables).
        num_images: validation images edited per run.
        steps, resolution, guidance_scale, dilate, feather, backend: insertion settings
            (``resolution`` is the long side of the canvas the batch image is resized to).
        clip_weights, clip_model, clip_config: local open_clip weights (+ optional model name /
            config JSON) for the foreground CLIP score; without weights only SSIM is logged.
        seed: seeds box sampling and the diffusion noise, so runs are comparable across epochs.
    """

    def __init__(self, inpainter: str | None = None, every_n_val_epochs: int = 5, num_images: int = 4,
                 steps: int = 8, resolution: int = 256, guidance_scale: float = 7.5, dilate: int = 0,
                 feather: int = 0, backend: str = "sd", clip_weights: str | None = None,
                 clip_model: str | None = None, clip_config: str | None = None, seed: int = 0):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.inpainter = inpainter
        self.every_n_val_epochs = every_n_val_epochs
        self.schedule = EveryNValidations(every_n_val_epochs)
        self.num_images = num_images
        self.backend = backend
        self.load_kwargs = dict(steps=steps, resolution=resolution, guidance_scale=guidance_scale)
        self.insert_kwargs = dict(dilate=dilate, feather=feather)
        self.clip_args = (clip_weights, clip_model, clip_config)
        self.seed = seed
        self.enabled = bool(every_n_val_epochs) and inpainter is not None and Path(inpainter).is_dir()
        self._announced = False
        self._batch = None
        self._pipe = self._ssim = self._clip = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled and not self._announced:
            self._announced = True
            reason = (f"inpainter folder {self.inpainter} not found" if self.inpainter else "no inpainter configured")
            if not self.every_n_val_epochs:
                reason = "every_n_val_epochs is 0"
            rank_zero_info(f"InpaintingCallback disabled ({reason}); set callbacks.inpainting.inpainter to a local "
                           "diffusers inpainting folder to log edits and SSIM/CLIP scores")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.enabled and batch_idx == 0 and dataloader_idx == 0 and trainer.is_global_zero:
            self._batch = {k: batch[k][: self.num_images] for k in ("image", "category", "size")}

    def _load(self, device) -> None:
        if self._pipe is None:
            self._pipe = load_backend(self.backend, self.inpainter, device=device, **self.load_kwargs)
            # no cross-rank sync: only global rank zero ever updates or computes these
            self._ssim = BackgroundSSIM(sync_on_compute=False)
            if self.clip_args[0]:
                self._clip = ForegroundCLIPScore(*self.clip_args, sync_on_compute=False).to(device)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        due = self.schedule.due(trainer)
        batch, self._batch = self._batch, None
        if not due or batch is None or not trainer.is_global_zero:
            return
        device = pl_module.device
        # diffusers and GLIGEN draw some noise from the global RNG: keep training's random stream untouched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self._run(trainer, pl_module, batch, device)

    def _run(self, trainer, pl_module, batch, device) -> None:
        self._load(device)
        images = batch["image"].to(device)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        boxes = pl_module.model.sample(images, batch["category"], n=1, generator=generator).boxes_norm[:, 0].float().cpu()
        self._ssim.reset()
        if self._clip is not None:
            self._clip.reset()
        experiment = trainer.logger.experiment if trainer.logger is not None else None
        for i, (image, category, size, box) in enumerate(zip(images, batch["category"], batch["size"].tolist(), boxes)):
            canvas = to_pil(image).resize(working_size(tuple(size), self.load_kwargs["resolution"]), Image.BICUBIC)
            w, h = canvas.size
            box_px = denormalise(box, (w, h)).tolist()
            edit = self._pipe.insert(canvas, category, box=box_px, seed=self.seed + i, **self.insert_kwargs)
            before, after = (torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in (canvas, edit.image))
            self._ssim.update(after[None] / 255.0, before[None] / 255.0, box[None])
            if self._clip is not None:
                self._clip.update(after[None] / 255.0, box[None], [category])
            if experiment is not None and hasattr(experiment, "add_image"):
                drawn = draw_bounding_boxes(after, torch.tensor([box_px]), colors="red", width=2)
                experiment.add_image(f"val/inpaint/{i}", torch.cat([before, drawn], dim=2), global_step=trainer.global_step)
                experiment.add_text(f"val/inpaint/{i}", edit.prompt, global_step=trainer.global_step)
        pl_module.log("val/inpaint_background_ssim", self._ssim.compute(), rank_zero_only=True)
        if self._clip is not None:
            pl_module.log("val/inpaint_clip_score", self._clip.compute(), rank_zero_only=True)
