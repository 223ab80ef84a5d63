"""Help that answers at once: `genloc --help`, each subcommand's --help, insert.py --help and
evaluate.py --help print their usage without importing torch (nor numpy), so they take a fraction of
a second whatever the machine; checked on the modules loaded, not on a timing."""
import subprocess
import sys

import pytest

from tests.helpers import ROOT

HEAVY = ("torch", "numpy", "transformers", "diffusers", "torchmetrics", "lightning")
# argv -> what the help names
CASES = {
    ("genloc", "--help"): ["place", "insert", "score", "demo"],
    ("genloc", "place", "--help"): ["--image", "--category", "--top-p", "--device", "--out"],
    ("genloc", "insert", "--help"): ["--inpainter", "--backend", "--steps"],
    ("genloc", "score", "--help"): ["--box", "--boxes"],
    ("genloc", "demo", "--help"): ["--model", "--port"],
    ("insert.py", "--help"): ["--clip-weights", "--inpainter"],
    ("evaluate.py", "--help"): ["--model", "--predictions", "--baseline"],
}
RUN = """
import runpy, sys
argv = {argv!r}
sys.argv = list(argv)
try:
    if argv[0] == "genloc":
        from genloc.cli import main
        main(argv[1:])
    else:
        runpy.run_path(argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules), "EXIT", code, file=sys.stderr)
"""


@pytest.mark.parametrize("argv", list(CASES), ids=[" ".join(a) for a in CASES])
def test_help_imports_no_torch(argv):
    out = subprocess.run([sys.executable, "-c", RUN.format(argv=argv, heavy=HEAVY)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert last == "HEAVY [] EXIT 0", out.stderr
    assert out.stdout.startswith("usage:") and all(word in out.stdout for word in CASES[argv]), out.stdout
