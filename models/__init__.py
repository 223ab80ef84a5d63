"""Pure-PyTorch GenLoc location model (no Lightning): tokenizer, config/presets, model + sampler."""
from .box_tokenizer import BoxTokenizer
from .config import LocationModelConfig
from .location_model import LocationModel, SampleOutput, naive_reference_decode
from .pretrained import PretrainedWeightsError

__all__ = ["BoxTokenizer", "LocationModelConfig", "LocationModel", "SampleOutput", "naive_reference_decode",
           "PretrainedWeightsError"]
