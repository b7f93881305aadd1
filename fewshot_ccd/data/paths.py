"""Where the data sets live: argument, then $FEWSHOT_CCD_DATA, then $MEASURED_REPRO_DATA, then the
shared folder ``../shared/data`` beside the repository root."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_root", "dataset_dir"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the data sets (``root`` if given)."""
    if root is not None:
        return Path(root)
    for var in ("FEWSHOT_CCD_DATA", "MEASURED_REPRO_DATA"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return DEFAULT_DATA_ROOT


def dataset_dir(name: str, root: str | os.PathLike | None = None, *, marker: str | tuple[str, ...]) -> Path:
    """``<root>/<name>``, or ``root`` itself when it already contains ``marker`` (or one of several).

    Raises FileNotFoundError naming the paths searched when the data set is missing.
    """
    base = data_root(root)
    markers = (marker,) if isinstance(marker, str) else tuple(marker)
    for candidate in (base / name, base):  # the named sub-folder first: markers can be generic
        if any((candidate / m).exists() for m in markers):
            return candidate
    raise FileNotFoundError(
        f"{name} data not found: no {' or '.join(map(repr, markers))} in {base} or {base / name}. Pass root=..., or set "
        f"FEWSHOT_CCD_DATA / MEASURED_REPRO_DATA to the folder holding '{name}/' "
        f"(see fewshot_ccd.data.download for the download code)."
    )
