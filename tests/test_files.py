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
