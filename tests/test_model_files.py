"""genloc/location_model.py split along its jobs (network, masks, likelihood, sampler): every name the
repository imports from it still comes from there, and no file of the model is too long to read."""
from pathlib import Path

import genloc
from genloc import location_model

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_are_where_they_were():
    for name in ("LocationModel", "ExtentMask", "SampleOutput"):
        assert getattr(location_model, name) is getattr(genloc, name)
    model_methods = ("region_bounds", "extent_mask", "check_extents_fit", "allowed_tokens", "box_log_probs",
                     "box_log_probs_shared", "score_tokens", "sample", "sampling_batch_size", "input_embeds",
                     "step_logits", "build_prefix", "encode_images", "encode_texts")
    assert all(callable(getattr(location_model.LocationModel, m)) for m in model_methods)


def test_each_model_file_is_under_400_lines():
    for name in ("location_model", "masks", "likelihood", "sampler"):
        lines = len((ROOT / "genloc" / f"{name}.py").read_text().splitlines())
        assert lines <= 400, f"genloc/{name}.py has {lines} lines"
