"""Storage stalls are named as stalls (issue 30): a shard server that accepts the connection and stops
answering in the middle of a shard gets a per-read timeout and bounded retries that continue where
the read stopped, one line each naming the URL, the timeout and the attempt; when they run out the
error says the storage stopped answering (not that the shard is damaged) and train.py exits with one
line. Bad GENLOC_URL_* values are one line naming the variable. Short timeouts keep the tests quick."""
import functools
import http.server
import threading
import time

import pytest

import train as train_script
from datamodules.shard_reader import StorageStalled, open_binary
from tests.helpers.runs import tiny_run_overrides


class _StallingHandler(http.server.SimpleHTTPRequestHandler):
    """Static files; the first ``server.stalls`` requests of ``server.stall_file`` send its first half,
    then go silent (the connection stays open) until the server closes."""

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        server = self.server
        if self.path.rsplit("/", 1)[-1] == server.stall_file:
            with server.lock:
                stall = server.stalls > 0
                server.stalls -= 1
            if stall:
                data = source.read()
                outputfile.write(data[: len(data) // 2])
                outputfile.flush()
                server.closing.wait(60)
                self.close_connection = True
                return
        super().copyfile(source, outputfile)


class StallingServer:
    """``with StallingServer(root, "train-000000.tar", stalls=1) as url``: HTTP on 127.0.0.1 in a thread."""

    def __init__(self, root, stall_file: str, stalls: int):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(_StallingHandler, directory=str(root)))
        self.httpd.stall_file, self.httpd.stalls = stall_file, stalls
        self.httpd.lock, self.httpd.closing = threading.Lock(), threading.Event()
        self.httpd.daemon_threads = True

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from datamodules.toy import write_toy_split

    root = tmp_path_factory.mktemp("served")
    write_toy_split(root / "toy-pipe", "toy-pipe", "train", 16, seed=0, num_shards=2, progress=False)
    write_toy_split(root / "toy-pipe", "toy-pipe", "val", 8, seed=1, num_shards=2, progress=False)
    return root


@pytest.fixture
def short_waits(monkeypatch):
    monkeypatch.setenv("GENLOC_URL_TIMEOUT", "1")
    monkeypatch.setenv("GENLOC_URL_ATTEMPTS", "2")


def test_a_stall_mid_shard_is_retried_from_where_it_stopped_with_one_line(served, short_waits, capsys):
    shard = served / "toy-pipe" / "train-000000.tar"
    with StallingServer(served, shard.name, stalls=1) as base:
        url = f"{base}/toy-pipe/{shard.name}"
        with open_binary(url) as stream:
            assert stream.read() == shard.read_bytes()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{url}: ") and "at byte" in lines[0], lines
    assert lines[0].endswith("(timeout 1 s); retrying from there, attempt 2 of 2"), lines


def test_a_server_that_keeps_stalling_is_named_as_stalled_storage_in_bounded_time(served, short_waits, capsys):
    shard = served / "toy-pipe" / "train-000000.tar"
    with StallingServer(served, shard.name, stalls=100) as base:
        url = f"{base}/toy-pipe/{shard.name}"
        start = time.monotonic()
        with pytest.raises(StorageStalled, match=r"the storage stopped answering at byte \d+ \(no data within 1 s, "
                                                  r"2 attempts\); the shard itself is not known to be damaged"):
            with open_binary(url) as stream:
                stream.read()
        assert time.monotonic() - start < 20
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # the one retry


@pytest.mark.parametrize("workers", [0, 2])
def test_training_from_a_stalled_server_stops_with_one_line_not_a_damaged_shard(served, short_waits, tmp_path, capsys,
                                                                                caplog, workers):
    args = ["experiment=toy_pretrain", "callbacks.tpr_fpr.every_n_val_epochs=0",
            "callbacks.sample_images.every_n_val_epochs=0"]
    with StallingServer(served, "train-000000.tar", stalls=100) as base:
        overrides = tiny_run_overrides(f"{base}/toy-pipe", tmp_path, steps=2) + [f"data.num_workers={workers}"]
        start = time.monotonic()
        code = train_script.main(args + overrides)
        took = time.monotonic() - start
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {base}/toy-pipe/train-000000.tar: the storage stopped answering"), errors
    assert "damaged" not in caplog.text and "holds 0 samples" not in caplog.text
    assert took < 90


@pytest.mark.parametrize("name, value", [("GENLOC_URL_TIMEOUT", "abc"), ("GENLOC_URL_ATTEMPTS", "-1")])
def test_bad_url_settings_stop_train_py_with_one_line_naming_the_variable(served, tmp_path, capsys, monkeypatch,
                                                                          name, value):
    monkeypatch.setenv(name, value)
    with StallingServer(served, "none", stalls=0) as base:
        code = train_script.main(["experiment=toy_pretrain"] + tiny_run_overrides(f"{base}/toy-pipe", tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {name}={value!r} must be a positive"), err


def test_evaluation_and_verify_name_a_stalled_server_in_one_line(served, short_waits, capsys):
    from datamodules import verify
    from metrics.annotations import load_annotations
    from metrics.evaluation import EvaluationError

    with StallingServer(served, "train-000000.tar", stalls=100) as base:
        with pytest.raises(EvaluationError, match=r"train-000000\.tar: the storage stopped answering"):
            load_annotations(f"{base}/toy-pipe", "train")
        assert verify.main([f"{base}/toy-pipe", "--split", "train"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("STALLED  train: ") and "stopped answering" in out[0], out
