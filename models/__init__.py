"""Pure-PyTorch GenLoc location model (no Lightning): tokenizer, config/presets, model + sampler,
Hub-style model files and the one-call placement API."""
from . import versions  # noqa: F401  (first: its import checks the installed releases)
from .box_tokenizer import BoxTokenizer
from .config import LocationModelConfig
from .hub import GenLocModel, ModelFilesError, load_model
from .location_model import ExtentMask, LocationModel, SampleOutput
from .placement import NoValidSetError, Placement, PlacementSet, place, place_many
from .pretrained import PretrainedWeightsError
from .sampling import draw_tokens, filter_logits

__all__ = ["BoxTokenizer", "LocationModelConfig", "LocationModel", "SampleOutput", "ExtentMask", "PretrainedWeightsError",
           "draw_tokens", "filter_logits", "GenLocModel", "ModelFilesError", "load_model", "place", "place_many",
           "Placement", "PlacementSet", "NoValidSetError"]
