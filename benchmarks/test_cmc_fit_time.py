"""The issue's "fit under 2 minutes on 2 CPU cores": ``CMCRecommender()`` fitted on ML-100K u1.base
with 1 and with 2 torch threads, wall and CPU seconds and the machine's load around each fit, and
the u1 test metrics of each fit (the float reduction order, hence the fitted model, depends on the
thread count).

    pytest benchmarks/test_cmc_fit_time.py --benchmark -s        # two full fits (a few minutes)
    pytest benchmarks/test_cmc_fit_time.py --benchmark-smoke -s  # the smoke CMC (seconds)

Run it on a quiet machine for the wall time: another job on the cores inflates the wall seconds
(the load average is printed with them); on busy cores ``OMP_WAIT_POLICY=PASSIVE`` keeps the two
threads from spin-waiting on each other (it changes no number but the seconds).  EASE's and ALS's rows come from the u1 table of the same
results folder (benchmarks/results/cmc_movielens_u1.json) when it is there.
Results: benchmarks/results/cmc_fit_time.md / .json (smoke: cmc_fit_time_smoke.*).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from cmc_bench import gap, score, smoke_cmc, write

from cmc_rec import CMCRecommender, load_movielens_100k_split

THREADS = (1, 2)
TARGET_S = 120.0  # the issue: fit under 2 minutes on 2 CPU cores
COMMAND = "pytest benchmarks/test_cmc_fit_time.py {} -s"


@pytest.mark.benchmark
def test_cmc_fit_time(budget, data_root, results_dir):
    folder = data_root / "ml-100k"
    if not (folder / "u1.base").exists():
        pytest.skip(f"MovieLens 100K not found at {folder} (set --data-root or $CMC_REC_DATA)")
    train, test = load_movielens_100k_split("u1", folder)
    before = torch.get_num_threads()
    rows = {}
    try:
        for n in THREADS:
            torch.set_num_threads(n)
            model = CMCRecommender(smoke_cmc() if budget == "smoke" else None)
            load0, cpu0, start = os.getloadavg()[0], time.process_time(), time.perf_counter()
            model.fit(train)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
            rows[n] = score(model, train, test, wall) | {
                "fit_cpu_seconds": cpu, "load_average_1min": [load0, os.getloadavg()[0]],
                "timings": dict(model.timings), "head_weights": dict(zip(model.head_names, map(float, model.head_weights)))}
            print(f"  {n} thread(s): fit {wall:.1f} s wall, {cpu:.1f} s CPU, load {load0:.1f}-{os.getloadavg()[0]:.1f}; "
                  f"RMSE {rows[n]['rmse']:.4f} Recall@10 {rows[n]['recall']:.4f} NDCG@10 {rows[n]['ndcg']:.4f}", flush=True)
    finally:
        torch.set_num_threads(before)
    u1 = results_dir / "cmc_movielens_u1.json"
    base = json.loads(u1.read_text())["results"] if budget == "full" and u1.exists() else {}
    md = ["## `CMCRecommender()` fit on ML-100K u1.base with 1 and 2 torch threads", "",
          "| torch threads | fit wall s | fit CPU s | 1-min load before / after | RMSE | Recall@10 | NDCG@10 | coverage@10 |"
          " fit s per part |", "|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        md.append(f"| {n} | {r['fit_seconds']:.1f} | {r['fit_cpu_seconds']:.1f} | {r['load_average_1min'][0]:.1f} / "
                  f"{r['load_average_1min'][1]:.1f} | {r['rmse']:.4f} | {r['recall']:.4f} | {r['ndcg']:.4f} | "
                  f"{r['coverage']:.1%} | " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()) + " |")
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (the OpenMP default: waiting threads spin)")
    md += ["", f"{os.cpu_count()} CPUs; OMP_WAIT_POLICY {policy}. A load average above the fit's own thread count means other jobs shared the "
           "cores: the wall seconds are then an upper bound of a quiet fit's.", "", "Targets:", ""]
    targets = {f"fit < {TARGET_S:.0f} s wall with 2 threads": gap(rows[2]["fit_seconds"], TARGET_S, True)}
    for n, r in rows.items():
        targets[f"RMSE <= 0.900 ({n} thread(s))"] = gap(r["rmse"], 0.900, True)
        targets[f"coverage@10 >= 24% ({n} thread(s))"] = gap(r["coverage"], 0.24, False)
        for name in ("ease", "implicit_als"):
            if name in base:
                for key, label in (("recall", "Recall@10"), ("ndcg", "NDCG@10")):
                    targets[f"{label} above {name} ({n} thread(s))"] = gap(r[key], base[name][key], False)
    md += [f"- {k}: {v}" for k, v in targets.items()]
    if base:
        md += ["", f"EASE and ALS: the rows of {u1.name} (same results folder)."]
    write(results_dir, "fit_time", budget, COMMAND.format("--benchmark" if budget == "full" else "--benchmark-smoke"),
          {"results": {str(n): r for n, r in rows.items()}, "targets": targets}, "\n".join(md) + "\n")
    assert all(r["rmse"] == r["rmse"] for r in rows.values())
