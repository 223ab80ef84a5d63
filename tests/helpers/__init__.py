"""Code shared by tests (never imported by the project, benchmarks or scripts): paths, tiny runs,
batches. Tiny random models, pipelines and the naive decoder live in `genloc.testing` (public: the
examples, benchmarks and users' own tests use them too)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
