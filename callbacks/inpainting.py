"""Object insertion on a few validation images during training, with edit-quality metrics (docs/design/evaluation.md#inpainting-metrics).

Every ``every_n_val_epochs`` validation runs (sanity checks excluded) the callback edits
``num_images`` validation images, shared by the ranks (`metrics.ranks`): edit ``i`` is made by rank
``i % world_size`` on its ``(i // world_size)``-th validation image of the run, so with one process
these are the first ``num_images`` images, and with a sampler that deals samples out in turn
(sample ``j`` to rank ``j % world_size``) the same ones. For each, one box sampled by the model (a
generator seeded by ``seed + i``), the class inpainted there by a local diffusers pipeline (noise
seed ``seed + i``), so an edit does not depend on which rank makes it. The metric states sync at
compute, so every rank logs the values of the whole set: ``val/inpaint_background_ssim``,
``val/inpaint_clip_score`` (when open_clip weights are given); rank zero gathers the pictures and
logs one per edit (``val/inpaint/{i}``: original | edit, box drawn). Cheap enough to leave on: few
images, few steps, a small canvas. Without an inpainter folder it logs one line and does nothing.
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
from metrics.ranks import gather_to_rank_zero, rank_indices
from genloc.boxes import denormalise
from genloc.inpainters import BACKENDS, load_backend
from genloc.inpainting import working_size

from .schedule import EveryNValidations

__all__ = ["InpaintingCallback"]


class InpaintingCallback(L.Callback):
    """Args:
        inpainter: local diffusers pipeline folder (None or missing: disabled, one log line).
        every_n_val_epochs: run on every k-th validation run (0 disables).
        num_images: validation images edited per run, all ranks together.
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
        self._due = False
        self._share: list = []
        self._pipe = self._ssim = self._clip = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled and not self._announced:
            self._announced = True
            reason = (f"inpainter folder {self.inpainter} not found" if self.inpainter else "no inpainter configured")
            if not self.every_n_val_epochs:
                reason = "every_n_val_epochs is 0"
            rank_zero_info(f"InpaintingCallback disabled ({reason}); set callbacks.inpainting.inpainter to a local "
                           "diffusers inpainting folder to log edits and SSIM/CLIP scores")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._due = self.enabled and self.schedule.due(trainer)
        self._share = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._due or dataloader_idx != 0:
            return
        indices = rank_indices(self.num_images, trainer.global_rank, trainer.world_size)
        for image, category, size in zip(batch["image"], batch["category"], batch["size"].tolist()):
            if len(self._share) == len(indices):
                break
            self._share.append((indices[len(self._share)], image.detach().clone(), category, size))

    def _load(self, device) -> None:
        if self._pipe is None:
            self._pipe = load_backend(self.backend, self.inpainter, device=device, **self.load_kwargs)
            self._ssim = BackgroundSSIM().to(device)
            if self.clip_args[0]:
                self._clip = ForegroundCLIPScore(*self.clip_args).to(device)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._due:
            return
        self._due, share, self._share = False, self._share, []
        device = pl_module.device
        # diffusers and GLIGEN draw some noise from the global RNG: keep training's random stream untouched
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self._run(trainer, pl_module, share, device)

    def _run(self, trainer, pl_module, share, device) -> None:
        """Edit this rank's share; collective from the metrics' compute on (every rank calls it)."""
        self._load(device)
        self._ssim.reset()
        if self._clip is not None:
            self._clip.reset()
        pictures = []
        for index, image, category, size in share:
            # one generator per image, seeded by its index: the same box whichever rank edits it
            generator = torch.Generator(device=device).manual_seed(self.seed + index)
            box = pl_module.model.sample(image[None].to(device), [category], n=1,
                                         generator=generator).boxes_norm[0, 0].float().cpu()
            canvas = to_pil(image).resize(working_size(tuple(size), self.load_kwargs["resolution"]), Image.BICUBIC)
            w, h = canvas.size
            box_px = denormalise(box, (w, h)).tolist()
            edit = self._pipe.insert(canvas, category, box=box_px, seed=self.seed + index, **self.insert_kwargs)
            before, after = (torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in (canvas, edit.image))
            self._ssim.update(after[None] / 255.0, before[None] / 255.0, box[None])
            if self._clip is not None:
                self._clip.update(after[None] / 255.0, box[None], [category])
            drawn = draw_bounding_boxes(after, torch.tensor([box_px]), colors="red", width=2)
            pictures.append((index, torch.cat([before, drawn], dim=2), edit.prompt))
        ssim = self._ssim.compute()
        clip = self._clip.compute() if self._clip is not None else None
        gathered = gather_to_rank_zero(pictures)
        experiment = trainer.logger.experiment if trainer.is_global_zero and trainer.logger is not None else None
        if hasattr(experiment, "add_image"):
            for index, picture, prompt in sorted((p for part in gathered for p in part), key=lambda p: p[0]):
                experiment.add_image(f"val/inpaint/{index}", picture, global_step=trainer.global_step)
                experiment.add_text(f"val/inpaint/{index}", prompt, global_step=trainer.global_step)
        if torch.isnan(ssim):  # no rank had a validation image to edit
            return
        # already synced: every rank holds the same values
        pl_module.log("val/inpaint_background_ssim", ssim, sync_dist=True)
        if clip is not None:
            pl_module.log("val/inpaint_clip_score", clip, sync_dist=True)
