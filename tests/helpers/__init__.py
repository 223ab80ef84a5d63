"""Code shared by tests (never imported by the project, benchmarks or scripts): paths, tiny runs,
batches. Tiny random pipelines live in scripts/tiny_builders.py and scripts/tiny_inpainters.py and the
naive decoder in benchmarks/reference_decode.py, because the README examples and benchmarks use them too."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
