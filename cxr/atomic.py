"""Atomic file writes: a reader never sees half a file, and an interrupted run leaves none
under the final name (resumable commands rely on this)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()
# Every temporary file starts with this, so a resumed run can find and remove what a killed one
# left (`remove_stale`); hidden, so folder scans skip it.
TEMP_PREFIX = ".tmp-"


@contextmanager
def replacing(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that go by the extension
    work); when the block ends without error it gets a normal new file's permissions (mkstemp
    makes 0600) and is renamed over `path`; otherwise it is removed. `durable`: the file and the
    rename are on disk (fsync) before this returns, for a receipt acknowledged to a sender."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def remove_stale(folder: str | Path) -> int:
    """Remove the temporary files that a killed writer left in `folder` (a SIGKILL skips the
    cleanup in `replacing`); returns how many. Only for folders one run writes at a time."""
    stale = list(Path(folder).glob(f"{TEMP_PREFIX}*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write bytes (or text, as UTF-8) to `path` atomically."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log (JSON lines) in a single write on an O_APPEND descriptor: a
    reader sees whole lines, and an interrupted run leaves at most its last line missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    finally:
        os.close(fd)
