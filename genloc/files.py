"""Crash-safe files: the one atomic writer and the one JSONL reader/writer of the project.

A file written here never exists half-written under its final name: the bytes go to a unique
``.<name>.<random>.partial`` in the same folder, are fsynced, and the temporary file is renamed
over the target (``os.replace`` is atomic on POSIX). A failure removes the temporary file; a
SIGKILL leftover keeps the ``.partial`` suffix, so it never passes for the real file.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path
from typing import Iterable, Iterator, Union

PathLike = Union[str, Path]


class OutputError(OSError):
    """An output location that cannot be created or written; the message is one line naming the path."""


def _output_reason(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "the disk is full: free space or choose another location"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "it is not writable (read-only file system or no permission): choose a writable location"
    return f"{err.strerror or err}: choose another location"


def prepare_output_dir(path: PathLike, flag: str = "--out") -> Path:
    """Create the folder ``path`` (parents too) and prove it takes a file, before any work is done.

    Commands call this before they load a model or sample, so a bad ``--out`` (an existing file, a
    read-only file system, a full disk) is one line naming the path instead of a traceback after
    minutes of work. Raises :class:`OutputError`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: is an existing file, not a folder; name a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file in the way further up
        raise OutputError(f"{flag} {path}: a parent of it is a file, not a folder; name a folder") from None
    except OSError as err:
        raise OutputError(f"{flag} {path}: cannot create the folder: {_output_reason(err)}") from None
    probe = path / f".genloc-write-check.{secrets.token_hex(4)}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise OutputError(f"{flag} {path}: cannot write there: {_output_reason(err)}") from None
    finally:
        probe.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, fsync and rename it to ``path``.

    For writers that want a file name (``image.save(tmp, format="PNG")``); pass the format explicitly,
    the temporary name ends in ``.partial``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:  # created with the umask's permissions, unlike tempfile.mkstemp's 0600
            os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield partial
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        if isinstance(err, OutputError) or err.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        failed = OutputError(f"{path}: could not be written ({_output_reason(err)}); "
                             "any previous version of it is kept unchanged")
        failed.errno = err.errno  # callers with a more specific message (checkpoints) still see the cause
        raise failed from err
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: PathLike) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: PathLike, data: Union[bytes, bytearray, memoryview, str]) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically (see the module docstring)."""
    if isinstance(data, str):
        data = data.encode()
    with atomic_path(path) as partial, open(partial, "wb") as f:
        write_bytes(f, data)


def write_bytes(f, data) -> None:
    """The one write of a file's bytes (a seam for tests that crash mid-write)."""
    f.write(data)


def write_json(path: PathLike, obj, indent: int = 1) -> None:
    write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(path: PathLike, records: Iterable[dict]) -> None:
    """One JSON object per line, written atomically."""
    write_atomic(path, "".join(json.dumps(rec) + "\n" for rec in records))


def read_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of a JSONL file, read a line at a time; a line
    that is not a JSON object raises ValueError naming ``path:line``."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, json_object(path, lineno, line)


def json_object(path: PathLike, lineno: int, line: str) -> dict:
    """One JSONL line as a dict; anything else raises ValueError naming ``path:line``."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not a JSON line ({err})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
    return rec


def save_image(path: PathLike, image, format: str = "PNG", **options) -> None:
    """``image.save`` (a PIL image) atomically; ``options`` go to PIL (e.g. ``optimize=True``)."""
    with atomic_path(path) as partial:
        image.save(partial, format=format, **options)


def append_jsonl(path: PathLike, record: dict) -> None:
    """Append one JSON line to ``path`` and fsync it: a record is done once its line is on disk. A crash
    mid-append leaves at most a last line without its newline, which `complete_jsonl` cuts off."""
    data = (json.dumps(record) + "\n").encode()
    try:
        with open(path, "ab") as f:
            write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if isinstance(err, OutputError) or err.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        raise OutputError(f"{path}: could not append a line ({_output_reason(err)}); the lines before it are kept") \
            from err


def complete_jsonl(path: PathLike) -> list[dict]:
    """The records of ``path``'s complete lines (none if it does not exist), for a run that appends with
    `append_jsonl` and resumes: a last line without its newline (a crash mid-append) is cut off the
    file so the next append starts a fresh line. A complete line that is not a JSON object raises
    ValueError naming ``path:line``."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        write_atomic(path, data[:end])
    lines = enumerate(data[:end].decode().splitlines(), 1)
    return [json_object(path, lineno, line) for lineno, line in lines if line.strip()]
