"""`pip install` gives the model and the placement API: the package is built and installed into an
empty folder (no network, no build isolation) and used from outside the repository, as a user of a
model folder would: the model card's snippet runs as written, an object is inserted with a tiny
pipeline, the `genloc` command places two objects in each of three photos (a rerun skips them), a
checkpoint written before the rename loads, and nothing of the training side is imported."""
import gzip
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from genloc import GenLocModel, LocationModelConfig
from genloc.testing import save_tiny_sd_inpainter
from tests.helpers import FIXTURES, ROOT

PHOTO = FIXTURES / "libcom" / "controllable_composition" / "background" / "000000049931.png"
PHOTOS = [PHOTO, FIXTURES / "libcom" / "controllable_composition" / "background" / "000000460450.png",
          FIXTURES / "opa_sample" / "reconstructed" / "580029_background_reconstructed.png"]
# What pyproject.toml builds the package from.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "genloc")

AFTER_SNIPPET = """
import sys
import genloc
from genloc.hub import load_model
from genloc.inpainters import load_backend
from PIL import Image

edit = load_backend("sd", sys.argv[1], steps=2).insert(Image.open("photo.jpg"), "person", box=boxes.boxes[0].tolist(),
                                                       seed=0)
edit.image.save("edit.png")
old = load_model(sys.argv[2])  # a checkpoint written before the package was named genloc
print("GENLOC", genloc.__file__)
print("LOADED", sorted({m.split(".")[0] for m in sys.modules} & {"lightning", "lightning_modules", "datamodules",
      "callbacks", "metrics", "omegaconf", "webdataset", "models"}))
"""


def _copy_sources(source):
    """A copy of what the package is built from: building writes build/ and *.egg-info beside the sources."""
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    return source


@pytest.mark.slow
def test_installing_genloc_keeps_the_installed_torch(tmp_path):
    """torch (and its torchvision pair) installed first, for the platform, inside the range: `pip install`
    of genloc with every extra that runs the model would change neither (pip's own resolution, dry run; without
an index, so a range that excluded the installed torch, or an extra that pinned another torchvision, fails)."""
    source = _copy_sources(tmp_path / "source")
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-build-isolation",
                           "--no-index", "--report", str(report), f"{source}[insert,train,bench]"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert set(planned) == {"genloc"}, planned  # nothing else installed, replaced or upgraded


def test_installed_package_runs_the_model_card_outside_the_repository(tmp_path):
    source, target, work = _copy_sources(tmp_path / "source"), tmp_path / "target", tmp_path / "work"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--no-index", "--target", str(target), str(source)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    assert (target / "genloc" / "genloc-tiny-text.json").is_file()  # package data

    torch.manual_seed(0)
    model_dir = tmp_path / "tiny_model"
    GenLocModel(LocationModelConfig.preset("tiny")).save_pretrained(model_dir,
                                                                     model_card_kwargs={"model_id": str(model_dir)})
    sd_dir = save_tiny_sd_inpainter(tmp_path / "sd")
    old_checkpoint = tmp_path / "old.ckpt"
    old_checkpoint.write_bytes(gzip.decompress((FIXTURES / "pre_genloc" / "model.ckpt.gz").read_bytes()))
    work.mkdir()
    Image.open(PHOTO).convert("RGB").save(work / "photo.jpg")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}

    snippet = re.search(r"```python\n(.*?)```", (model_dir / "README.md").read_text(), re.S).group(1)
    run = subprocess.run([sys.executable, "-c", snippet + AFTER_SNIPPET, str(sd_dir), str(old_checkpoint)], cwd=work,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("GENLOC", "LOADED")))
    assert lines["GENLOC"].startswith(str(target))  # the installed copy, not the repository's
    assert lines["LOADED"] == "[]"
    assert run.stdout.count("tensor(") >= 3  # the card's boxes, log-probabilities and group
    assert Image.open(work / "edit.png").size == Image.open(PHOTO).size

    # the acceptance, installed: a folder of three real photos, two classes; a rerun skips all three
    (work / "photos").mkdir()
    for photo in PHOTOS:
        shutil.copy(photo, work / "photos" / photo.name)
    place = [str(target / "bin" / "genloc"), "place", "--model", str(model_dir), "--image", "photos", "--category",
             "person", "car", "--out", "out"]
    command = subprocess.run(place, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert command.returncode == 0, command.stderr
    done = [json.loads(line) for line in (work / "out" / "boxes.jsonl").read_text().splitlines()]
    assert sorted(line["image"] for line in done) == sorted(f"photos/{p.name}" for p in PHOTOS)
    for line in done:
        (x1, y1, x2, y2), (u1, v1, u2, v2) = (b["box"] for b in line["boxes"])
        assert min(x2, u2) <= max(x1, u1) or min(y2, v2) <= max(y1, v1), line  # disjoint
        assert Image.open(work / "out" / line["overlay"]).size == tuple(line["image_size"])
    again = subprocess.run(place, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "3 of 3 photo(s) already in" in again.stdout, again.stderr
