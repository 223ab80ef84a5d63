"""DDP correctness of TPRFPR and TprFprCallback: 2 gloo CPU processes with uneven per-rank sample
counts give the single-process result. Runs a script as a subprocess (DDP inside pytest can hang)."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_tpr_fpr.py"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["metric", "callback"])
def test_ddp_result_equals_single_process(tmp_path, mode):
    out = tmp_path / "result.txt"
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(out)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text() == "OK"
