"""Reading shards (format: `datamodules.shard_format`) from a local folder or a URL: the split
index (`read_split_info`), annotation-only samples (`iter_annotations`) and byte streams for the
pipeline (`open_binary`). A URL is anything fsspec opens (``https://``, ``s3://``, ``gs://``,
``file://``, ``memory://``) or a ``pipe:`` command with ``{}`` for the file name (docs/multinode.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from datamodules.shard_format import ShardFormatError, SplitInfo, shard_name


def is_url(data_dir) -> bool:
    """A location read through fsspec (``scheme://...``: http(s), s3, gs, file, memory, ...) or a
    shell command (``pipe:...``) rather than a local folder."""
    text = str(data_dir)
    return text.startswith("pipe:") or "://" in text


def member(data_dir, name: str) -> str:
    """The location of file ``name`` of a shard folder: a path, ``URL/name``, or for ``pipe:``
    the command with ``name`` put where its ``{}`` is (``pipe:aws s3 cp s3://bucket/opa/{} -``)."""
    text = str(data_dir)
    if text.startswith("pipe:"):
        if "{}" not in text:
            raise ShardFormatError(f"data folder {text!r} is a pipe: command without a {{}} where the file name "
                                   f"goes; write e.g. 'pipe:aws s3 cp s3://bucket/opa/{{}} -'")
        return text.replace("{}", name)
    if "://" in text:
        return text.rstrip("/") + "/" + name
    return str(Path(text) / name)


def url_wait() -> tuple[float, int]:
    """(seconds one network request may go without an answer, attempts): ``GENLOC_URL_TIMEOUT``
    (default 60) and ``GENLOC_URL_ATTEMPTS`` (default 3), so no wait is silent for longer."""
    values = []
    for name, default, kind in (("GENLOC_URL_TIMEOUT", "60", float), ("GENLOC_URL_ATTEMPTS", "3", int)):
        text = os.environ.get(name, default)
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise ShardFormatError(f"{name}={text!r} must be a positive {kind.__name__} (unset it for {default})")
        values.append(value)
    return values[0], values[1]


def _filesystem(url: str):
    import fsspec

    if url.startswith(("http://", "https://")):  # aiohttp's own limit is 5 minutes of silence
        import aiohttp

        seconds = url_wait()[0]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)
        return fsspec.core.url_to_fs(url, client_kwargs={"timeout": timeout})
    return fsspec.core.url_to_fs(url)


def _retrying(location: str, request):
    """``request()``, repeated after a request that timed out, with one line per retry; the last
    attempt's timeout propagates."""
    seconds, attempts = url_wait()
    for attempt in range(1, attempts + 1):
        try:
            return request()
        except TimeoutError as err:  # asyncio's and aiohttp's timeouts are TimeoutError subclasses
            if attempt == attempts:
                raise TimeoutError(f"no answer within {seconds:g} s, {attempts} attempts "
                                   "(GENLOC_URL_TIMEOUT, GENLOC_URL_ATTEMPTS)") from err
            print(f"{location}: no answer within {seconds:g} s; retrying, attempt {attempt + 1} of {attempts}",
                  file=sys.stderr, flush=True)


class StorageStalled(RuntimeError):
    """The storage behind a URL stopped answering (not a damaged shard): the message names the URL,
    the timeout and the attempts. Its text stays one line when a DataLoader handler appends to args."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _retried_errors() -> tuple[type, ...]:
    """Errors of a read that got no data in time (TimeoutError) or whose connection broke: worth a retry."""
    errors: tuple[type, ...] = (TimeoutError, ConnectionError)
    try:
        import aiohttp
    except ImportError:
        return errors
    return errors + (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)


class ResumingReader:
    """A binary stream of an fsspec URL that survives a stalled or broken connection: a request or
    read that gets no data within ``GENLOC_URL_TIMEOUT`` seconds (or whose connection breaks) opens
    the URL again and continues at the byte where it stopped (seek where the file allows it, else
    reading up to there again), one line per retry, at most ``GENLOC_URL_ATTEMPTS`` attempts per read.
    Then a timeout is `StorageStalled` (the run stops: the storage, not the shard, is the problem);
    a connection that keeps breaking raises its own error (the pipeline counts the shard's loss like
    a torn tar)."""

    def __init__(self, location: str, opener):
        self.location, self.opener = location, opener
        self.seconds, self.attempts = url_wait()
        self.position, self.stream = 0, None
        self._attempt(lambda: None)

    def _open_at(self, position: int):
        stream = self.opener()
        if position:
            try:
                stream.seek(position)
            except (OSError, ValueError):  # a streamed HTTP response cannot seek: read up to there
                left = position
                while left:
                    chunk = stream.read(min(left, 1 << 20))
                    if not chunk:
                        raise ConnectionError(f"the file ended at byte {position - left} of {position} read before")
                    left -= len(chunk)
        return stream

    def _attempt(self, operation):
        retried = _retried_errors()
        for attempt in range(1, self.attempts + 1):
            try:
                if self.stream is None:
                    self.stream = self._open_at(self.position)
                return operation()
            except retried as err:
                self._drop_stream()
                reason = f"{type(err).__name__}: {err}".strip().rstrip(":")
                if attempt < self.attempts:
                    print(f"{self.location}: {reason} at byte {self.position} (timeout {self.seconds:g} s); retrying "
                          f"from there, attempt {attempt + 1} of {self.attempts}", file=sys.stderr, flush=True)
                elif isinstance(err, TimeoutError):
                    raise StorageStalled(
                        f"{self.location}: the storage stopped answering at byte {self.position} (no data within "
                        f"{self.seconds:g} s, {self.attempts} attempts); the shard itself is not known to be damaged: "
                        "check the server and the network, then run the same command again (GENLOC_URL_TIMEOUT, "
                        "GENLOC_URL_ATTEMPTS set the limits)") from None
                else:
                    raise

    def _drop_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # the broken connection's own error; a new one is opened
                pass

    def read(self, size: int = -1) -> bytes:
        def read_once() -> bytes:
            data = self.stream.read(size)
            self.position += len(data)
            return data

        return self._attempt(read_once)

    def close(self) -> None:
        self._drop_stream()

    def __enter__(self) -> "ResumingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_binary(location: str):
    """A readable binary stream of a local path, an fsspec URL (http(s) streamed in one request,
    resumed after a stall: `ResumingReader`) or a ``pipe:`` command (webdataset's pipe: a failing
    command raises IOError while it is read)."""
    if location.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(location, "rb")
    if "://" not in location:
        return open(location, "rb")
    fs, path = _filesystem(location)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    streamed = {"block_size": 0} if {"http", "https"} & set(protocols) else {}  # one GET, no range requests
    return ResumingReader(location, lambda: fs.open(path, "rb", **streamed))


def _read_bytes(location: str) -> bytes:
    """All bytes of a URL or pipe: command; FileNotFoundError when there is nothing at the URL."""
    if location.startswith("pipe:"):
        proc = subprocess.run(location[5:], shell=True, capture_output=True)
        if proc.returncode:
            raise OSError(f"command exited with status {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}")
        return proc.stdout
    fs, path = _filesystem(location)
    return _retrying(location, lambda: fs.cat_file(path))


def _unreadable(location: str, error: Exception) -> ShardFormatError:
    return ShardFormatError(
        f"cannot read {location} ({type(error).__name__}: {error}); check the address, the network and the "
        f"credentials (docs/multinode.md: shards in object storage)")


def split_file_exists(data_dir, split: str) -> bool:
    """Whether ``{split}.json`` is there. For a URL it is fetched (it is small): False when there is
    nothing at the URL, ShardFormatError when the location cannot be read at all (host unreachable,
    no permission, a missing fsspec back-end such as s3fs)."""
    location = member(data_dir, f"{split}.json")
    if not is_url(data_dir):
        return os.path.isfile(location)
    try:
        _read_bytes(location)
    except FileNotFoundError:
        return False
    except ShardFormatError:  # a bad GENLOC_URL_* setting names itself
        raise
    except Exception as e:
        raise _unreadable(location, e) from None
    return True


def _missing_shards(data_dir, paths: list[str]) -> list[str]:
    """Shards that are not there: local files checked one by one; fsspec URLs from one listing of
    the folder, then one existence check for each shard the listing did not show; pipe: commands
    cannot be checked before they run (a failing one is a counted skip when it is read)."""
    if not is_url(data_dir):
        return [p for p in paths if not os.path.isfile(p)]
    if str(data_dir).startswith("pipe:"):
        return []
    fs, folder = _filesystem(str(data_dir).rstrip("/"))
    try:
        listed = {name.rstrip("/").rsplit("/", 1)[-1] for name in _retrying(folder, lambda: fs.ls(folder, detail=False))}
    except Exception:  # servers without folder listings: check each shard below
        listed = set()
    unlisted = [p for p in paths if p.rsplit("/", 1)[-1] not in listed]
    return [p for p in unlisted if not _retrying(p, lambda: fs.exists(_filesystem(p)[1]))]


def read_split_info(data_dir, split: str) -> SplitInfo:
    """Read and check ``{split}.json`` of a local folder or a URL (`is_url`); errors name the
    location and how to fix it."""
    path = member(data_dir, f"{split}.json")
    if not is_url(data_dir):
        if not os.path.isfile(path):
            hint = "" if Path(data_dir).is_dir() else f" (the folder {data_dir} does not exist)"
            raise ShardFormatError(_missing_split_message(path, hint, split))
        raw = Path(path).read_bytes()
    else:
        try:
            raw = _read_bytes(path)
        except FileNotFoundError:
            raise ShardFormatError(_missing_split_message(path, " (nothing at that URL)", split)) from None
        except ShardFormatError:
            raise
        except Exception as e:
            raise _unreadable(path, e) from None
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{path} is not valid json ({e}); re-run the conversion") from e
    try:
        n, s = int(info.get("num_samples", 0)), int(info.get("num_shards", 0))
    except (AttributeError, TypeError, ValueError):
        raise ShardFormatError(f"{path} is not a split file (a json object with whole numbers num_samples and "
                               f"num_shards); re-run the conversion") from None
    if n <= 0 or s <= 0:
        raise ShardFormatError(f"empty split: {path} says num_samples={n}, num_shards={s}; "
                               f"re-run the conversion or pick another split")
    paths = [member(data_dir, shard_name(split, i)) for i in range(s)]
    missing = _missing_shards(data_dir, paths)
    if missing:
        raise ShardFormatError(f"{path} lists {s} shards but {len(missing)} are missing, e.g. {missing[0]}; "
                               f"re-run the conversion")
    if "shard_sizes" in info and (len(info["shard_sizes"]) != s or sum(info["shard_sizes"]) != n):
        raise ShardFormatError(f"{path}: shard_sizes do not add up to num_samples/num_shards; re-run the conversion")
    if "shard_sha256" in info and len(info["shard_sha256"]) != s:
        raise ShardFormatError(f"{path}: shard_sha256 lists {len(info['shard_sha256'])} checksums for {s} shards; "
                               f"re-run the conversion")
    info["paths"] = paths
    return SplitInfo(info)


def _missing_split_message(path: str, hint: str, split: str) -> str:
    return (f"missing split file {path}{hint}: the split '{split}' was never converted or its conversion "
            f"did not finish. Run a converter (scripts/convert_*.py; toy scenes: the toy package's CLI, see "
            f"datamodules/README.md) or point data_dir at the folder holding {split}.json.")


def shard_paths(data_dir, split: str) -> list[str]:
    return read_split_info(data_dir, split).paths


class HashingReader:
    """A binary stream that hashes what is read through it (the shard checksum, at no extra read)."""

    def __init__(self, stream):
        self.stream, self.sha256 = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        return data

    def hexdigest(self) -> str:
        while self.read(1 << 20):  # the tar reader stops at the end-of-archive marker; hash the padding too
            pass
        return self.sha256.hexdigest()


def iter_annotations(data_dir, split: str, mismatches: list | None = None):
    """Yield annotation-only samples (json; no image decode): dicts with ``key`` plus the json
    fields (category, width, height, positives, negatives, source, meta) in pixel xyxy, and the
    ``shard`` they came from. Shards are read as streams, so a URL is read once, front to back.

    Each shard must hold the samples ``{split}.json`` records for it and, where recorded, match its
    checksum (a shard damaged in the middle can read as a shorter valid tar): a mismatch raises
    ShardFormatError, or with a ``mismatches`` list is appended to it as ``{"shard", "found",
    "recorded", "checksum_ok"}`` and reading goes on."""
    info = read_split_info(data_dir, split)
    recorded, checksums = info.get("shard_sizes"), info.get("shard_sha256")
    for i, p in enumerate(info.paths):
        found = 0
        with open_binary(p) as raw:
            stream = HashingReader(raw)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member_info in tar:
                    if member_info.isfile() and member_info.name.endswith(".json"):
                        key = os.path.basename(member_info.name).split(".", 1)[0]
                        found += 1
                        yield {"key": key, **json.loads(tar.extractfile(member_info).read()), "shard": p}
            checksum_ok = checksums is None or stream.hexdigest() == checksums[i]
        expected = found if recorded is None else recorded[i]
        if found == expected and checksum_ok:
            continue
        problem = {"shard": p, "found": found, "recorded": expected, "checksum_ok": checksum_ok}
        if mismatches is None:
            raise ShardFormatError(mismatch_message(problem, split))
        mismatches.append(problem)


def mismatch_message(problem: dict, split: str) -> str:
    """One line for a shard that is not what its split file records."""
    what = (f"holds {problem['found']} samples but {split}.json records {problem['recorded']}"
            if problem["found"] != problem["recorded"] else f"does not match its checksum in {split}.json")
    return (f"{problem['shard']} {what}: the shard is damaged or was replaced; re-run the conversion of split "
            f"'{split}' (python -m datamodules.verify checks every shard)")
