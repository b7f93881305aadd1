"""cmc_rec benchmarks: mean baseline vs SVD vs CMC on MovieLens 100K and the Monti et al. matrices.

    pytest benchmarks/test_cmc_movielens.py --benchmark -s        # full budget
    pytest benchmarks/test_cmc_movielens.py --benchmark-smoke -s  # tiny budget (< 1 minute)

Every number in the result files is computed by the run; the blog's and the papers' numbers are
printed beside ours as "claimed".  Results: benchmarks/results/cmc_*.md / .json / .png (smoke runs
write cmc_*_smoke.* so they never overwrite a full run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cmc_rec import (
    AutoencoderConfig,
    CMCConfig,
    CMCRecommender,
    KernelAutoencoderRecommender,
    LossConfig,
    MeanRecommender,
    SVDRecommender,
    TrainConfig,
    evaluate,
    load_monti,
    load_movielens_100k_split,
)

SEED = 0
# Claimed numbers, printed beside ours (never used as results).
BLOG = {"svd": {"rmse": 0.892, "recall": 0.052, "coverage": 0.12}, "cmc": {"rmse": 0.845, "recall": 0.078, "coverage": 0.24}}
PAPERS_ML100K_U1 = {"GC-MC": 0.910, "IGMC": 0.905, "GLocal-K": 0.889}  # RMSE, official u1 split
SURPRISE_SVD_5FOLD = 0.934  # Surprise's documented SVD RMSE on ML-100K, 5-fold
PAPERS_MONTI = {  # RMSE, Monti et al. split (GC-MC: Berg et al. 2017 Table 3; IGMC: Zhang & Chen 2020 Table 2)
    "douban": {"GC-MC": 0.734, "IGMC": 0.721},
    "flixster": {"GC-MC": 0.917, "IGMC": 0.872},
    "yahoo_music": {"GC-MC": 20.5, "IGMC": 19.1},
}
TARGETS = {"u1_rmse": 0.900, "u1_recall": 0.078, "u1_coverage": 0.24, "douban": 0.725, "flixster": 0.875,
           "fit_seconds": 120.0}


# CMC settings for the Monti matrices, chosen by the validation RMSE that CMCRecommender reports
# (a seeded 5% split of each TRAINING set; the test ratings were not looked at): the ML-100K
# defaults overfit these smaller / differently scaled matrices.
MONTI_CMC = {
    "douban": {},  # the ML-100K defaults: validation RMSE 0.7524 vs 0.7688 for the setting below
    "flixster": {"standardize": True, "embedding_dim": 16, "node_dropout": 0.5, "l2": 1.0},
    "yahoo_music": {"standardize": True, "embedding_dim": 16, "node_dropout": 0.5, "l2": 1.0},
}


# The autoencoder rating head of "cmc+ae" (CMCConfig.autoencoder).  ML-100K: 2 members (3 members
# fit in about 140 s, over the 2-minute budget).  Douban: GLocal-K's published Douban
# regularisers; the others keep the ML-100K defaults.  One member on the 3,000 x 3,000 Monti matrices,
# where each member costs 1-2.5 minutes.
AE_ML100K = {"ensemble": 2}
MONTI_AE = {"douban": {"l2": 10.0, "kernel_l2": 0.022}, "flixster": {}, "yahoo_music": {}}


def _cmc_config(overrides: dict, autoencoder: AutoencoderConfig | None = None) -> CMCConfig:
    over = dict(overrides)
    loss = LossConfig(l2=over.pop("l2")) if "l2" in over else LossConfig()
    return CMCConfig(**over, loss=loss, train=TrainConfig(seed=SEED), autoencoder=autoencoder)


def _models(budget: str, cmc_overrides: dict | None = None, ae_overrides: dict | None = None,
            kernel_ae: bool = False) -> dict:
    """mean, svd, cmc+ae (graph + autoencoder heads) and optionally kernel_ae alone.  The cmc row (the
    graph head alone) is the cmc+ae model's ``graph_head()``: the same graph model, not refitted."""
    if budget == "smoke":
        cmc = CMCConfig(embedding_dim=16, num_layers=1, loss=LossConfig(contrast_batch=256),
                        train=TrainConfig(epochs=2, batch_size=200_000, view_nodes=128, seed=SEED))
        ae = AutoencoderConfig(hidden=16, num_hidden_layers=1, epochs=2, seed=SEED)
        models = {"mean": MeanRecommender(), "svd": SVDRecommender(n_epochs=2, seed=SEED),
                  "cmc+ae": CMCRecommender(dataclasses.replace(cmc, autoencoder=ae))}
    else:
        ae = AutoencoderConfig(**(ae_overrides or {}), seed=SEED)
        models = {"mean": MeanRecommender(), "svd": SVDRecommender(seed=SEED),
                  "cmc+ae": CMCRecommender(_cmc_config(cmc_overrides or {}, ae))}
    if kernel_ae:  # the autoencoder alone (one member): u1 only, so the whole file stays near 20 minutes
        models["kernel_ae"] = KernelAutoencoderRecommender(dataclasses.replace(ae, ensemble=1))
    return models


_CACHE: dict = {}  # (data set, budget) -> rows, so the 5-fold run reuses the u1 run of the same session


def _run(train, test, budget: str, ranking: bool = True, key: str | None = None,
         cmc_overrides: dict | None = None, ae_overrides: dict | None = None, kernel_ae: bool = False) -> dict:
    if key is not None and (key, budget) in _CACHE:
        print("  (reusing this session's run)")
        return _CACHE[(key, budget)]
    rows = {}

    def score(model, fit_s: float) -> dict:
        if ranking:
            res = evaluate(model, train, test, k=10).as_dict()
        else:
            pred = model.predict(test.users, test.items)
            res = {"rmse": float(np.sqrt(np.mean((pred - test.ratings) ** 2)))}
        return res | {"fit_seconds": fit_s}

    for name, model in _models(budget, cmc_overrides, ae_overrides, kernel_ae).items():
        start = time.perf_counter()
        model.fit(train)
        fit_s = time.perf_counter() - start
        if name == "cmc+ae":  # first the graph head alone (row cmc): the same fitted graph model
            graph, graph_s = model.graph_head(), fit_s - model.timings["autoencoder"]  # fit minus the autoencoder's
            rows["cmc"] = score(graph, graph_s) | {
                "best_epoch": model.result.best_epoch, "epochs_run": model.result.epochs_run,
                "val_rmse": model.val_rmse}
            _print("cmc", rows["cmc"])
            if ranking:  # the same graph model, top-K ranked by the other two scores
                for rank_by in ("preference", "rating"):
                    graph.config.rank_by = rank_by
                    rows[f"cmc_rank_by_{rank_by}"] = score(graph, graph_s)
        res = score(model, fit_s)
        if name == "cmc+ae":
            res["best_epoch"], res["epochs_run"] = model.result.best_epoch, model.result.epochs_run
            res["val_rmse"] = model.val_rmse
            res["head_weights"] = [float(w) for w in model.head_weights]  # intercept, graph, autoencoder
            res["autoencoder_val_rmse"] = model.autoencoder.val_rmse
        if name == "kernel_ae":
            res["best_epoch"], res["val_rmse"] = model.best_epoch, model.val_rmse
        rows[name] = res
        _print(name, res)
    if key is not None:
        _CACHE[(key, budget)] = rows
    return rows


def _print(name: str, res: dict) -> None:
    print(f"  {name:6s} " + " ".join(f"{k}={v:.4f}" for k, v in res.items() if isinstance(v, float)))


def _environment(budget: str) -> dict:
    import accelerate
    import scipy

    return {
        "budget": budget, "seed": SEED, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "accelerate": accelerate.__version__, "scipy": scipy.__version__,
        "cuda": torch.cuda.is_available(),
        "command": f"pytest benchmarks/test_cmc_movielens.py {'--benchmark' if budget == 'full' else '--benchmark-smoke'} -s",
    }


def _gap(value: float, target: float, lower_is_better: bool) -> str:
    met = value <= target if lower_is_better else value >= target
    return f"met ({value:.4f} vs {target})" if met else f"MISSED by {abs(value - target):.4f} ({value:.4f} vs {target})"


def _write(results_dir: Path, stem: str, budget: str, payload: dict, md: str) -> None:
    suffix = "" if budget == "full" else "_smoke"
    payload = {"environment": _environment(budget), **payload}
    (results_dir / f"cmc_{stem}{suffix}.json").write_text(json.dumps(payload, indent=2, default=float))
    env = payload["environment"]
    header = (f"<!-- generated by {env['command']} on {env['date_utc']} UTC; {env['machine']}, "
              f"{env['cpu_count']} CPUs, torch {env['torch']} ({env['torch_threads']} threads), seed {SEED} -->\n")
    (results_dir / f"cmc_{stem}{suffix}.md").write_text(header + md)
    print(md)


def _require(path: Path, what: str) -> None:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set --data-root or $MEASURED_REPRO_DATA)")


@pytest.mark.benchmark
def test_ml100k_u1(budget, data_root, results_dir):
    _require(data_root / "ml-100k" / "u1.base", "MovieLens 100K")
    train, test = load_movielens_100k_split("u1", data_root / "ml-100k")
    print(f"\nML-100K u1 ({budget})")
    rows = _run(train, test, budget, key="ml100k-u1", ae_overrides=AE_ML100K, kernel_ae=True)
    cmc, svd = rows["cmc+ae"], rows["svd"]  # recommend() of cmc+ae is the graph model's, as cmc's
    targets = {
        "rmse <= 0.900": _gap(cmc["rmse"], TARGETS["u1_rmse"], True),
        "(graph head alone, row cmc) rmse <= 0.900": _gap(rows["cmc"]["rmse"], TARGETS["u1_rmse"], True),
        "recall@10 >= blog CMC 0.078": _gap(cmc["recall"], TARGETS["u1_recall"], False),
        "coverage@10 >= blog CMC 24%": _gap(cmc["coverage"], TARGETS["u1_coverage"], False),
        "recall@10 above our SVD": f"{cmc['recall'] / max(svd['recall'], 1e-12):.2f}x SVD ({cmc['recall']:.4f} vs {svd['recall']:.4f})",
        "coverage@10 above our SVD": f"{cmc['coverage'] / max(svd['coverage'], 1e-12):.2f}x SVD",
        "fit < 120 s": _gap(cmc["fit_seconds"], TARGETS["fit_seconds"], True),
    }
    md = ["## ML-100K, official u1 split (train u1.base, test u1.test)", "",
          "| model | RMSE | MAE | Recall@10 | NDCG@10 | coverage@10 | pop. percentile | Gini | fit s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['rmse']:.4f} | {r['mae']:.4f} | {r['recall']:.4f} | {r['ndcg']:.4f} | "
                  f"{r['coverage']:.1%} | {r['pop_percentile']:.3f} | {r['gini']:.3f} | {r['fit_seconds']:.1f} |")
    md += ["", "Blog's table (claimed, protocol unstated) beside ours (measured, u1):", "",
           "| metric | blog SVD (claimed) | our SVD | blog CMC (claimed) | our CMC (cmc+ae) |", "|---|---|---|---|---|",
           f"| RMSE | {BLOG['svd']['rmse']} | {svd['rmse']:.4f} | {BLOG['cmc']['rmse']} | {cmc['rmse']:.4f} |",
           f"| Recall@10 | {BLOG['svd']['recall']} | {svd['recall']:.4f} | {BLOG['cmc']['recall']} | {cmc['recall']:.4f} |",
           f"| coverage@10 | {BLOG['svd']['coverage']:.0%} | {svd['coverage']:.1%} | {BLOG['cmc']['coverage']:.0%} | "
           f"{cmc['coverage']:.1%} |", "",
           "Published u1 RMSE (claimed): " + ", ".join(f"{k} {v}" for k, v in PAPERS_ML100K_U1.items())
           + ". GLocal-K's public code keeps the epoch with the lowest test RMSE; our kernel_ae row is its "
           "local-kernel stage (one member) with the epoch chosen on a validation split of u1.base.", "",
           "Rows: cmc = the graph model alone (its MSE rating head: cmc+ae's graph_head(), not refitted; fit s "
           "= cmc+ae's fit time minus its autoencoders'); cmc+ae = the same graph model "
           f"with the kernel-autoencoder rating head ({AE_ML100K['ensemble']} members) blended in, weights "
           "(intercept, graph, autoencoder) = " + ", ".join(f"{w:.3f}" for w in cmc.get("head_weights", []))
           + " fitted on CMC's validation split; its recommend() is the graph model's, so its ranking "
           "columns equal the cmc row's. Fit time of cmc+ae includes both.", "",
           "Targets:", ""] + [f"- {k}: {v}" for k, v in targets.items()]
    _write(results_dir, "movielens_u1", budget, {"results": rows, "targets": targets, "claimed_blog": BLOG,
                                                  "claimed_papers": PAPERS_ML100K_U1}, "\n".join(md) + "\n")
    _plot(results_dir, budget, rows)
    assert all(np.isfinite(r["rmse"]) for r in rows.values())


def _plot(results_dir: Path, budget: str, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("rmse", "RMSE (lower is better)"), ("recall", "Recall@10"), ("ndcg", "NDCG@10"),
               ("coverage", "coverage@10")]
    names = list(rows)
    labels = [n.replace("cmc_rank_by_", "cmc/") for n in names]
    fig, axes = plt.subplots(1, len(metrics), figsize=(14, 3.6))
    for ax, (key, label) in zip(axes, metrics):
        values = [rows[n][key] for n in names]
        ax.bar(labels, values, color=["#999", "#4a7", "#37c", "#9cf", "#c9f", "#e95", "#c55"][: len(names)])
        if key in BLOG["cmc"]:
            ax.axhline(BLOG["cmc"][key], color="r", ls="--", lw=1, label="blog CMC (claimed)")
            ax.legend(fontsize=7)
        if key == "rmse":
            ax.axhline(TARGETS["u1_rmse"], color="k", ls=":", lw=1, label="target 0.900")
            ax.set_ylim(0.8, max(values) + 0.02)
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.suptitle(f"ML-100K u1, measured ({budget} budget, seed {SEED})")
    fig.tight_layout()
    fig.savefig(results_dir / f"cmc_movielens_u1{'' if budget == 'full' else '_smoke'}.png", dpi=110)
    plt.close(fig)


@pytest.mark.benchmark
def test_ml100k_5fold(budget, data_root, results_dir):
    _require(data_root / "ml-100k" / "u1.base", "MovieLens 100K")
    folds = ["u1", "u2", "u3", "u4", "u5"] if budget == "full" else ["u1", "u2"]
    per_fold = {}
    for split in folds:
        print(f"\nML-100K {split} ({budget})")
        per_fold[split] = _run(*load_movielens_100k_split(split, data_root / "ml-100k"), budget, key=f"ml100k-{split}",
                               ae_overrides=AE_ML100K, kernel_ae=split == "u1")
    keys = ["rmse", "mae", "recall", "ndcg", "coverage", "fit_seconds"]
    summary = {m: {k: (float(np.mean([per_fold[f][m][k] for f in folds])),
                       float(np.std([per_fold[f][m][k] for f in folds])))
                   for k in keys} for m in per_fold[folds[0]] if all(m in per_fold[f] for f in folds)}
    md = [f"## ML-100K, {len(folds)}-fold ({', '.join(folds)}), mean ± std", "",
          "| model | RMSE | MAE | Recall@10 | NDCG@10 | coverage@10 | fit s |", "|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        md.append(f"| {m} | " + " | ".join(f"{s[k][0]:.4f} ± {s[k][1]:.4f}" for k in keys) + " |")
    md += ["", "cmc = the graph head of the cmc+ae model (not refitted); its fit s = cmc+ae's minus the "
           "autoencoders'.", "", f"Surprise's documented SVD, 5-fold (claimed): RMSE {SURPRISE_SVD_5FOLD}"]
    _write(results_dir, "movielens_5fold", budget, {"folds": per_fold, "summary_mean_std": summary},
           "\n".join(md) + "\n")


@pytest.mark.benchmark
def test_monti_datasets(budget, data_root, results_dir):
    _require(data_root / "monti" / "douban" / "training_test_dataset.mat", "Monti et al. matrices")
    rows, targets = {}, {}
    for name in ("douban", "flixster", "yahoo_music"):
        print(f"\n{name} ({budget})")
        train, test = load_monti(name, data_root / "monti" / name)
        full = budget == "full"
        rows[name] = _run(train, test, budget, ranking=False, cmc_overrides=MONTI_CMC[name] if full else None,
                          ae_overrides=MONTI_AE[name] if full else None)
        if name in TARGETS:
            targets[name] = _gap(rows[name]["cmc+ae"]["rmse"], TARGETS[name], True)
            targets[f"{name} (graph head alone)"] = _gap(rows[name]["cmc"]["rmse"], TARGETS[name], True)
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
           "here) and its fitted weights (intercept, graph, autoencoder): "
           + "; ".join(f"{n} {MONTI_AE[n]} [" + ", ".join(f"{w:.3f}" for w in rows[n]["cmc+ae"].get("head_weights", []))
                       + "]" for n in rows),
           "", "Targets (CMC = cmc+ae):", ""] + [f"- {k} <= {TARGETS[k.split()[0]]}: {v}" for k, v in targets.items()]
    _write(results_dir, "monti", budget, {"results": rows, "targets": targets, "claimed_papers": PAPERS_MONTI,
                                          "cmc_settings": MONTI_CMC, "autoencoder_settings": MONTI_AE},
           "\n".join(md) + "\n")
    assert all(np.isfinite(r["cmc"]["rmse"]) for r in rows.values())
