"""Log sampled boxes drawn on validation backgrounds to TensorBoard (green: ground truth, red: samples);
nothing with a logger that takes no images."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from genloc import drawing
from genloc.boxes import denormalise

from .schedule import EveryNValidations


def draw_boxes(image: torch.Tensor, positives: torch.Tensor, samples: torch.Tensor, size: int = 128) -> torch.Tensor:
    """uint8 [3,size,size] picture of one image ([3,H,W] in [0,1]) with normalised boxes drawn on it
    by the applications' drawer (`genloc.drawing`): positives green, samples red on top."""
    picture = F.interpolate(image[None].float().cpu(), size=(size, size), mode="bilinear", align_corners=False)[0]
    picture = Image.fromarray((picture.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")
    boxes = denormalise(torch.cat([positives.cpu(), samples.cpu()]).double(), (size, size)).tolist()
    colours = [(0, 255, 0)] * len(positives) + [(255, 0, 0)] * len(samples)
    picture = drawing.draw_boxes(picture, boxes, colours, width=1)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1)


def draws_images(logger) -> bool:
    """Whether a logger takes images (TensorBoard's writer); with another (CSV, MLflow, W&B) the image
    callbacks draw nothing."""
    return hasattr(getattr(logger, "experiment", None), "add_image")


class SampleImagesCallback(L.Callback):
    """Every `every_n_val_epochs` validation runs (sanity checks excluded), draws `boxes_per_image`
    samples on `num_images` images."""

    def __init__(self, every_n_val_epochs: int = 1, num_images: int = 8, boxes_per_image: int = 8, seed: int = 0):
        self.every_n_val_epochs = every_n_val_epochs
        self.schedule = EveryNValidations(every_n_val_epochs)
        self.num_images = num_images
        self.boxes_per_image = boxes_per_image
        self.seed = seed
        self._batch = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and trainer.is_global_zero:
            self._batch = {k: batch[k][: self.num_images] for k in ("image", "category", "positives")}

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        due = self.schedule.due(trainer)
        if not due or self._batch is None or not trainer.is_global_zero or not draws_images(trainer.logger):
            return
        batch, self._batch = self._batch, None
        generator = torch.Generator(device=batch["image"].device).manual_seed(self.seed)
        out = pl_module.model.sample(batch["image"], batch["category"], n=self.boxes_per_image, generator=generator)
        pictures = [draw_boxes(img, pos, boxes) for img, pos, boxes in
                    zip(batch["image"], batch["positives"], out.boxes_norm)]
        grid = make_grid(torch.stack(pictures), nrow=4, padding=2)
        experiment = trainer.logger.experiment
        experiment.add_image("val/samples", grid, global_step=trainer.global_step)
        experiment.add_text("val/sample_categories", ", ".join(batch["category"]), global_step=trainer.global_step)
