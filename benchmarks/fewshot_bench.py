"""Shared machinery of the few-shot benchmarks (support module of test_fewshot_*.py).

Each model trains in its own subprocess (``python -m fewshot_ccd.experiment``); the two run side by
side, so both see the same machine load and the peak resident memory of each is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("protonet", "ccd")

# The blog post's claimed tables (mini-ImageNet, Conv-4 by its description); printed beside ours.
CLAIMED_BLOG = [
    # (table, method, claimed accuracy %, extra)
    ("5-way 5-shot mini-ImageNet", "Baseline ProtoNet", 76.2, "4h 20m, 6 GB (claimed)"),
    ("5-way 5-shot mini-ImageNet", "CCD Breakthrough", 82.5, "5h 45m, 14 GB (claimed)"),
    ("5-way 1-shot mini-ImageNet", "Standard Prototypical Nets", 60.37, "blog's own run: 60.12 (claimed)"),
    ("5-way 1-shot mini-ImageNet", "CCD (The Paper's Method)", 68.21, "blog's own run: 67.85 (claimed)"),
]


def fmt(r: dict) -> str:
    return f"{r['mean']:.2f} ± {r['ci95']:.2f}"


def budget_line(b: dict, res: dict, train_on: str, test_on: str) -> str:
    """The markdown sentence stating the budget; the optimiser and distance are read from the runs."""
    p, c = res["protonet"], res["ccd"]
    cfg = p["config"]
    return (f"Budget: **{b['name']}**: {b['steps']} training episodes of {b['n_way']}-way {b['n_shot']}-shot "
            f"{b['n_query']}-query on {train_on} (Adam {cfg['lr']:g}, halved every {cfg['lr_decay_every']}); "
            f"Conv-4 for both ({p['parameters']:,} and {c['parameters']:,} parameters), {cfg['distance']} "
            f"distance; {b['eval_episodes']} seeded episodes per setting on {test_on} (seed {b['eval_seed']}, "
            f"{b['eval_query']} queries per class), the same for both models; model/training seed {b['seed']}.  ")


def experiment_command(method: str, b: dict, data_root: Path, out: Path) -> list[str]:
    """The ``fewshot_ccd.experiment`` command line of one model under budget ``b``."""
    cmd = [sys.executable, "-m", "fewshot_ccd.experiment", "--method", method,
           "--dataset", b.get("dataset", "omniglot"), "--steps", str(b["steps"]),
           "--n-way", str(b["n_way"]), "--n-shot", str(b["n_shot"]), "--n-query", str(b["n_query"]),
           "--seed", str(b["seed"]), "--eval-episodes", str(b["eval_episodes"]), "--eval-seed",
           str(b["eval_seed"]), "--eval-query", str(b["eval_query"]), "--threads", str(b["threads"]),
           "--distance", b.get("distance", "euclidean"), "--num-workers", str(b.get("num_workers", 0)),
           "--root", str(data_root), "--no-progress", "--out", str(out)]
    if b.get("max_classes") is not None:
        cmd += ["--max-classes", str(b["max_classes"])]
    return cmd


def run_side_by_side(b: dict, data_root: Path, tmp: Path) -> dict:
    """One subprocess per method, run side by side; returns each one's result JSON."""
    env = dict(os.environ, OMP_NUM_THREADS=str(b["threads"]))
    procs = {m: subprocess.Popen(experiment_command(m, b, data_root, tmp / f"{m}.json"), cwd=ROOT, env=env)
             for m in METHODS}
    try:
        for m, proc in procs.items():
            if proc.wait() != 0:
                raise RuntimeError(f"{m} experiment failed with exit code {proc.returncode}")
    finally:  # one failed: do not leave the other training for hours
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return {m: json.loads((tmp / f"{m}.json").read_text()) for m in METHODS}
