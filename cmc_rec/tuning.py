"""One validation-tuning helper for every model (ours and the baselines): hyper-parameters are
chosen on a per-user carve of the TRAINING ratings, never on a test set.

``per_user_split(train, 0.1, seed)`` holds out a seeded 10% of each user's ratings (at least one
for users with two or more); ``tune(factory, grid, train)`` fits ``factory(**params)`` on the rest
for every point of ``grid`` and scores it on the carve with :func:`cmc_rec.metrics.evaluate`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .data import Ratings
from .metrics import evaluate

__all__ = ["TuneResult", "grid_points", "per_user_split", "tune"]

METRICS = ("ndcg", "recall", "rmse")


def per_user_split(ratings, fraction: float = 0.1, seed: int = 0) -> tuple[Ratings, Ratings]:
    """(fit, validation): a seeded share ``fraction`` of each user's ratings held out.

    Users with a single rating keep it in the fit part; every other user gives
    ``max(1, round(fraction * n_u))`` ratings (``numpy.random.Generator``, no global RNG).
    """
    data = Ratings.from_any(ratings)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(data)), data.users))  # users grouped, shuffled inside each
    _, start, count = np.unique(data.users[order], return_index=True, return_counts=True)
    rank = np.arange(len(data)) - np.repeat(start, count)  # position inside the user's shuffled list
    n_val = np.where(count > 1, np.maximum(1, np.round(fraction * count)), 0).astype(np.int64)
    held = rank < np.repeat(n_val, count)
    return data.subset(np.sort(order[~held])), data.subset(np.sort(order[held]))


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of a {name: [values]} grid, in order (the last name varies fastest)."""
    if not grid:
        return [{}]
    names = list(grid)
    for name, values in grid.items():
        if not isinstance(values, list | tuple) or not values:
            raise ValueError(f"grid[{name!r}] must be a non-empty list, got {values!r}")
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


@dataclass
class TuneResult:
    best: dict  # the chosen hyper-parameters
    metric: str
    rows: list[dict] = field(default_factory=list)  # one per grid point: params + validation metrics + fit s

    @property
    def best_row(self) -> dict:
        return next(r for r in self.rows if r["params"] == self.best)

    def to_markdown(self) -> str:
        """One row per grid point (params, validation metrics, fit seconds); the chosen one marked."""
        names = list(self.best)
        head = [*names, "RMSE", "Recall", "NDCG", "coverage", "fit s", "chosen"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [str(r["params"][n]) for n in names] + [
                "n/a" if np.isnan(r["rmse"]) else f"{r['rmse']:.4f}", f"{r['recall']:.4f}", f"{r['ndcg']:.4f}",
                f"{r['coverage']:.1%}", f"{r['fit_seconds']:.1f}", "*" if r["params"] == self.best else ""]
            lines.append("| " + " | ".join(cells) + " |")
        return f"chosen by validation {self.metric}: {self.best}\n\n" + "\n".join(lines)

    __str__ = to_markdown


def tune(factory: Callable[..., object], grid: dict[str, list], train, fraction: float = 0.1, seed: int = 0,
         metric: str = "ndcg", k: int = 10, split: tuple[Ratings, Ratings] | None = None) -> TuneResult:
    """Pick ``factory(**params)``'s hyper-parameters on a per-user validation carve of ``train``.

    ``metric``: ``"ndcg"`` / ``"recall"`` (at ``k``, higher is better) or ``"rmse"`` (lower).  Ties
    keep the earlier grid point.  ``split`` passes a ready (fit, validation) pair instead (several
    models tuned on one carve).  Returns every grid point's validation metrics and the best one.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    fit_part, val_part = split if split is not None else per_user_split(train, fraction, seed)
    rows, best, best_value = [], None, None
    for params in grid_points(grid):
        start = time.perf_counter()
        model = factory(**params).fit(fit_part)
        fit_s = time.perf_counter() - start
        res = evaluate(model, fit_part, val_part, k=k).as_dict()
        rows.append({"params": params, **res, "fit_seconds": fit_s})
        value = res[metric] if metric != "rmse" else -res[metric]
        if not np.isfinite(value):
            raise ValueError(f"validation {metric} of {params} is {res[metric]}: cannot tune on it")
        if best_value is None or value > best_value:
            best, best_value = params, value
    return TuneResult(best=best, metric=metric, rows=rows)
