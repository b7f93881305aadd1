"""Where the data sets and caches live.

Data sets: the path you give, else ``$FEWSHOT_CCD_DATA``, else the per-user cache folder that the
download code (:mod:`fewshot_ccd.data.download`) fills; otherwise a clear error. The library never
looks beside its own checkout: the project's Makefile sets ``$FEWSHOT_CCD_DATA`` to the checkout's
``../shared/data`` when that folder exists.

Caches (downloads, decoded images, staged runs): ``$FEWSHOT_CCD_CACHE``, else
``$XDG_CACHE_HOME/fewshot_ccd``, else ``~/.cache/fewshot_ccd``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV", "CACHE_ENV", "cache_dir", "data_root", "dataset_dir"]

DATA_ENV = "FEWSHOT_CCD_DATA"
CACHE_ENV = "FEWSHOT_CCD_CACHE"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder for downloads and caches: ``path``, else ``$FEWSHOT_CCD_CACHE``, else the per-user
    cache folder (``$XDG_CACHE_HOME/fewshot_ccd`` or ``~/.cache/fewshot_ccd``)."""
    if path is not None:
        return Path(path)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewshot_ccd"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the data sets: ``root``, else ``$FEWSHOT_CCD_DATA``, else :func:`cache_dir`."""
    if root is not None:
        return Path(root)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return cache_dir()


def dataset_dir(name: str, root: str | os.PathLike | None = None, *, marker: str | tuple[str, ...]) -> Path:
    """``<root>/<name>``, or ``root`` itself when it already contains ``marker`` (or one of several).

    Raises FileNotFoundError naming the paths searched and how to point at the data when it is missing.
    """
    base = data_root(root)
    markers = (marker,) if isinstance(marker, str) else tuple(marker)
    for candidate in (base / name, base):  # the named sub-folder first: markers can be generic
        if any((candidate / m).exists() for m in markers):
            return candidate
    how = ("the path you gave" if root is not None else f"from ${DATA_ENV}" if os.environ.get(DATA_ENV)
           else f"the cache folder, since ${DATA_ENV} is not set")
    raise FileNotFoundError(
        f"{name} data not found: no {' or '.join(map(repr, markers))} in {base} or {base / name} ({how}). "
        f"Pass root=..., or set {DATA_ENV} to the folder holding '{name}/', or download it into "
        f"{cache_dir() / name} (see fewshot_ccd.data.download)."
    )
