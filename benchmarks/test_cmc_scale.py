"""cmc_rec at scale: fit time and peak memory of CMC's ranking model against the number of ratings,
up to a synthetic 10M-rating matrix, and batched ``recommend`` for every user.

    pytest benchmarks/test_cmc_scale.py --benchmark -s        # 1M, 3M, 10M ratings (minutes)
    pytest benchmarks/test_cmc_scale.py --benchmark-smoke -s  # 10k, 30k, 100k ratings (seconds)

Each size runs in its own single-threaded subprocess, so its peak resident memory (``ru_maxrss``)
is its own.  The model: ``CMCConfig(autoencoder=None)`` with the sampled, logQ-corrected softmax
(``RankingConfig(negatives=256, batch_size=262_144)``) and one epoch; the full softmax costs (B, I) per step and the
autoencoder head is dense in items x users, so neither is part of this scale path.
Results: benchmarks/results/cmc_scale.md / .json (smoke: cmc_scale_smoke.*).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cmc_bench import write

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"full": [1_000_000, 3_000_000, 10_000_000], "smoke": [10_000, 30_000, 100_000]}
RATINGS_PER_USER = 100
ITEMS_PER_RATING = 1 / 500  # catalog: 20k items at 10M ratings (ML-20M has 27k)

CHILD = r"""
import json, os, resource, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from cmc_rec import CMCConfig, CMCRecommender, RankingConfig

n = int(sys.argv[1]); n_users = max(10, n // {per_user}); n_items = max(1000, int(n * {per_item}))
rng = np.random.default_rng(0)
t0 = time.perf_counter()
codes = np.empty(0, np.int64)  # n distinct (user, item) pairs (a model refuses repeated pairs)
while len(codes) < n:
    users = rng.integers(0, n_users, n)  # ~{per_user} ratings a user
    items = (rng.random(n) ** 3 * n_items).astype(np.int64)  # skewed: low ids popular, as in real catalogs
    codes = np.concatenate([codes, users * n_items + items])
    codes = codes[np.sort(np.unique(codes, return_index=True)[1])]  # first draw of each pair, in draw order
codes = codes[:n]
users, items = codes // n_items, codes % n_items
ratings = rng.integers(1, 6, n).astype(np.float32)
data = np.stack([users, items, ratings], 1)
gen_s = time.perf_counter() - t0
cfg = CMCConfig(ranking=RankingConfig(epochs=1, batch_size=262_144, negatives=256, progress=False), autoencoder=None)
t0, c0 = time.perf_counter(), time.process_time()
model = CMCRecommender(cfg).fit(data); fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
fit_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
all_users = np.unique(users)
t0, c0 = time.perf_counter(), time.process_time()
ids, scores = model.recommend(all_users, k=10, batch_size=1024); rec_s, rec_cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({{"ratings": n, "users": int(len(all_users)), "items": int(len(np.unique(items))),
                  "generate_s": gen_s, "fit_s": fit_s, "fit_cpu_s": fit_cpu, "fit_peak_rss_mib": fit_rss, "recommend_s": rec_s,
                  "recommend_cpu_s": rec_cpu, "members": len(model.rankers), "load_average_1min": os.getloadavg()[0],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "recommend_shape": list(ids.shape), "finite_scores": bool(np.isfinite(scores).all())}}))
"""


def _child(n: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = CHILD.format(per_user=RATINGS_PER_USER, per_item=ITEMS_PER_RATING)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(n)], capture_output=True, text=True,
                         env=env, timeout=3000)
    if out.returncode != 0:
        raise RuntimeError(f"scale run at {n} ratings failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark
def test_cmc_scale(budget, results_dir):
    rows = []
    for n in SIZES[budget]:
        rows.append(_child(n))
        print(f"  {n:>10,d} ratings: " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in rows[-1].items()), flush=True)
    n = np.array([r["ratings"] for r in rows], float)
    mem = np.array([r["fit_peak_rss_mib"] for r in rows])
    slope, intercept = np.polyfit(n, mem, 1)
    resid = float(np.max(np.abs(mem - (slope * n + intercept)) / mem))
    md = ["## CMC ranking model at scale (synthetic ratings, one thread, one epoch, 256 sampled negatives)", "",
          f"The default ranking model (its {rows[0]['members']} ensemble members, the denoising gate) with the "
          "sampled softmax. The machine is shared: CPU seconds (of the child process) do not depend on the other "
          "jobs, wall seconds do (1-min load average at the end of each child in the last column).", "",
          "| ratings | users | items | fit CPU s | fit wall s | fit peak RSS MiB | recommend all users CPU s "
          "| wall s | peak RSS MiB | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['ratings']:,} | {r['users']:,} | {r['items']:,} | {r['fit_cpu_s']:.1f} | {r['fit_s']:.1f} | "
           f"{r['fit_peak_rss_mib']:.0f} | {r['recommend_cpu_s']:.1f} | {r['recommend_s']:.1f} | {r['peak_rss_mib']:.0f} | "
           f"{r['load_average_1min']:.1f} |" for r in rows]
    md += ["", f"Least-squares line through the fit peaks: {slope * 1e6:.1f} MiB per million ratings + "
           f"{intercept:.0f} MiB (the interpreter, torch and the per-step (batch, negatives) logits); largest relative deviation from the line {resid:.1%}.",
           "recommend() scores 1,024 users at a time: (1024, items) floats at once whatever the number of users."]
    write(results_dir, "scale", budget, f"pytest benchmarks/test_cmc_scale.py "
          f"{'--benchmark' if budget == 'full' else '--benchmark-smoke'} -s",
          {"rows": rows, "memory_line_mib_per_rating": slope, "memory_intercept_mib": intercept,
           "max_relative_deviation": resid}, "\n".join(md) + "\n")
    assert all(r["finite_scores"] and r["recommend_shape"] == [r["users"], 10] for r in rows)
