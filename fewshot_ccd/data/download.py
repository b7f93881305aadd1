"""Download code for users with internet: pinned SHA-256, atomic writes, a cache folder.

The pinned hashes of the ``brendenlake/omniglot`` (python/) files were computed from the unchanged
copies in the shared data folder (no network was available to hash the upstream files directly).  The full ``images_background.zip`` /
``images_evaluation.zip`` are not pinned here (only npz conversions were available to check); pass
their SHA-256 yourself to :func:`download` if you fetch them.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from .._atomic import atomic_path, atomic_write_bytes
from .paths import cache_dir

__all__ = ["OMNIGLOT_FILES", "sha256_file", "verify_file", "atomic_write_bytes", "download",
           "download_omniglot", "cache_dir"]

_OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
OMNIGLOT_FILES: dict[str, tuple[str, str]] = {
    # name: (url, sha256)
    "images_background_small1.zip": (
        _OMNIGLOT_URL + "images_background_small1.zip",
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    ),
    "images_background_small2.zip": (
        _OMNIGLOT_URL + "images_background_small2.zip",
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
    ),
    "all_runs.zip": (
        _OMNIGLOT_URL + "one-shot-classification/all_runs.zip",
        "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325",
    ),
}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path: str | os.PathLike, sha256: str) -> None:
    """Raises ValueError naming the file and both hashes when the checksum differs."""
    got = sha256_file(path)
    if got != sha256.lower():
        raise ValueError(f"checksum mismatch for {path}: expected sha256 {sha256}, got {got}")


def download(url: str, dest: str | os.PathLike, *, sha256: str, timeout: float = 60.0) -> Path:
    """Fetches ``url`` to ``dest`` unless a file with the right checksum is already there.

    The download goes to a temporary file beside ``dest``; it is checked and only then moved into
    place, so an interrupted or corrupted download never leaves a file at ``dest``.
    """
    dest = Path(dest)
    if dest.exists():
        try:
            verify_file(dest, sha256)
            return dest
        except ValueError:
            pass  # stale or corrupted: fetch again
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            while block := response.read(1 << 20):
                f.write(block)
        verify_file(tmp, sha256)
    return dest


def download_omniglot(dest: str | os.PathLike | None = None, *, names: tuple[str, ...] | None = None) -> Path:
    """Downloads the pinned Omniglot files into ``dest`` (default ``cache_dir()/omniglot``)."""
    folder = Path(dest) if dest is not None else cache_dir() / "omniglot"
    for name in names or tuple(OMNIGLOT_FILES):
        if name not in OMNIGLOT_FILES:
            raise ValueError(f"unknown Omniglot file {name!r}; known: {sorted(OMNIGLOT_FILES)}")
        url, sha = OMNIGLOT_FILES[name]
        download(url, folder / name, sha256=sha)
    return folder
