"""Boundary checks shared by the package: class labels and numeric hyper-parameters.

NaN is bad input: it passes every ``x <= 0`` test, so each number is checked with ``math.isfinite``
first, and labels are refused unless they are finite integers (``0.2`` and ``0.7`` must not become
one class, nor NaN the class ``-2**63``).
"""

from __future__ import annotations

import math
import operator

import torch

__all__ = ["integer_labels", "finite", "positive_int"]


def integer_labels(labels, what: str = "labels") -> torch.Tensor:
    """``labels`` as a 1-D int64 tensor; ValueError naming the first bad value when one is not a
    finite integer (floats holding whole numbers, such as ``3.0``, are accepted)."""
    t = torch.as_tensor(labels)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{what} must be integers, got dtype {t.dtype}")
    t = t.flatten()
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bad.any():
            raise ValueError(f"{what} must be finite integers, got {t[bad][0].item()} "
                             f"(at position {int(bad.nonzero()[0])})")
        frac = t != t.round()
        if frac.any():
            raise ValueError(f"{what} must be integers, got {t[frac][0].item()} "
                             f"(at position {int(frac.nonzero()[0])}); class labels are never rounded")
    return t.long()


def finite(name: str, value, *, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
    """``value`` as a float; ValueError naming ``name`` when it is not a finite number in range."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (x < low or (low_open and x == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and x > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return x


def positive_int(name: str, value, low: int = 1) -> int:
    """``value`` as an int >= ``low`` (Python and numpy integers, whole floats); ValueError naming
    ``name`` otherwise (bools, 2.5 and NaN too)."""
    number = None
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            if isinstance(value, float) and value.is_integer():
                number = int(value)
    if number is None or number < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return number
