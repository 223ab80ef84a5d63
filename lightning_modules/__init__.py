"""Training logic: the MLE and DPO stages and the plausibility classifier as LightningModules, the DPO loss, the optimiser, checkpoints.

Lightning's oldest tested release (the GPU image of docs/gpu.md) is checked here, before it is
imported, as genloc checks its own dependencies (`genloc.versions`)."""
from genloc.versions import check

# distribution name -> oldest tested release (the lower bound of the train extra in pyproject.toml)
MINIMUM = {"lightning": "2.6"}
check(MINIMUM)

from .dpo import DPOModule
from .mle import LocationLightningModule, MLEModule
from .optim import AdamWCosine
from .plausibility import PlausibilityModule

__all__ = ["LocationLightningModule", "MLEModule", "DPOModule", "AdamWCosine", "PlausibilityModule"]
