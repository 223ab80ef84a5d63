"""genloc.files: the one atomic writer (every tool's JSON, PNG, checkpoint and run file goes through
it) and the one JSONL reader."""
import os
import stat

import pytest
from PIL import Image

from genloc import files


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    files.write_json(path, {"a": 1})

    def dying(f, data):
        f.write(bytes(data)[:3])
        raise OSError("simulated crash")

    monkeypatch.setattr(files, "write_bytes", dying)
    with pytest.raises(OSError, match="simulated crash"):
        files.write_json(path, {"a": 2})
    assert path.read_text() == '{\n "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_files_get_the_umask_permissions_not_a_private_temporary_mode(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_atomic(tmp_path / "a.txt", "text")
        files.save_image(tmp_path / "a.png", Image.new("RGB", (4, 3), (9, 8, 7)))
    finally:
        os.umask(old)
    for name in ("a.txt", "a.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert (tmp_path / "a.txt").read_text() == "text"
    assert Image.open(tmp_path / "a.png").getpixel((3, 2)) == (9, 8, 7)


def test_jsonl_round_trip_and_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    files.write_jsonl(path, [{"key": "a", "boxes": []}, {"key": "b"}])
    assert list(files.read_jsonl(path)) == [(1, {"key": "a", "boxes": []}), (2, {"key": "b"})]
    path.write_text('{"key": "a"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:3: expected a JSON object"):
        list(files.read_jsonl(path))
    path.write_text('{"key": \n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1: not a JSON line"):
        list(files.read_jsonl(path))


def test_a_full_disk_names_the_file_and_keeps_the_previous_version(tmp_path, monkeypatch):
    import errno

    path = tmp_path / "boxes.json"
    files.write_json(path, {"a": 1})

    def full(f, data):
        f.write(bytes(data)[:2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_bytes", full)
    with pytest.raises(files.OutputError) as err:
        files.write_json(path, {"a": 2})
    assert str(path) in str(err.value) and "disk is full" in str(err.value)
    assert path.read_text() == '{\n "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes.json"]


def test_prepare_output_dir_creates_and_refuses_with_one_line(tmp_path):
    made = files.prepare_output_dir(tmp_path / "a" / "b")
    assert made.is_dir() and list(made.iterdir()) == []  # the write probe is removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(files.OutputError, match="--out .*file: is an existing file"):
        files.prepare_output_dir(tmp_path / "file")
    with pytest.raises(files.OutputError, match="a parent of it is a file"):
        files.prepare_output_dir(tmp_path / "file" / "sub", flag="--out")


def test_prepare_output_dir_on_a_read_only_file_system(tmp_path, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    def read_only(p, *a, **k):  # root ignores permission bits, so the file system's refusal is simulated
        if str(p).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(p, *a, **k)

    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(files.OutputError, match=r"--model-out .*ro.*cannot write there: it is not writable"):
        files.prepare_output_dir(tmp_path / "ro", flag="--model-out")
