"""Outputs are checked before work (docs/reliability.md): evaluate.py --out, scripts.export --out and
scripts.compare_insertion --out that name an existing file or a read-only location are one line and
exit 2 before any model loads or sample is drawn; a full disk during a write keeps the previous good
file and leaves no partial one; an exported model.safetensors follows the umask."""
import builtins
import errno
import os
import re
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image

import evaluate
from genloc import LocationModel, LocationModelConfig
from genloc.files import OutputError
from metrics.annotations import EvaluationError
from scripts import export as export_script
from tests.helpers import ROOT
from tests.test_evaluate_inputs import perfect, shards, write_preds  # noqa: F401  (shards: a fixture)


def read_only(monkeypatch, root):
    """Writes under ``root`` fail as on a read-only file system (root ignores permission bits, so the
    file system's refusal is simulated, as tests/test_files.py does)."""
    real_open = builtins.open

    def guarded(p, *a, **k):
        if str(p).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(p, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)


def disk_full_after(monkeypatch, allowed: int):
    """Every atomic write after the first ``allowed`` ones fails with ENOSPC after writing two bytes."""
    from genloc import files

    real = files.write_bytes
    count = [0]

    def write(f, data):
        count[0] += 1
        if count[0] > allowed:
            f.write(bytes(data)[:2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)

    monkeypatch.setattr(files, "write_bytes", write)


@pytest.fixture
def no_model(monkeypatch):
    import metrics.evaluation

    monkeypatch.setattr(metrics.evaluation, "evaluation_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(metrics.evaluation, "load_annotations",
                        lambda *a, **k: pytest.fail("the annotations were read before the output check"))


# ------------------------------------------------------------------------------------------ evaluate.py
def test_evaluate_out_naming_a_file_fails_before_the_model_loads(tmp_path, no_model):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(OutputError, match=r"--out .*taken: is an existing file"):
        evaluate.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path), "--out",
                       str(tmp_path / "taken"), "--no-progress"])
    proc = subprocess.run([sys.executable, "evaluate.py", "--model", str(tmp_path / "model"), "--data",
                           str(tmp_path), "--out", str(tmp_path / "taken")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "evaluate.py: error: --out" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_out_on_a_read_only_location_fails_before_the_model_loads(tmp_path, monkeypatch, no_model):
    read_only(monkeypatch, tmp_path / "ro")
    with pytest.raises(OutputError, match=r"--out .*ro.*cannot write there: it is not writable"):
        evaluate.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path), "--out",
                       str(tmp_path / "ro"), "--no-progress"])
    with pytest.raises(OutputError, match=r"--out .*ro.*not writable"):  # --plot checks its folder too
        evaluate.main(["--plot", str(tmp_path / "metrics.json"), "--out", str(tmp_path / "ro" / "fig.png")])


def test_a_full_disk_keeps_the_previous_results_and_leaves_no_partial_file(shards, tmp_path, monkeypatch):  # noqa: F811
    preds = write_preds(tmp_path / "p.jsonl", perfect())
    args = ["--predictions", str(preds), "--annotations", str(shards), "--out", str(tmp_path / "res"), "--no-progress"]
    evaluate.main(args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "res").iterdir()}
    assert sorted(before) == ["metrics.json", "tpr_fpr.png"]
    disk_full_after(monkeypatch, 0)
    with pytest.raises(OutputError, match=r"metrics\.json: could not be written \(the disk is full"):
        evaluate.main([*args, "--name", "second"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "res").iterdir()} == before

    import matplotlib.figure

    def full(self, path, **kwargs):
        open(path, "wb").write(b"\x89P")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.undo()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(OutputError, match=r"tpr_fpr\.png: could not be written \(the disk is full"):
        evaluate.main([*args, "--name", "third"])
    assert (tmp_path / "res" / "tpr_fpr.png").read_bytes() == before["tpr_fpr.png"]
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["metrics.json", "tpr_fpr.png"]


def test_rerank_with_another_splits_predictions_fails_before_re_ranking(shards, tmp_path, monkeypatch):  # noqa: F811
    import metrics.evaluation

    monkeypatch.setattr(metrics.evaluation, "evaluation_model", lambda *a, **k: pytest.fail("re-ranking started"))
    other = {f"val-{i}": b for i, b in enumerate(perfect().values())}
    with pytest.raises(EvaluationError, match=r"none of the 8 prediction keys match the 8 keys of split 'test' "
                                              r"\(predictions e\.g\. \['val-0'.*split 'test' e\.g\. \['s0'.*another "
                                              r"split") as exc:
        evaluate.main(["--predictions", str(write_preds(tmp_path / "p.jsonl", other)), "--data", str(shards),
                       "--rerank", "model", "--keep", "10", "--out", str(tmp_path / "o"), "--no-progress"])
    assert "0 prediction keys" not in str(exc.value)


# ------------------------------------------------------------------------------------------ scripts.export
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LocationModelConfig.preset("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"hyper_parameters": {"model_config": cfg.to_dict()},
                "state_dict": {"model." + k: v for k, v in LocationModel(cfg).state_dict().items()}}, path)
    return path


@pytest.fixture
def model_never_loads(monkeypatch):
    import genloc.hub

    monkeypatch.setattr(genloc.hub, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("where", ["file", "read-only"])
def test_export_out_that_cannot_be_written_is_one_line_before_loading(checkpoint, tmp_path, monkeypatch, capsys,
                                                                       model_never_loads, where):
    if where == "file":
        (tmp_path / "taken").write_text("x")
        out, says = tmp_path / "taken" / "model", r"its folder .*taken: is an existing file"
    else:
        read_only(monkeypatch, tmp_path / "ro")
        out, says = tmp_path / "ro" / "model", r"its folder .*ro: cannot write there: it is not writable"
    assert export_script.main(["--model", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"export: error: --out {out}: ") and "Traceback" not in err
    assert re.search(says, err), err


def test_export_on_a_full_disk_keeps_the_previous_export(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    assert export_script.main(["--model", str(checkpoint), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import safetensors.torch

    def full(model, filename, *a, **k):
        open(filename, "wb").write(b"12")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    assert export_script.main(["--model", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "previous export there is kept" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial folder


def test_exported_weights_follow_the_umask_like_the_other_files(checkpoint, tmp_path):
    old = os.umask(0o022)
    try:
        assert export_script.main(["--model", str(checkpoint), "--out", str(tmp_path / "model")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644, "README.md": 0o644}


# ------------------------------------------------------------------------------------------ compare_insertion
@pytest.mark.parametrize("where", ["file", "read-only"])
def test_compare_insertion_out_that_cannot_be_written_is_one_line_before_loading(checkpoint, tmp_path, monkeypatch,
                                                                                 capsys, model_never_loads, where):
    from scripts import compare_insertion
    from genloc.testing import save_sd

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(photos / "a.png")
    (photos / "pairs.csv").write_text("image,category\na.png,dog\n")
    sd = save_sd(tmp_path / "sd")
    capsys.readouterr()  # the builder's progress bars
    if where == "file":
        (tmp_path / "taken").write_text("x")
        out, says = tmp_path / "taken", "is an existing file"
    else:
        read_only(monkeypatch, tmp_path / "ro")
        out, says = tmp_path / "ro", "cannot write there: it is not writable"
    code = compare_insertion.main(["--images", str(photos), "--model", str(checkpoint), "--out", str(out),
                                   "--methods", f"genloc+sd=sd:{sd}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"--out {out}: {says}" in err, err
    assert "Traceback" not in err and not list(tmp_path.glob("**/settings.json"))
