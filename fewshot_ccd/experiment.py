"""One experiment, end to end: build a model, meta-train it, evaluate it.

Used by ``examples/fewshot_omniglot.py`` and the benchmarks; also a command line::

    python -m fewshot_ccd.experiment --method ccd --steps 3000 --out ccd.json
    python -m fewshot_ccd.experiment --dataset miniimagenet --n-way 30 --n-query 15 --out ccd.json

Omniglot: trained on the background alphabets with rotations; evaluated on 5-way / 20-way x 1-shot /
5-shot episodes of the evaluation alphabets (seeded, the same for every method) and on Lake et al.'s
20 within-alphabet one-shot runs.  mini-ImageNet (84x84, Ravi & Larochelle's split): trained on the
64 train classes; evaluated on 5-way 1-shot and 5-shot episodes of the 20 test classes (of the 16 val
classes when the folder has no ``test.csv``).  The staged mini-ImageNet run (pre-training, frozen
features, CCD design search) is :mod:`fewshot_ccd.pipeline`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._atomic import atomic_write_text, check_writable
from ._checks import finite, positive_int
from .data.folders import MiniImageNet
from .data.omniglot import OmniglotDataset, load_lake_runs
from .data.paths import dataset_dir
from .evaluate import embed_dataset, evaluate, evaluate_lake_runs
from .methods.base import DISTANCES
from .models import METHODS, build_model
from .train import TrainConfig, meta_train

__all__ = ["METHODS", "DATASETS", "build_model", "ExperimentConfig", "run_experiment", "run_omniglot",
           "run_miniimagenet", "miniimagenet_root", "miniimagenet_eval_split", "EVAL_SETTINGS", "MINI_EVAL_SETTINGS"]

DATASETS = ("omniglot", "miniimagenet")
EVAL_SETTINGS = ((5, 1), (5, 5), (20, 1), (20, 5))  # (n_way, n_shot), Omniglot
MINI_EVAL_SETTINGS = ((5, 1), (5, 5))  # mini-ImageNet


@dataclass
class ExperimentConfig:
    """One experiment.  The defaults are the issue's Omniglot reference budget (Snell et al.'s
    Omniglot recipe); for mini-ImageNet set the recipe yourself (Snell et al.: 30-way 1-shot with
    15 queries, or 20-way 5-shot)."""

    method: str = "ccd"  # "protonet" | "ccd" | "ccd_qkv"
    dataset: str = "omniglot"  # "omniglot" | "miniimagenet" (Snell et al. train it 30-way, 15 queries)
    steps: int = 3000  # training episodes (meta_batch = 1): 3,000 60-way 1-shot episodes
    n_way: int = 60  # training ways
    n_shot: int = 1  # training shots
    n_query: int = 5  # training queries per class
    lr: float = 1e-3  # Adam
    lr_decay_every: int = 2000  # halve the learning rate every this many steps
    seed: int = 0  # model init and training episodes
    eval_episodes: int = 1000  # per evaluation setting
    eval_query: int = 15  # queries per class in evaluation episodes
    eval_seed: int = 2024  # evaluation episodes (the same for every method)
    num_heads: int = 8  # CCD attention heads
    contrastive_weight: float = 0.0  # FEAT's regulariser (CCD only)
    scale_init: float = 1e-2  # CCD's task-adaptive scale at initialisation (near the identity)
    distance: str = "euclidean"  # "euclidean" (squared, Snell et al.) | "euclidean_unsquared" (easyfsl) | "cosine"
    root: str | None = None  # data root (None: $FEWSHOT_CCD_DATA, then the cache folder)
    max_classes: int | None = None  # Omniglot: use only the first characters of each set (smoke runs)
    threads: int | None = None  # torch.set_num_threads (None: leave)
    num_workers: int = 0  # DataLoader workers (mini-ImageNet without cache decodes JPEG/PNG files per episode)
    cache: bool = True  # mini-ImageNet: decode once into the uint8 memory-mapped cache (fewshot_ccd.data.cache)
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        finite("lr", self.lr, low=0.0, low_open=True)
        finite("contrastive_weight", self.contrastive_weight, low=0.0)
        finite("scale_init", self.scale_init, low=0.0, low_open=True)
        for name in ("steps", "n_way", "n_shot", "n_query", "eval_episodes", "eval_query", "lr_decay_every"):
            positive_int(name, getattr(self, name))
        if self.dataset != "omniglot" and self.max_classes is not None:
            raise ValueError(f"max_classes applies to Omniglot only, got {self.max_classes} with {self.dataset!r}")


def run_experiment(cfg: ExperimentConfig) -> dict:
    """:func:`run_omniglot` or :func:`run_miniimagenet`, by ``cfg.dataset``."""
    return run_omniglot(cfg) if cfg.dataset == "omniglot" else run_miniimagenet(cfg)


def run_omniglot(cfg: ExperimentConfig) -> dict:
    """Trains on the background set with rotations; evaluates on the evaluation set and Lake's runs."""
    _check_dataset(cfg, "omniglot")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    train_set = OmniglotDataset(cfg.root, split="background", rotations=True, max_classes=cfg.max_classes)
    test_set = OmniglotDataset(cfg.root, split="evaluation", max_classes=cfg.max_classes)
    runs = load_lake_runs(cfg.root)
    return _train_and_evaluate(cfg, train_set, test_set, EVAL_SETTINGS, time.perf_counter() - t0, runs=runs)


def miniimagenet_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding mini-ImageNet's ``{train,val[,test]}.csv`` (at its top or in ``split/``)."""
    return dataset_dir("mini-imagenet", root, marker=("train.csv", "split/train.csv"))


def miniimagenet_eval_split(root: str | os.PathLike) -> str:
    """``"test"`` when the folder has ``test.csv``, else ``"val"`` (the test classes are not everywhere)."""
    root = Path(root)
    return "test" if (root / "test.csv").exists() or (root / "split" / "test.csv").exists() else "val"


def run_miniimagenet(cfg: ExperimentConfig) -> dict:
    """Trains on the 64 train classes; evaluates 5-way 1-shot and 5-shot on the 20 test classes (on the
    16 val classes when the folder has no ``test.csv``; the split is in the result's ``eval_split``)."""
    _check_dataset(cfg, "miniimagenet")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    root = miniimagenet_root(cfg.root)
    split = miniimagenet_eval_split(root)
    train_set = MiniImageNet(root, split="train", cache=cfg.cache, progress=cfg.progress)
    test_set = MiniImageNet(root, split=split, cache=cfg.cache, progress=cfg.progress)
    result = _train_and_evaluate(cfg, train_set, test_set, MINI_EVAL_SETTINGS, time.perf_counter() - t0,
                                 in_channels=3, image_size=84)
    return result | {"eval_split": split}


def _check_dataset(cfg: ExperimentConfig, expected: str) -> None:
    if cfg.dataset != expected:
        raise ValueError(f"this runs {expected!r} but cfg.dataset is {cfg.dataset!r}; use run_experiment(cfg)")


def _train_and_evaluate(cfg: ExperimentConfig, train_set, test_set, settings, load_s: float, *, runs=None,
                        in_channels: int = 1, image_size: int = 28) -> dict:
    model = build_model(cfg.method, in_channels=in_channels, image_size=image_size, seed=cfg.seed,
                        num_heads=cfg.num_heads, contrastive_weight=cfg.contrastive_weight,
                        scale_init=cfg.scale_init, distance=cfg.distance)
    train = meta_train(model, train_set, TrainConfig(
        n_way=cfg.n_way, n_shot=cfg.n_shot, n_query=cfg.n_query, steps=cfg.steps, lr=cfg.lr,
        lr_decay_every=cfg.lr_decay_every, seed=cfg.seed, progress=cfg.progress,
        channels_last=True, num_workers=cfg.num_workers,
    ))
    t1 = time.perf_counter()
    features = embed_dataset(model, test_set, num_workers=cfg.num_workers)  # (M, D), shared by the settings
    results = {}
    for n_way, n_shot in settings:
        r = evaluate(model, test_set, n_way=n_way, n_shot=n_shot, n_query=cfg.eval_query,
                     episodes=cfg.eval_episodes, seed=cfg.eval_seed, features=features)
        results[f"{n_way}way{n_shot}shot"] = {"mean": r.mean, "ci95": r.ci95, "episodes": r.episodes}
    lake = evaluate_lake_runs(model, runs) if runs is not None else None
    tail = max(1, len(train.accuracies) // 10)
    return {
        "config": asdict(cfg),
        "accuracy": results,
        "lake_runs": {"error": lake.error, "ci95": lake.ci95, "per_run": lake.per_run} if lake is not None else None,
        "train": {
            "steps": train.steps, "seconds": train.seconds, "episodes_per_s": train.episodes_per_s,
            "step_ms": 1000.0 * train.seconds / max(train.steps, 1),
            "final_train_acc": sum(train.accuracies[-tail:]) / tail,
            "loss_curve": train.losses[:: max(1, len(train.losses) // 100)],
            "peak_memory_mb": train.peak_memory_mb, "memory_kind": train.memory_kind,
        },
        "eval_seconds": time.perf_counter() - t1, "load_seconds": load_s,
        "parameters": sum(p.numel() for p in model.parameters()),
        # learned scalar of the task-adaptive scale (None for ProtoNet and the blog's q/k/v variant)
        "dependency_alpha": float(model.dependency.alpha) if hasattr(getattr(model, "dependency", None), "alpha")
        else None,
        "environment": environment(),
    }


def environment() -> dict:
    return {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ExperimentConfig()
    parser.add_argument("--method", choices=METHODS, default=defaults.method)
    parser.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    for name in ("steps", "n_way", "n_shot", "n_query", "lr_decay_every", "seed", "eval_episodes",
                 "eval_query", "eval_seed", "num_heads", "threads", "max_classes", "num_workers"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "contrastive_weight", "scale_init"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--distance", choices=DISTANCES, default=defaults.distance)
    parser.add_argument("--root", default=None, help="data root holding omniglot/ or mini-imagenet/")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-cache", action="store_true", help="mini-ImageNet: decode the images per episode")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    cfg = ExperimentConfig(**{k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "no_cache")},
                           progress=not args.no_progress, cache=not args.no_cache)
    if args.out:  # before any work: an unwritable output must not cost a training run
        check_writable(args.out, "--out file")
    result = run_experiment(cfg)
    lake_error = result["lake_runs"]["error"] if result["lake_runs"] else None
    # printed first: if the write fails after all, the results are on screen
    print(json.dumps({k: result[k] for k in ("accuracy", "train")} | {"lake_error": lake_error}, indent=1),
          flush=True)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
