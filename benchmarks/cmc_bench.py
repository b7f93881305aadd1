"""Shared machinery of the cmc_rec benchmarks: the models, their validation grids, one run, the files.

Every baseline's hyper-parameters are chosen by :func:`cmc_rec.tuning.tune` on a seeded 10%
per-user carve of the split's TRAINING ratings (never its test set); the chosen values are written
with the results.  ``CMCRecommender()`` runs at its defaults (chosen on the carve of u1.base, see
docs/cmc_rec.md); ``test_ml100k_u1`` re-runs its temperature choice on that carve.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cmc_rec import (
    AutoencoderConfig,
    CMCConfig,
    CMCRecommender,
    MeanRecommender,
    SVDRecommender,
    evaluate,
)
from cmc_rec.baselines import EASE, ItemKNN, MostPopular
from cmc_rec.implicit_models import ImplicitALS, ImplicitBPR, implicit_available
from cmc_rec.ranking import RankingConfig
from cmc_rec.tuning import per_user_split, tune

SEED = 0
VAL_FRACTION = 0.1  # per-user validation carve of each training split

# name -> (factory, validation grid at the full budget, metric the grid is chosen by)
GRIDS = {
    "svd": (lambda **p: SVDRecommender(seed=SEED, **p), {"n_factors": [50, 100], "reg": [0.02, 0.05]}, "rmse"),
    "most_popular": (MostPopular, {}, "ndcg"),
    # min_rating: the ranking baselines may learn from the well-rated items only, as CMC's ranking
    # model weights its positives by rating (RankingConfig.rating_weight)
    "itemknn": (ItemKNN, {"k": [50, 100, 200, 400], "min_rating": [None, 3.0, 4.0]}, "ndcg"),
    "ease": (EASE, {"reg": [100.0, 250.0, 500.0, 1000.0], "min_rating": [None, 3.0, 4.0]}, "ndcg"),
    "implicit_als": (lambda **p: ImplicitALS(seed=SEED, **p),
                     {"factors": [32, 64, 128], "regularization": [1.0, 10.0, 30.0], "alpha": [1.0, 5.0, 20.0],
                      "min_rating": [None, 3.0]}, "ndcg"),
    "implicit_bpr": (lambda **p: ImplicitBPR(seed=SEED, **p),
                     {"factors": [64, 128], "learning_rate": [0.01, 0.05], "regularization": [0.01, 0.001]}, "ndcg"),
}
SMOKE_GRIDS = {"svd": {"n_factors": [8], "n_epochs": [2]}, "itemknn": {"k": [20, 50]}, "ease": {"reg": [100.0, 500.0]},
               "implicit_als": {"factors": [8], "iterations": [2]}, "implicit_bpr": {"factors": [8], "iterations": [2]}}
RANKING_BASELINES = ("most_popular", "itemknn", "ease", "implicit_als", "implicit_bpr")


def smoke_cmc() -> CMCConfig:
    """A tiny CMC for --benchmark-smoke: the default's parts at a budget of seconds."""
    return CMCConfig(ranking=RankingConfig(embedding_dim=16, epochs=1, ensemble=1, seed=SEED),
                     autoencoder=AutoencoderConfig(hidden=16, num_hidden_layers=1, epochs=2, seed=SEED),
                     user_autoencoder=AutoencoderConfig(hidden=16, num_hidden_layers=1, epochs=2, seed=SEED,
                                                        user_based=True))


def baseline_names() -> list[str]:
    names = ["mean", *GRIDS]
    return [n for n in names if implicit_available() or not n.startswith("implicit_")]


def score(model, train, test, fit_s: float) -> dict:
    return evaluate(model, train, test, k=10).as_dict() | {"fit_seconds": fit_s}


def run_split(train, test, budget: str, cmc: bool = True) -> dict:
    """Tune and fit every baseline on ``train``, fit the default CMC, score all on ``test``.

    Returns {"rows": {model: metrics}, "chosen": {model: params}, "validation": {model: grid rows}}.
    """
    rows, chosen, validation = {}, {}, {}
    split = per_user_split(train, VAL_FRACTION, seed=SEED)  # one carve for every model
    for name in baseline_names():
        if name == "mean":
            factory, params = MeanRecommender, {}
        else:
            factory, grid, metric = GRIDS[name]
            if budget == "smoke":
                grid = SMOKE_GRIDS.get(name, grid)
            res = tune(factory, grid, train, metric=metric, split=split)
            params, validation[name] = res.best, [_brief(r) for r in res.rows]
        start = time.perf_counter()
        model = factory(**params).fit(train)
        rows[name] = score(model, train, test, time.perf_counter() - start)
        chosen[name] = params
        show(name, rows[name], params)
    if cmc:
        model = CMCRecommender(smoke_cmc() if budget == "smoke" else None)
        load_before, cpu_start, start = os.getloadavg()[0], time.process_time(), time.perf_counter()
        model.fit(train)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        # the VM is shared: wall seconds depend on the other jobs; the process's CPU seconds (all its
        # threads) do not, and bound the fit's wall time on as many idle cores as it has threads
        rows["cmc"] = score(model, train, test, wall) | {
            "fit_cpu_seconds": cpu, "fit_threads": torch.get_num_threads(),
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "timings": dict(model.timings), "head_weights": [float(w) for w in model.head_weights],
            "head_names": list(model.head_names)}
        chosen["cmc"] = "defaults" if budget == "full" else "smoke config"
        show("cmc", rows["cmc"], chosen["cmc"])
    return {"rows": rows, "chosen": chosen, "validation": validation}


def _brief(row: dict) -> dict:
    return {k: row[k] for k in ("params", "rmse", "recall", "ndcg", "coverage", "fit_seconds")}


def show(name: str, res: dict, params=None) -> None:
    print(f"  {name:13s} " + " ".join(f"{k}={v:.4f}" for k, v in res.items() if isinstance(v, float))
          + (f"  params={params}" if params is not None else ""), flush=True)


def environment(budget: str, command: str) -> dict:
    import accelerate
    import scipy

    return {
        "budget": budget, "seed": SEED, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "accelerate": accelerate.__version__, "scipy": scipy.__version__,
        "implicit": _implicit_version(), "cuda": torch.cuda.is_available(), "command": command,
        "load_average_1_5_15min_at_write": list(os.getloadavg()),  # the VM is shared: fit seconds depend on it
    }


def _implicit_version() -> str | None:
    if not implicit_available():
        return None
    import implicit

    return implicit.__version__


def gap(value: float, target: float, lower_is_better: bool) -> str:
    met = value <= target if lower_is_better else value > target
    word = "met" if met else "MISSED"
    return f"{word} ({value:.4f} vs {target:.4f}, margin {value - target:+.4f})"


def write(results_dir: Path, stem: str, budget: str, command: str, payload: dict, md: str) -> None:
    """cmc_<stem>.json / .md (smoke runs: cmc_<stem>_smoke.*, so they never overwrite a full run)."""
    suffix = "" if budget == "full" else "_smoke"
    payload = {"environment": environment(budget, command), **payload}
    (results_dir / f"cmc_{stem}{suffix}.json").write_text(json.dumps(payload, indent=2, default=float))
    env = payload["environment"]
    header = (f"<!-- generated by {env['command']} on {env['date_utc']} UTC; {env['machine']}, "
              f"{env['cpu_count']} CPUs, torch {env['torch']} ({env['torch_threads']} threads), seed {SEED} -->\n")
    (results_dir / f"cmc_{stem}{suffix}.md").write_text(header + md)
    print(md)


def fmt(value: float, pct: bool = False) -> str:
    if not np.isfinite(value):
        return "–"
    return f"{value:.1%}" if pct else f"{value:.4f}"
