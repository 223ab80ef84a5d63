"""Training logic: the MLE and DPO stages as LightningModules, the DPO loss, the optimiser, checkpoints."""
from .dpo import DPOModule
from .mle import LocationLightningModule, MLEModule
from .optim import AdamWCosine

__all__ = ["LocationLightningModule", "MLEModule", "DPOModule", "AdamWCosine"]
