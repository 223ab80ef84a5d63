"""Callbacks: evaluation during training (TPR-FPR, sampled boxes, inpainting, placement metrics) and the
training infrastructure (checkpoints, reproducible steps, pre-emption, a CSV logger that survives a resume).
Imported lazily, so building one
callback does not import the others' heavy dependencies (diffusers)."""
import importlib

_WHERE = {
    "TprFprCallback": "callbacks.tpr_fpr",
    "SampleImagesCallback": "callbacks.sample_images",
    "InpaintingCallback": "callbacks.inpainting",
    "PlacementMetricsCallback": "callbacks.placement",
    "FinalCheckpoint": "callbacks.checkpointing",
    "AtomicCheckpointIO": "callbacks.checkpointing",
    "checkpoint_plugins": "callbacks.checkpointing",
    "ReproducibleSteps": "callbacks.reproducible",
    "Preemption": "callbacks.preemption",
    "AppendingCSVLogger": "callbacks.loggers",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
