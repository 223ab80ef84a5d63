"""The inpainting callback's edits shared by 2 gloo CPU ranks give the metrics and the pictures of one
process (tests/scripts/ddp_inpainting.py, run as subprocesses: DDP inside pytest can hang)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_inpainting.py"


@pytest.mark.slow
def test_two_ranks_log_the_values_of_one_process(tmp_path):
    from genloc.testing import save_tiny_open_clip, save_tiny_sd_inpainter

    inpainter = save_tiny_sd_inpainter(tmp_path / "sd")
    clip_config, clip_weights = save_tiny_open_clip(tmp_path / "clip")
    for mode in ("single", "ddp"):
        proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(inpainter), str(clip_config), str(clip_weights),
                               str(tmp_path / mode)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "single" / "single_rank0.json").read_text())
    ranks = [json.loads((tmp_path / "ddp" / f"ddp_rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(single["pictures"]) == [f"val/inpaint/{i}" for i in range(5)]
    assert ranks[0]["pictures"] == single["pictures"]  # rank zero gathered rank one's edits, each the same edit
    for name in ("val/inpaint_background_ssim", "val/inpaint_clip_score"):
        assert 0 < abs(single[name]) <= 1
        assert ranks[0][name] == ranks[1][name] == pytest.approx(single[name], abs=1e-6)


@pytest.mark.parametrize("total", [0, 1, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shares_are_disjoint_and_cover_the_set(total, world):
    from metrics.ranks import gather_to_rank_zero, rank_indices

    shares = [list(rank_indices(total, rank, world)) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(total))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert gather_to_rank_zero({"a": 1}) == [{"a": 1}]  # no process group: this process's object alone
    with pytest.raises(ValueError, match="rank 2 is not one of world size 2"):
        rank_indices(total, 2, 2)
