#!/usr/bin/env bash
# The base install at its floors: a scratch venv (no system site-packages) with torch, then genloc with
# the oldest releases pyproject.toml allows of the packages whose APIs it calls, then the model tests.
# Not part of `make test` (it builds a ~6 GB environment); run it when a floor moves:
#   scripts/check_floor.sh [VENV]            (default /tmp/genloc-floor; FLOORS="pkg==x ..." overrides)
# torch is installed first, as a user would for their platform (docs/gpu.md), and must be kept.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-/tmp/genloc-floor}
TORCH=${TORCH:-"torch==2.14.1 torchvision==0.29.1"}
FLOORS=${FLOORS:-"transformers==4.56.0 huggingface_hub==0.34.0 safetensors==0.8.0 timm==1.0.29 open_clip_torch==3.3.0"}
TESTS=${TESTS:-"tests/test_location_model.py tests/test_sampler.py tests/test_size_control.py"}

python3 -m venv --clear "$VENV"
"$VENV/bin/pip" install --quiet $TORCH
before=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
# the floors pinned beside the package: pip fails here if one lies outside pyproject's ranges
"$VENV/bin/pip" install --quiet "$ROOT" $FLOORS pytest
after=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
[ "$before" = "$after" ] || { echo "check_floor: installing genloc replaced torch $before by $after" >&2; exit 1; }
"$VENV/bin/pip" check
"$VENV/bin/pip" list --format=freeze | grep -iE "^(torch|transformers|huggingface.hub|safetensors|timm|open.clip.torch)=="
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
cd "$(mktemp -d)"  # a model folder round trip through the installed package (huggingface_hub, safetensors)
"$VENV/bin/python" - <<'PY'
import torch
from genloc import GenLocModel, LocationModelConfig, place
torch.manual_seed(0)
GenLocModel(LocationModelConfig.preset("tiny")).save_pretrained("m")
model = GenLocModel.from_pretrained("m", force_download=False, revision=None)
print("round trip:", tuple(place(model, torch.rand(3, 80, 120), "car", n=4, seed=0).boxes.shape))
PY
cd "$ROOT"  # the model tests (the checkout's genloc is the installed one's source)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider $TESTS
