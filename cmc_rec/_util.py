"""Small internal helpers shared by the package: validating numbers, atomic writes, progress.

* :func:`check_number` -- the one validation of numeric settings: NaN and inf are refused (they
  pass ``x <= 0`` checks), integers must be integers, bounds are named in the message.
* :func:`atomic_write` -- every file this package writes (checkpoints, downloads) goes to a temp
  file beside its destination, is flushed to disk, then ``os.replace``-d: never a torn file.
* :func:`show_progress` -- ``progress=None`` means "a tqdm bar when stderr is a terminal".
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "check_number", "rating_scale", "show_progress"]


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False):
    """Return ``value`` if it is a finite number (an integer with ``integer``) within the bounds.

    ``low`` / ``high`` are inclusive unless ``low_open`` / ``high_open``.  Raises ``ValueError``
    naming ``name``, the value and what was expected.
    """
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return value


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], previous: str | os.PathLike | None = None) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    If ``write`` raises (or the process dies), ``path`` keeps its previous content and no temp file
    is left behind (on an exception).  With ``previous``, the old ``path`` is first moved there
    (once the new file is complete): two complete files exist at every moment but one rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the rename makes them visible
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def rating_scale(low: float, high: float) -> float:
    """The unit training divides ratings by: ``(high - low) / 4`` (1 on a 1-5 scale), 1 if constant.

    Models trained on ``r / rating_scale`` keep the meaning of their step sizes and penalties on
    other scales (YahooMusic's 1-100: 24.75).
    """
    return (high - low) / 4.0 if high > low else 1.0


def show_progress(progress: bool | None) -> bool:
    """``progress`` if given, else True when stderr is an interactive terminal."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)
