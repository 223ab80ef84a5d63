"""Background SSIM and foreground CLIP score (docs/design/evaluation.md#inpainting-metrics) on real photos, and the training callback."""
import logging

import lightning as L
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from skimage import data

from callbacks.inpainting import InpaintingCallback
from metrics.inpainting import BackgroundSSIM, ForegroundCLIPScore, background_ssim
from genloc.testing import TINY_CLIP_NAME, save_tiny_open_clip, save_tiny_sd_inpainter


def _tensor(array):
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def photos():
    """Real photos as [1,3,H,W] in [0,1]: astronaut 512x512 and coffee shrunk to 150x100 (speed)."""
    return _tensor(data.astronaut()), _tensor(Image.fromarray(data.coffee()).resize((150, 100), Image.BICUBIC))


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("clip"))


BOXES = [[0.2, 0.3, 0.6, 0.8], [0.0, 0.0, 0.35, 0.5], [0.71, 0.52, 1.0, 1.0]]


@pytest.mark.parametrize("box", BOXES)
def test_background_ssim_ignores_the_box_only(photos, box):
    image = photos[1]  # coffee, 150x100
    _, _, h, w = image.shape
    boxes = torch.tensor([box])
    assert background_ssim(image, image, boxes).item() == pytest.approx(1.0, abs=1e-6)
    x0, y0, x1, y1 = int(np.floor(box[0] * w)), int(np.floor(box[1] * h)), int(np.ceil(box[2] * w)), int(np.ceil(box[3] * h))
    inside = image.clone()
    inside[..., y0:y1, x0:x1] = torch.rand(1, 3, y1 - y0, x1 - x0, generator=torch.Generator().manual_seed(0))
    assert background_ssim(inside, image, boxes).item() == pytest.approx(1.0, abs=1e-6)
    # a 20x20 patch in the first image corner the box does not reach
    ox, oy = next((cx, cy) for cx in (0, w - 20) for cy in (0, h - 20)
                  if cx >= x1 or cx + 20 <= x0 or cy >= y1 or cy + 20 <= y0)
    outside = inside.clone()
    outside[..., oy:oy + 20, ox:ox + 20] = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    assert background_ssim(outside, image, boxes).item() < 0.99


def test_background_ssim_metric_averages_edits(photos):
    image = photos[1]
    blurred = torch.nn.functional.avg_pool2d(image, 5, stride=1, padding=2)
    boxes = torch.tensor([BOXES[0], BOXES[1]])
    pair = torch.cat([image, blurred]), torch.cat([image, image])
    per_image = background_ssim(*pair, boxes)
    assert per_image[0] == pytest.approx(1.0, abs=1e-6) and 0 < per_image[1] < 0.99
    metric = BackgroundSSIM()
    metric.update(pair[0][:1], pair[1][:1], boxes[:1])
    metric.update(pair[0][1:], pair[1][1:], boxes[1:])
    assert metric.compute().item() == pytest.approx(per_image.mean().item(), abs=1e-6)
    # the whole image boxed: nothing left to compare, nothing damaged
    assert background_ssim(blurred, image, torch.tensor([[0.0, 0.0, 1.0, 1.0]])).item() == 1.0


def test_clip_score_equals_direct_open_clip(photos, clip_files):
    cfg_path, weights = clip_files
    image = photos[0]
    boxes = torch.tensor([[0.25, 0.125, 0.75, 0.625], [0.0, 0.5, 0.5, 1.0]])
    categories = ["person", "rocket"]
    metric = ForegroundCLIPScore(weights, model_config=cfg_path)
    scores = metric.scores(image.expand(2, -1, -1, -1), boxes, categories)

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    pil = Image.fromarray(data.astronaut())  # 512x512: these boxes are whole pixels
    with torch.no_grad():
        for score, box, category in zip(scores, boxes.tolist(), categories):
            crop = preprocess(pil.crop(tuple(int(v * 512) for v in box)))[None]
            img = model.encode_image(crop)
            txt = model.encode_text(tokenizer([f"a photo of a {category}"]))
            direct = torch.nn.functional.cosine_similarity(img, txt).item()
            assert score.item() == pytest.approx(direct, abs=1e-5)
    metric.update(image.expand(2, -1, -1, -1), boxes, categories)
    assert metric.compute().item() == pytest.approx(scores.mean().item(), abs=1e-6)


def test_clip_score_refuses_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError):
        ForegroundCLIPScore(tmp_path / "missing.pt")


class _StubLocationModel(torch.nn.Module):
    """Samples fixed boxes: the callback only needs `sample(...).boxes_norm`."""

    def sample(self, images, categories, n=1, generator=None, **kwargs):
        boxes = torch.tensor([0.2, 0.3, 0.6, 0.9], device=images.device).expand(len(images), n, 4)
        return type("Out", (), {"boxes_norm": boxes})()


class _Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = _StubLocationModel()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - batch["image"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(photos):
    astronaut = torch.nn.functional.interpolate(photos[0], size=(32, 32), mode="bilinear")[0]
    coffee = torch.nn.functional.interpolate(photos[1], size=(32, 32), mode="bilinear")[0]
    items = [{"image": img, "category": c, "size": torch.tensor(s)}
             for img, c, s in [(astronaut, "cat", (512, 512)), (coffee, "cup", (600, 400))]]
    return torch.utils.data.DataLoader(items, batch_size=2)


def _fit(tmp_path, photos, callback):
    trainer = L.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], accelerator="cpu")
    trainer.fit(_Module(), _loader(photos), _loader(photos))
    return trainer


def test_callback_logs_edits_and_metrics(tmp_path, photos, clip_files):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg_path, weights = clip_files
    callback = InpaintingCallback(inpainter=str(save_tiny_sd_inpainter(tmp_path / "sd")), every_n_val_epochs=2,
                                  num_images=2, steps=2, resolution=64, clip_weights=str(weights),
                                  clip_config=str(cfg_path))
    trainer = _fit(tmp_path, photos, callback)
    metrics = trainer.callback_metrics
    assert 0.0 < metrics["val/inpaint_background_ssim"].item() <= 1.0
    assert -1.0 <= metrics["val/inpaint_clip_score"].item() <= 1.0
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.*")).parent)).Reload()
    assert set(events.Tags()["images"]) == {"val/inpaint/0", "val/inpaint/1"}
    assert len(events.Images("val/inpaint/0")) == 1  # every 2nd of 2 validation runs
    assert [s.step for s in events.Scalars("val/inpaint_background_ssim")] == [1]


def test_callback_without_inpainter_is_a_no_op(tmp_path, photos, caplog):
    with caplog.at_level(logging.INFO):
        trainer = _fit(tmp_path, photos, InpaintingCallback(inpainter=None, every_n_val_epochs=1))
    assert sum("InpaintingCallback disabled" in r.getMessage() for r in caplog.records) == 1
    assert "val/inpaint_background_ssim" not in trainer.callback_metrics
