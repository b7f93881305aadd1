"""Checkpoints of the package's training loops: atomic, two generations kept, bound to their data
and configuration.

- :func:`save_checkpoint` writes the new file completely (temporary file, fsync) before it touches
  the old one; then the old one becomes ``<name>.previous.pt`` and the new one takes its name. A
  failed or interrupted write therefore always leaves a complete checkpoint behind.
- :func:`load_checkpoint` reads ``path``, or its previous generation (with a warning) when ``path``
  is missing or unreadable (truncated, not a torch file); otherwise a ValueError names the file.
- :func:`check_resumable` refuses a checkpoint written for other data (:func:`dataset_fingerprint`)
  or with another configuration, naming the folder and the differing fields.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from pathlib import Path

import torch

from ._atomic import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "previous_path", "dataset_fingerprint",
           "check_resumable"]

logger = logging.getLogger(__name__)
_SAMPLE_ITEMS = 16  # items hashed from a data set without file paths


def previous_path(path: str | os.PathLike) -> Path:
    """Where the previous generation of ``path`` is kept: ``last.pt`` -> ``last.previous.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save`` atomically, keeping the checkpoint it replaces as :func:`previous_path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        if path.exists():  # the new file is complete: only now does the old one step aside
            os.replace(path, previous_path(path))


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """``path`` when it exists, else its previous generation when that exists, else None."""
    path = Path(path)
    for candidate in (path, previous_path(path)):
        if candidate.exists():
            return candidate
    return None


def _read(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"checkpoint {path} is unreadable (truncated or not a torch checkpoint): {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``; its previous generation (warning) when ``path`` is missing or unreadable."""
    path = Path(path)
    previous = previous_path(path)
    if not path.exists():
        if previous.exists():
            logger.warning("checkpoint %s is missing; resuming from the previous one, %s", path, previous)
            return _read(previous)
        raise FileNotFoundError(f"no checkpoint {path}")
    try:
        return _read(path)
    except ValueError as err:
        if not previous.exists():
            raise
        logger.warning("%s; resuming from the previous checkpoint, %s", err, previous)
        return _read(previous)


def dataset_fingerprint(dataset) -> str:
    """Hex digest of a data set: its file list (when it has ``paths``) and labels, and for a data
    set held in memory (no ``paths``) the content of up to 16 evenly spaced items, so that another
    data set of the same shape and labels does not pass for this one. Checkpoints are bound to it."""
    h = hashlib.sha256()
    paths = getattr(dataset, "paths", None)
    for p in paths or []:
        h.update(f"{os.path.abspath(p)}\n".encode())
    h.update(torch.as_tensor(dataset.labels).long().numpy().tobytes())
    if not paths and len(dataset) > 0:
        n = len(dataset)
        for i in sorted({round(j * (n - 1) / max(_SAMPLE_ITEMS - 1, 1)) for j in range(min(n, _SAMPLE_ITEMS))}):
            item = dataset[i]
            x = item[0] if isinstance(item, (tuple, list)) else item
            h.update(torch.as_tensor(x).detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def check_resumable(state: dict, path: str | os.PathLike, *, fingerprint: str, config: dict) -> None:
    """ValueError naming the checkpoint's folder when ``state`` was written for other data or with
    another configuration (``config``: the fields that change what training computes)."""
    folder = Path(path).parent
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"checkpoint in {folder} was written for other data (fingerprint "
                         f"{state.get('fingerprint')}, this data set {fingerprint}); use another checkpoint_dir "
                         f"or resume=False")
    stored = state.get("config") or {}
    diff = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
    if diff:
        pairs = ", ".join(f"{k}: {stored.get(k)!r} -> {config.get(k)!r}" for k in diff)
        raise ValueError(f"checkpoint in {folder} was written with another configuration ({pairs}); use another "
                         f"checkpoint_dir or resume=False")
