"""The oldest releases whose APIs genloc calls, checked at import: an older install fails at once with
one line naming the package and the release needed, not later with an AttributeError deep inside
decoding. Only what genloc itself imports; the training side checks Lightning the same way
(lightning_modules/__init__.py). The same lower bounds are in pyproject.toml
(tests/test_gpu_readiness.py keeps them equal)."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import InvalidVersion, Version

# distribution name -> oldest tested release: the GPU image of docs/gpu.md ran torch 2.11 and timm 1.0.29;
# transformers 4.56 (the first with GPT-2's KV cache as Cache.layers) passed the model and sampler tests
# in scripts/check_floor.sh; open_clip 3.3 is the only release tested.
MINIMUM = {
    "torch": "2.11",
    "transformers": "4.56",
    "timm": "1.0.29",
    "open_clip_torch": "3.3",
}


def check(minimum: dict[str, str] = MINIMUM) -> None:
    """Raise ImportError (one line) for the first installed package older than its minimum."""
    for name in minimum:
        try:
            found = version(name)
            release = Version(found).release
        except PackageNotFoundError:
            continue  # a missing package fails at its own import with its own message
        except InvalidVersion:
            continue  # a source build without a release number: nothing to compare
        if release < Version(minimum[name]).release:
            raise ImportError(f"genloc needs {name}>={minimum[name]} (found {found}): "
                              f"pip install '{name}>={minimum[name]}'")


check()
