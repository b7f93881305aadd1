"""cmc_rec benchmarks: CMC against the strongest ranking and rating baselines on MovieLens 100K, and
its rating heads on the Monti et al. matrices.

    pytest benchmarks/test_cmc_movielens.py --benchmark -s        # full budget
    pytest benchmarks/test_cmc_movielens.py --benchmark-smoke -s  # tiny budget (a few minutes)

Every number in the result files is computed by the run; the blog's and the papers' numbers are
printed beside ours as "claimed".  Results: benchmarks/results/cmc_*.md / .json / .png (smoke runs
write cmc_*_smoke.* so they never overwrite a full run).  Baselines are tuned on a per-user
validation carve of each training split (benchmarks/cmc_bench.py); the chosen values are printed.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from cmc_bench import (
    RANKING_BASELINES,
    SEED,
    fmt,
    gap,
    run_split,
    show,
    write,
)

from cmc_rec import (
    AutoencoderConfig,
    CMCConfig,
    CMCRecommender,
    LossConfig,
    MeanRecommender,
    SVDRecommender,
    TrainConfig,
    load_monti,
    load_movielens_100k_split,
    temperature_sweep,
)
from cmc_rec.metrics import rmse
from cmc_rec.ranking import RankingConfig

# Claimed numbers, printed beside ours (never used as results).
BLOG = {"svd": {"rmse": 0.892, "recall": 0.052, "coverage": 0.12}, "cmc": {"rmse": 0.845, "recall": 0.078, "coverage": 0.24}}
PAPERS_ML100K_U1 = {"GC-MC": 0.910, "IGMC": 0.905, "GLocal-K": 0.889}  # RMSE, official u1 split
SURPRISE_SVD_5FOLD = 0.934  # Surprise's documented SVD RMSE on ML-100K, 5-fold
PAPERS_MONTI = {  # RMSE, Monti et al. split (GC-MC: Berg et al. 2017 Table 3; IGMC: Zhang & Chen 2020 Table 2)
    "douban": {"GC-MC": 0.734, "IGMC": 0.721},
    "flixster": {"GC-MC": 0.917, "IGMC": 0.872},
    "yahoo_music": {"GC-MC": 20.5, "IGMC": 19.1},
}
TARGETS = {"rmse": 0.900, "coverage": 0.24, "douban": 0.725, "flixster": 0.875, "fit_seconds": 120.0}
TEMPERATURES = [0.15, 0.2, 0.25]  # the default's temperature is re-chosen among these on u1's carve
COMMAND = "pytest benchmarks/test_cmc_movielens.py {} -s"

# CMC's graph model for the Monti matrices (CMCConfig(graph_rating=True), its MSE head plus the
# autoencoder head; these data sets are scored on RMSE only), chosen by the validation RMSE that
# CMCRecommender reports (a seeded 5% split of each TRAINING set): the ML-100K defaults overfit
# these smaller / differently scaled matrices.
MONTI_CMC = {
    "douban": {},  # the ML-100K defaults: validation RMSE 0.7524 vs 0.7688 for the setting below
    "flixster": {"standardize": True, "embedding_dim": 16, "node_dropout": 0.5, "l2": 1.0},
    "yahoo_music": {"standardize": True, "embedding_dim": 16, "node_dropout": 0.5, "l2": 1.0},
}
# The autoencoder head there: Douban with GLocal-K's published Douban regularisers, one member
# (each costs 1-2.5 minutes on the 3,000 x 3,000 matrices).
MONTI_AE = {"douban": {"l2": 10.0, "kernel_l2": 0.022}, "flixster": {}, "yahoo_music": {}}

_CACHE: dict = {}  # (split, budget) -> run, so the 5-fold run reuses the u1 run of the same session


def _command(budget: str) -> str:
    return COMMAND.format("--benchmark" if budget == "full" else "--benchmark-smoke")


@pytest.fixture(scope="session")
def cmc_data(request: pytest.FixtureRequest) -> Path:
    """The data root: --data-root, else $CMC_REC_DATA (cmc_rec's own variable); neither skips."""
    given = request.config.getoption("--data-root") or os.environ.get("CMC_REC_DATA")
    if not given:
        pytest.skip("no data root: pass --data-root or set $CMC_REC_DATA (e.g. to ../shared/data)")
    return Path(given)


def _require(path: Path, what: str) -> None:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set --data-root or $CMC_REC_DATA)")


def _split_run(split: str, budget: str, cmc_data: Path) -> dict:
    if (split, budget) not in _CACHE:
        print(f"\nML-100K {split} ({budget})")
        _CACHE[(split, budget)] = run_split(*load_movielens_100k_split(split, cmc_data / "ml-100k"), budget)
    else:
        print(f"\nML-100K {split}: reusing this session's run")
    return _CACHE[(split, budget)]


def _targets(cmc: dict, base: dict) -> dict:
    """The issue's targets for the default CMC against the measured EASE and ALS rows."""
    out = {}
    for key, label in (("recall", "Recall@10"), ("ndcg", "NDCG@10")):
        for name in ("ease", "implicit_als"):
            if name in base:
                out[f"{label} above {name}"] = gap(cmc[key], base[name][key], False)
    out["coverage@10 >= 24%"] = gap(cmc["coverage"], TARGETS["coverage"], False)
    out["RMSE <= 0.900"] = gap(cmc["rmse"], TARGETS["rmse"], True)
    out["fit < 120 s (wall, as measured on the shared machine)"] = gap(cmc["fit_seconds"], TARGETS["fit_seconds"], True)
    if "fit_cpu_seconds" in cmc:  # CPU seconds of the process: the wall time on idle cores, whatever the load
        out[f"fit < 120 s (process CPU seconds, {cmc['fit_threads']} thread(s))"] = gap(
            cmc["fit_cpu_seconds"], TARGETS["fit_seconds"], True)
    return out


def _fit_note(cmc: dict) -> str:
    """CMC's fit: wall and CPU seconds, threads and the machine's load average around it."""
    load = cmc.get("load_average_1min")
    return (f"CMC fit: {cmc['fit_seconds']:.1f} s wall, {cmc['fit_cpu_seconds']:.1f} s CPU of the process "
            f"({cmc['fit_threads']} torch thread(s)); 1-min load average {load[0]:.1f} before, {load[1]:.1f} after "
            "(other jobs share the 2 CPUs, so the wall seconds of every row depend on them).") if load else ""


def _table(rows: dict) -> list[str]:
    md = ["| model | RMSE | MAE | Recall@10 | NDCG@10 | coverage@10 | pop. percentile | Gini | fit s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {fmt(r['rmse'])} | {fmt(r['mae'])} | {r['recall']:.4f} | {r['ndcg']:.4f} | "
                  f"{r['coverage']:.1%} | {r['pop_percentile']:.3f} | {r['gini']:.3f} | {r['fit_seconds']:.1f} |")
    return md


@pytest.mark.benchmark
def test_ml100k_u1(budget, cmc_data, results_dir):
    _require(cmc_data / "ml-100k" / "u1.base", "MovieLens 100K")
    train, _ = load_movielens_100k_split("u1", cmc_data / "ml-100k")
    run = _split_run("u1", budget, cmc_data)
    rows = run["rows"]
    # the default temperature, re-chosen on u1.base's carve (ranking part alone: recommend() uses only it)
    base_cfg = CMCConfig(autoencoder=None) if budget == "full" else dataclasses.replace(
        CMCConfig(ranking=RankingConfig(embedding_dim=16, epochs=1, ensemble=1)), autoencoder=None)
    sweep = temperature_sweep(train, TEMPERATURES if budget == "full" else [0.2, 0.25], base_cfg, seed=SEED)
    for r in sweep:
        show(f"tau={r['temperature']}", {k: r[k] for k in ("recall", "ndcg", "coverage", "fit_seconds")})
    cmc, svd = rows["cmc"], rows["svd"]
    targets = _targets(cmc, rows)
    _ae = CMCConfig().autoencoder
    strongest = max(RANKING_BASELINES, key=lambda n: rows[n]["ndcg"] if n in rows else -1.0)
    md = ["## ML-100K, official u1 split (train u1.base, test u1.test)", ""] + _table(rows) + [
        "", "Rows: `cmc` is `CMCRecommender()` at its defaults: the InfoNCE ranking model ranks; the "
        f"item autoencoder ({_ae.ensemble} member(s) of {_ae.hidden} units), the user-based autoencoder and the "
        "item kNN, blended with damped biases by least squares on a validation carve, predict; weights "
        + ", ".join(f"{n} {w:.3f}" for n, w in zip(cmc["head_names"], cmc["head_weights"]))
        + "; fit seconds per part: " + ", ".join(f"{k} {v:.1f}" for k, v in cmc["timings"].items())
        + ". Ranking-only baselines predict no rating (RMSE –).", "", _fit_note(cmc), "",
        "Hyper-parameters chosen on a 10% per-user validation carve of u1.base (NDCG@10; SVD by RMSE):", ""]
    md += [f"- {name}: {params}" for name, params in run["chosen"].items()]
    md += ["", "CMC temperature on the same carve (ranking model alone; the default is 0.2):", "",
           "| tau | val Recall@10 | val NDCG@10 | val coverage@10 |", "|---|---|---|---|"]
    md += [f"| {r['temperature']} | {r['recall']:.4f} | {r['ndcg']:.4f} | {r['coverage']:.1%} |" for r in sweep]
    md += ["", f"Strongest ranking baseline on this split: {strongest} (NDCG@10 {rows[strongest]['ndcg']:.4f}).",
           "", "Blog's table (claimed, protocol unstated) beside ours (measured, u1):", "",
           "| metric | blog SVD (claimed) | our SVD | blog CMC (claimed) | our CMC | our EASE |", "|---|---|---|---|---|---|",
           f"| RMSE | {BLOG['svd']['rmse']} | {svd['rmse']:.4f} | {BLOG['cmc']['rmse']} | {cmc['rmse']:.4f} | – |",
           f"| Recall@10 | {BLOG['svd']['recall']} | {svd['recall']:.4f} | {BLOG['cmc']['recall']} | {cmc['recall']:.4f} | "
           f"{rows['ease']['recall']:.4f} |",
           f"| coverage@10 | {BLOG['svd']['coverage']:.0%} | {svd['coverage']:.1%} | {BLOG['cmc']['coverage']:.0%} | "
           f"{cmc['coverage']:.1%} | {rows['ease']['coverage']:.1%} |", "",
           "Published u1 RMSE (claimed): " + ", ".join(f"{k} {v}" for k, v in PAPERS_ML100K_U1.items()) + ".", "",
           "Targets (default CMCRecommender()):", ""] + [f"- {k}: {v}" for k, v in targets.items()]
    write(results_dir, "movielens_u1", budget, _command(budget),
          {"results": rows, "chosen": run["chosen"], "validation": run["validation"], "temperature_sweep": sweep,
           "targets": targets, "claimed_blog": BLOG, "claimed_papers": PAPERS_ML100K_U1}, "\n".join(md) + "\n")
    _plot(results_dir, budget, rows)
    assert all(np.isfinite(r["ndcg"]) for r in rows.values())


def _plot(results_dir: Path, budget: str, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("recall", "Recall@10"), ("ndcg", "NDCG@10"), ("coverage", "coverage@10"), ("rmse", "RMSE (lower is better)")]
    names = list(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(15, 3.8))
    for ax, (key, label) in zip(axes, metrics):
        values = [rows[n][key] if np.isfinite(rows[n][key]) else 0.0 for n in names]
        ax.bar(names, values, color=["#c55" if n == "cmc" else "#789" for n in names])
        if key == "rmse":
            ax.axhline(TARGETS["rmse"], color="k", ls=":", lw=1, label="target 0.900")
            ax.set_ylim(0.85, 1.0)
            ax.legend(fontsize=7)
        if key == "coverage":
            ax.axhline(TARGETS["coverage"], color="k", ls=":", lw=1, label="target 24%")
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.suptitle(f"ML-100K u1, measured ({budget} budget, seed {SEED}); ranking-only models have no RMSE")
    fig.tight_layout()
    fig.savefig(results_dir / f"cmc_movielens_u1{'' if budget == 'full' else '_smoke'}.png", dpi=110)
    plt.close(fig)


@pytest.mark.benchmark
def test_ml100k_5fold(budget, cmc_data, results_dir):
    _require(cmc_data / "ml-100k" / "u1.base", "MovieLens 100K")
    folds = ["u1", "u2", "u3", "u4", "u5"] if budget == "full" else ["u1", "u2"]
    runs = {split: _split_run(split, budget, cmc_data) for split in folds}
    keys = ["rmse", "mae", "recall", "ndcg", "coverage", "fit_seconds"]
    models = list(runs[folds[0]]["rows"])
    summary = {m: {k: (float(np.mean([runs[f]["rows"][m][k] for f in folds])),
                       float(np.std([runs[f]["rows"][m][k] for f in folds]))) for k in keys} for m in models}
    mean = {m: {k: v[0] for k, v in s.items()} for m, s in summary.items()}
    cmc_rows = [runs[f]["rows"]["cmc"] for f in folds]
    if all("fit_cpu_seconds" in r for r in cmc_rows):
        mean["cmc"] |= {"fit_cpu_seconds": float(np.mean([r["fit_cpu_seconds"] for r in cmc_rows])),
                        "fit_threads": cmc_rows[0]["fit_threads"]}
    targets = _targets(mean["cmc"], mean)
    md = [f"## ML-100K, {len(folds)}-fold ({', '.join(folds)}), mean ± std", "",
          "| model | RMSE | MAE | Recall@10 | NDCG@10 | coverage@10 | fit s |", "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        md.append(f"| {m} | " + " | ".join(f"{fmt(s[k][0])} ± {fmt(s[k][1])}" if np.isfinite(s[k][0]) else "–"
                                           for k in keys) + " |")
    md += ["", "Baselines tuned on each fold's own training carve; chosen values per fold. `cmc` is "
           "`CMCRecommender()` on every fold: its defaults were chosen on u1.base's validation carve only "
           "(never re-tuned per fold, never on a test split).", ""]
    md += [f"- {f}: " + "; ".join(f"{n} {p}" for n, p in runs[f]["chosen"].items() if p) for f in folds]
    md += ["", "CMC fit per fold: " + "; ".join(
        f"{f} {r['fit_seconds']:.0f} s wall / {r.get('fit_cpu_seconds', float('nan')):.0f} s CPU (load "
        + "-".join(f"{x:.1f}" for x in r.get("load_average_1min", [])) + ")" for f, r in zip(folds, cmc_rows)) + "."]
    md += ["", f"Surprise's documented SVD, 5-fold (claimed): RMSE {SURPRISE_SVD_5FOLD}", "",
           "Targets on the fold mean (default CMCRecommender()):", ""] + [f"- {k}: {v}" for k, v in targets.items()]
    write(results_dir, "movielens_5fold", budget, _command(budget),
          {"folds": {f: r["rows"] for f, r in runs.items()}, "chosen": {f: r["chosen"] for f, r in runs.items()},
           "summary_mean_std": summary, "targets": targets}, "\n".join(md) + "\n")


def _monti_models(name: str, budget: str) -> dict:
    """mean, svd and CMC's graph model with the autoencoder head (cmc+ae); cmc = its graph_head()."""
    if budget == "smoke":
        cmc = CMCConfig(ranking=None, graph_rating=True, rank_by="blend", embedding_dim=16, num_layers=1,
                        loss=LossConfig(contrast_batch=256),
                        train=TrainConfig(epochs=2, batch_size=200_000, view_nodes=128, seed=SEED),
                        autoencoder=AutoencoderConfig(hidden=16, num_hidden_layers=1, epochs=2, seed=SEED),
                        user_autoencoder=None, neighbors=None)
        return {"mean": MeanRecommender(), "svd": SVDRecommender(n_epochs=2, seed=SEED), "cmc+ae": CMCRecommender(cmc)}
    over = dict(MONTI_CMC[name])
    loss = LossConfig(l2=over.pop("l2")) if "l2" in over else LossConfig()
    cmc = CMCConfig(ranking=None, graph_rating=True, rank_by="blend", **over, loss=loss, train=TrainConfig(seed=SEED),
                    autoencoder=AutoencoderConfig(**MONTI_AE[name], seed=SEED),
                    user_autoencoder=None, neighbors=None)  # the ML-100K blend partners: not measured here
    return {"mean": MeanRecommender(), "svd": SVDRecommender(seed=SEED), "cmc+ae": CMCRecommender(cmc)}


def _monti_run(name: str, train, test, budget: str) -> dict:
    import time

    rows = {}
    for key, model in _monti_models(name, budget).items():
        start = time.perf_counter()
        model.fit(train)
        fit_s = time.perf_counter() - start
        err = lambda m: rmse(test.ratings, m.predict(test.users, test.items))  # noqa: E731
        if key == "cmc+ae":
            rows["cmc"] = {"rmse": err(model.graph_head()), "fit_seconds": model.timings["graph"],
                           "val_rmse": model.val_rmse}
            show("cmc", rows["cmc"])
        rows[key] = {"rmse": err(model), "fit_seconds": fit_s}
        if key == "cmc+ae":
            rows[key]["head_weights"] = [float(w) for w in model.head_weights]
        show(key, rows[key])
    return rows


@pytest.mark.benchmark
def test_monti_datasets(budget, cmc_data, results_dir):
    _require(cmc_data / "monti" / "douban" / "training_test_dataset.mat", "Monti et al. matrices")
    rows, targets = {}, {}
    for name in ("douban", "flixster", "yahoo_music"):
        print(f"\n{name} ({budget})")
        train, test = load_monti(name, cmc_data / "monti" / name)
        rows[name] = _monti_run(name, train, test, budget)
        if name in TARGETS:
            targets[name] = gap(rows[name]["cmc+ae"]["rmse"], TARGETS[name], True)
            targets[f"{name} (graph head alone)"] = gap(rows[name]["cmc"]["rmse"], TARGETS[name], True)
    md = ["## Monti et al. splits: test RMSE", "",
          "| data set | mean (ours) | SVD (ours) | CMC graph head (ours) | CMC + AE head (ours) | GC-MC (claimed) "
          "| IGMC (claimed) | CMC + AE fit s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['mean']['rmse']:.4f} | {r['svd']['rmse']:.4f} | {r['cmc']['rmse']:.4f} | "
                  f"{r['cmc+ae']['rmse']:.4f} | {PAPERS_MONTI[name]['GC-MC']} | {PAPERS_MONTI[name]['IGMC']} | "
                  f"{r['cmc+ae']['fit_seconds']:.1f} |")
    md += ["", "CMC settings (chosen on the validation split of each training set; CMC validation RMSE "
           "in brackets): " + "; ".join(f"{n} {MONTI_CMC[n]} [{rows[n]['cmc']['val_rmse']:.4f}]" for n in rows),
           "", "Autoencoder head (one member; Douban with GLocal-K's published Douban regularisers, not tuned "
           "here) and its fitted weights (intercept, damped biases, graph, autoencoder): "
           + "; ".join(f"{n} {MONTI_AE[n]} [" + ", ".join(f"{w:.3f}" for w in rows[n]["cmc+ae"].get("head_weights", []))
                       + "]" for n in rows),
           "", "Targets (CMC = cmc+ae):", ""] + [f"- {k} <= {TARGETS[k.split()[0]]}: {v}" for k, v in targets.items()]
    write(results_dir, "monti", budget, _command(budget), {"results": rows, "targets": targets, "claimed_papers": PAPERS_MONTI,
                                          "cmc_settings": MONTI_CMC, "autoencoder_settings": MONTI_AE},
           "\n".join(md) + "\n")
    assert all(np.isfinite(r["cmc"]["rmse"]) for r in rows.values())
