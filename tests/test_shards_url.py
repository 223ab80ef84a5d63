"""Shards read from URLs (fsspec: memory://, file://, http:// from a server on 127.0.0.1; pipe:
commands): the same samples as from the local folder, and missing splits, unreachable hosts, missing
shards and shards breaking off mid-stream give the errors or counted skips local files give."""
import functools
import http.server
import json
import logging
import tarfile
import threading

import fsspec
import pytest

import evaluate
from datamodules import ShardDataModule
from datamodules.pipeline import EpochLoader, ShardStream
from datamodules.shard_format import ShardFormatError
from datamodules.shard_reader import iter_annotations, read_split_info
from tests.helpers.runs import assert_same_steps, quick_overrides, read_ranks, run_fit


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files; a file named in ``server.truncate`` is announced whole but cut off halfway."""

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        if self.path.rsplit("/", 1)[-1] in self.server.truncate:
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().copyfile(source, outputfile)


class ShardServer:
    """An HTTP server on 127.0.0.1 over ``root`` in a thread (``with ShardServer(root) as url: ...``)."""

    def __init__(self, root, truncate=()):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
        self.httpd.truncate = set(truncate)
        self.httpd.daemon_threads = True

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    from datamodules.toy import write_toy_split

    root = tmp_path_factory.mktemp("served")
    write_toy_split(root / "toy-opa", "toy-opa", "train", 24, seed=0, num_shards=3, progress=False)
    write_toy_split(root / "toy-opa", "toy-opa", "val", 10, seed=1, num_shards=2, progress=False)
    return root


def _keys(data_dir, split="val", train=False, **kwargs):
    stream = ShardStream(data_dir, split, image_size=16, batch_size=4, train=train, shuffle_buffer=8, seed=2, **kwargs)
    return [b["key"] for b in EpochLoader(stream, epoch_fn=lambda: 1)], stream


@pytest.fixture
def memory_copy(toy_folder):
    """The toy folder copied into fsspec's in-process memory filesystem."""
    fs = fsspec.filesystem("memory")
    for path in (toy_folder / "toy-opa").iterdir():
        fs.pipe_file(f"/genloc-test/toy-opa/{path.name}", path.read_bytes())
    yield "memory://genloc-test/toy-opa"
    fs.rm("/genloc-test", recursive=True)


def test_memory_and_file_urls_read_the_same_samples_as_the_folder(toy_folder, memory_copy):
    local = toy_folder / "toy-opa"
    for split, train in (("val", False), ("train", True)):
        expected, _ = _keys(local, split, train)
        assert _keys(memory_copy, split, train)[0] == expected
        assert _keys(f"file://{local}", split, train)[0] == expected
    info = read_split_info(memory_copy, "train")
    assert info.paths[0] == "memory://genloc-test/toy-opa/train-000000.tar" and info["num_samples"] == 24
    def without_shard(samples):
        return [{k: v for k, v in s.items() if k != "shard"} for s in samples]

    assert without_shard(iter_annotations(memory_copy, "val")) == without_shard(iter_annotations(local, "val"))


def test_datamodule_and_evaluate_accept_a_url(toy_folder, memory_copy, tmp_path):
    dm = ShardDataModule(memory_copy, image_size=16, batch_size=4, test_split=None)
    assert dm.missing_splits() == []
    dm.prepare_data()
    dm.setup("fit")
    assert [b["key"] for b in dm.val_dataloader()] == _keys(toy_folder / "toy-opa")[0]
    other = ShardDataModule(memory_copy, val_split="test", kind="toy")
    assert other.missing_splits() == [memory_copy + "/test.json"]
    other.prepare_data()  # the toy kind writes missing data into local folders only
    assert not fsspec.filesystem("memory").exists("/genloc-test/toy-opa/test.json")
    doc = evaluate.main(["--baseline", "random", "--data", memory_copy, "--split", "val", "--out", str(tmp_path),
                         "--no-progress"])
    assert doc["metrics"]["num_samples"] == 10


def test_http_url_reads_like_the_folder_and_errors_like_it(toy_folder):
    with ShardServer(toy_folder) as base:
        url = f"{base}/toy-opa"
        assert _keys(url)[0] == _keys(toy_folder / "toy-opa")[0]
        assert _keys(url, "train", True)[0] == _keys(toy_folder / "toy-opa", "train", True)[0]
        with pytest.raises(ShardFormatError, match=r"missing split file http://.*/toy-opa/test\.json \(nothing at that URL\)"):
            read_split_info(url, "test")
        assert ShardDataModule(url, val_split="test").missing_splits() == [f"{url}/test.json"]
        port = base.rsplit(":", 1)[1]
    with pytest.raises(ShardFormatError, match=rf"cannot read http://127\.0\.0\.1:{port}/toy-opa/val\.json .*network"):
        read_split_info(url, "val")  # the server is gone: unreachable, not "missing"
    with pytest.raises(ShardFormatError, match="cannot read"):
        ShardDataModule(url).missing_splits()


def test_missing_shard_behind_a_url_is_named(toy_folder, tmp_path):
    folder = tmp_path / "toy-opa"
    folder.mkdir()
    for path in (toy_folder / "toy-opa").glob("val*"):
        if path.name != "val-000001.tar":
            (folder / path.name).write_bytes(path.read_bytes())
    with ShardServer(tmp_path) as base:
        with pytest.raises(ShardFormatError, match=r"lists 2 shards but 1 are missing, e\.g\. http://.*val-000001\.tar"):
            read_split_info(f"{base}/toy-opa", "val")


def test_shard_breaking_off_mid_stream_is_a_counted_skip(toy_folder, caplog):
    sizes = json.loads((toy_folder / "toy-opa" / "val.json").read_text())["shard_sizes"]
    complete = set(sum(_keys(toy_folder / "toy-opa")[0], []))
    with ShardServer(toy_folder, truncate={"val-000000.tar"}) as base, caplog.at_level(logging.WARNING, "datamodules"):
        keys, stream = _keys(f"{base}/toy-opa")
    read = sum(keys, [])
    assert stream.num_skipped >= 1 and "skipping unreadable tar data" in caplog.text
    assert set(read) < complete and len(read) >= sizes[1]  # part of the first shard, the second whole
    with tarfile.open(toy_folder / "toy-opa" / "val-000001.tar") as tar:
        second = {name.split(".", 1)[0] for name in tar.getnames()}
    assert second <= set(read)


def test_pipe_command_folder(toy_folder):
    local = toy_folder / "toy-opa"
    assert _keys(f"pipe:cat {local}/{{}}")[0] == _keys(local)[0]
    with pytest.raises(ShardFormatError, match=r"cannot read pipe:cat .*/nowhere/val\.json .*status 1"):
        read_split_info(f"pipe:cat {toy_folder}/nowhere/{{}}", "val")
    with pytest.raises(ShardFormatError, match=r"without a \{\}"):
        read_split_info(f"pipe:cat {local}/val.json", "val")


@pytest.mark.slow
def test_two_ddp_ranks_train_from_http_exactly_as_from_local_files(toy_folder, tmp_path):
    """trainer=ddp_cpu, 1 data worker per rank: step counts and every rank's batches (keys, in order)
    match between the shards served over HTTP and the same shards read from disk."""
    runs = {}
    with ShardServer(toy_folder) as base:
        for name, data_dir in (("local", toy_folder / "toy-opa"), ("http", f"{base}/toy-opa")):
            out = tmp_path / name
            out.mkdir()
            overrides = quick_overrides(data_dir, tmp_path / name / "runs", steps=4, every=2) + [
                "trainer=ddp_cpu", "data.num_workers=1"]
            proc = run_fit(overrides, {"GENLOC_TEST_OUT": str(out)}, timeout=420)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[name] = read_ranks(out)
    assert_same_steps(runs["http"], 4)
    assert [r["keys"] for r in runs["http"]] == [r["keys"] for r in runs["local"]]


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung shard server)."""

    def __init__(self):
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.held = []

    def __enter__(self) -> str:
        def accept():
            while True:
                try:
                    self.held.append(self.sock.accept()[0])
                except OSError:
                    return
        threading.Thread(target=accept, daemon=True).start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_server_that_never_answers_is_retried_with_a_line_each_time_then_named(monkeypatch, capsys):
    import time

    monkeypatch.setenv("GENLOC_URL_TIMEOUT", "1")
    monkeypatch.setenv("GENLOC_URL_ATTEMPTS", "2")
    with SilentServer() as url:
        start = time.monotonic()
        with pytest.raises(ShardFormatError, match=r"cannot read .*val\.json.*no answer within 1 s, 2 attempts"):
            read_split_info(url + "/toy-opa", "val")
        waited = time.monotonic() - start
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"{url}/toy-opa/val.json: no answer within 1 s; retrying, attempt 2 of 2"]
    assert waited < 30  # two bounded attempts, not aiohttp's five silent minutes


@pytest.mark.parametrize("name, value", [("GENLOC_URL_TIMEOUT", "soon"), ("GENLOC_URL_ATTEMPTS", "0")])
def test_bad_url_wait_settings_are_one_line(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ShardFormatError, match=f"{name}='{value}' must be a positive"):
        read_split_info("http://127.0.0.1:9/toy-opa", "val")
