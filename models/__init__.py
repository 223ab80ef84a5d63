"""Pure-PyTorch GenLoc location model (no Lightning): tokenizer, config/presets, model + sampler."""
from .box_tokenizer import BoxTokenizer
from .config import LocationModelConfig
from .location_model import LocationModel, SampleOutput
from .pretrained import PretrainedWeightsError
from .sampling import draw_tokens, filter_logits

__all__ = ["BoxTokenizer", "LocationModelConfig", "LocationModel", "SampleOutput", "PretrainedWeightsError",
           "draw_tokens", "filter_logits"]
