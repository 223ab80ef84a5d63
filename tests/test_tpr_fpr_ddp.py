"""DDP correctness of TPRFPR: 2 gloo CPU processes with uneven per-rank sample counts give the
single-process result. Runs the spawn script as a subprocess (DDP inside pytest can hang)."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_tpr_fpr_script.py")


@pytest.mark.slow
def test_ddp_result_equals_single_process(tmp_path):
    out = tmp_path / "result.txt"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text() == "OK"
