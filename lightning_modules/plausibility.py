"""The plausibility classifier (SimOPA's role in the object-placement papers): composite RGB + its
mask (4 channels) -> one logit, "is this placement plausible". Trained on labelled composites
(`datamodules.composites.CompositeDataModule`); its checkpoint is what `metrics.placement` loads
to score generated composites (Acc)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from lightning_modules.mle import MODULE_KEY, module_path
from lightning_modules.optim import AdamWCosine
from genloc.checkpoint import CheckpointError

__all__ = ["PlausibilityModule", "build_classifier", "load_classifier", "check_args"]

IN_CHANNELS = 4  # RGB + the composite mask


def check_args(image_size: int = 224, threshold: float = 0.5) -> None:
    """PlausibilityModule's argument check, run by the constructor and by the config before anything is built."""
    from genloc.config import ArgumentError

    if not image_size >= 16:
        raise ArgumentError("image_size", image_size, ">= 16")
    if not 0 < threshold < 1:
        raise ArgumentError("threshold", threshold, "(0, 1)")


def build_classifier(backbone: str, weights: str | None = None) -> nn.Module:
    """A timm ``backbone`` with 4 input channels and one output; ``weights``: a local file of the
    backbone's 3-channel weights (timm adapts the first convolution), None: random init (offline)."""
    import timm

    if weights is not None and not Path(weights).is_file():
        raise CheckpointError(f"classifier backbone weights {weights} not found; download the {backbone!r} weights "
                              "file (e.g. from the timm model's Hub page) or set module.weights=null for random init")
    try:
        return timm.create_model(backbone, pretrained=weights is not None, in_chans=IN_CHANNELS, num_classes=1,
                                 pretrained_cfg_overlay={"file": str(weights)} if weights else None)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise CheckpointError(f"classifier backbone {backbone!r} is not a timm model; see timm.list_models()") from None
        raise


class PlausibilityModule(L.LightningModule):
    """Binary cross-entropy on composites; ``val/accuracy`` and ``val/roc_auc`` (torchmetrics, synced
    over ranks) go to TensorBoard. ``backbone``: any timm model (``resnet18`` is SimOPA's size;
    ``test_resnet``, 0.4M parameters, is the toy and test size). ``image_size``: the side composites
    are resized to (the data module gets it from here). ``threshold`` on the probability makes a
    verdict plausible."""

    owns_image_size = True  # train.py gives the data this module's image_size

    def __init__(self, optim: dict, backbone: str = "resnet18", weights: str | None = None, image_size: int = 224,
                 threshold: float = 0.5):
        check_args(image_size, threshold)
        super().__init__()
        self.save_hyperparameters()
        self.optim = AdamWCosine(**optim)
        self.model = build_classifier(backbone, weights)
        self.val_accuracy = BinaryAccuracy(threshold=threshold)
        self.val_auroc = BinaryAUROC()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``[N]`` of composites ``[N, 4, S, S]`` (RGB and mask in [0, 1])."""
        return self.model(inputs).squeeze(-1)

    @torch.no_grad()
    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Probability ``[N]`` that each composite is plausible."""
        return torch.sigmoid(self(inputs).float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["input"])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].float())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["input"])
        labels = batch["label"].long()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
        probs = torch.sigmoid(logits)
        self.val_accuracy.update(probs, labels)
        self.val_auroc.update(probs, labels)
        self.log("val/loss", loss, sync_dist=True, batch_size=len(logits))
        self.log("val/accuracy", self.val_accuracy, batch_size=len(logits))
        self.log("val/roc_auc", self.val_auroc, batch_size=len(logits))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODULE_KEY] = module_path(type(self))

    def configure_optimizers(self):
        total = max(1, int(self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches))
        # unfused: Lightning's mixed-precision clipping refuses a fused optimiser, and this network is small
        return self.optim.build(self.named_parameters(), total, allow_fused=False)


def load_classifier(path, device="cpu") -> PlausibilityModule:
    """A trained classifier from its checkpoint (eval mode, frozen); one line naming the file otherwise."""
    from genloc.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path, location_model=False)
    if ckpt.get(MODULE_KEY) != module_path(PlausibilityModule):
        raise CheckpointError(f"{path} is not a plausibility classifier checkpoint (written by "
                              f"{ckpt.get(MODULE_KEY, 'an unknown module')}); train one with experiment=toy_plausibility")
    hp = dict(ckpt["hyper_parameters"], weights=None)  # the checkpoint holds every weight
    module = PlausibilityModule(**hp)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval().requires_grad_(False).to(device)
