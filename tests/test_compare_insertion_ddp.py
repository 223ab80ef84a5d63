"""scripts/compare_insertion.py under torchrun: 2 gloo CPU ranks share 5 photos (3 and 2) and write the
files of one process, bit for bit; a rerun with another number of ranks redoes only what is missing."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from scripts import compare_insertion
from genloc.testing import save_instruct_pix2pix, save_sd, save_tiny_open_clip
from tests.helpers import ROOT

PHOTOS = {"astronaut": "person", "coffee": "cup", "chelsea": "cat", "rocket": "car", "camera": "person"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("compare_ddp")
    (root / "photos").mkdir()
    lines, rows = [], ["image,category"]
    for i, (name, category) in enumerate(PHOTOS.items()):
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image = image.resize((96 + 8 * i, 80), Image.BICUBIC)  # sizes differ: crop and whole-image paths
        image.save(root / "photos" / f"{name}.png")
        rows.append(f"{name}.png,{category}")
        lines.append(json.dumps({"key": name, "boxes": [[10 + 4 * i, 12.0, 60.0, 70.0]]}))
    (root / "photos" / "pairs.csv").write_text("\n".join(rows) + "\n")
    (root / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    clip_cfg, clip_weights = save_tiny_open_clip(root / "clip")
    methods = [f"sd=sd:{save_sd(root / 'sd')}", f"ip2p=instruct-pix2pix:{save_instruct_pix2pix(root / 'ip2p')}"]
    return ["--images", str(root / "photos"), "--boxes", str(root / "boxes.jsonl"), "--steps", "2",
            "--clip-weights", str(clip_weights), "--clip-config", str(clip_cfg), "--grid-cell", "64",
            "--device", "cpu", "--methods", *methods]


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_ranks_write_the_files_of_one_process(inputs, tmp_path, monkeypatch):
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    assert compare_insertion.main([*inputs, "--out", str(single)]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "scripts.compare_insertion", *inputs, "--out", str(ranks)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2: 3 of 5 images" in proc.stdout and "rank 1 of 2: 2 of 5 images" in proc.stdout
    assert proc.stdout.count("wrote ") == 1  # rank zero alone merges and reports
    files = _files(single)
    assert len([f for f in files if f.endswith(".scores.json")]) == 2 * len(PHOTOS)
    assert _files(ranks) == files  # edits, scores, boxes, results, table and grid

    # rank one's edit of coffee lost (killed before its record): one process redoes that edit, nothing else
    (ranks / "edits" / "sd" / "coffee.json").unlink()
    (ranks / "edits" / "sd" / "coffee.scores.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (ranks / "edits").rglob("*") if p.is_file()}
    monkeypatch.setattr(compare_insertion, "load_editor", lambda *a, **k: pytest.fail("reloaded an editor"))
    assert compare_insertion.main([*inputs, "--out", str(ranks)]) == 0
    changed = sorted(p.name for p in (ranks / "edits").rglob("*") if p.is_file() and stamps.get(p) != p.stat().st_mtime_ns)
    assert changed == ["coffee.json", "coffee.png", "coffee.scores.json"]
    assert _files(ranks) == files
