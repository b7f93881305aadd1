"""The package's one atomic-write utility: write beside the target, then ``os.replace``.

A reader never sees a partial file: the data goes to a temporary file in the target's folder, is
flushed to disk, and only then replaces the target (``os.replace`` is atomic on POSIX and Windows).
On any error the temporary file is removed and the previous target, if any, is left untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_writable"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; once the block has written it, it replaces ``path``.

    ``with atomic_path(p) as tmp: torch.save(state, tmp)`` (or ``np.save``, ``open(tmp, "wb")``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before it takes the target's name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (never a partial file)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes needs bytes, got {type(data).__name__}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuses, before any work starts, an output path that could not be written later.

    Creates the missing parent folders and writes (then removes) a probe file beside ``path``, so
    that permission, read-only and not-a-folder problems surface now, naming the path.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(f"cannot write the {what} {path}: {err.strerror or err}") from err
    return path
