"""mini-ImageNet, stage by stage, as one resumable run: decode-once cache -> backbone pre-training
on the 64 train classes -> frozen features -> ProtoNet and CCD variants trained on the features ->
the same seeded evaluation episodes for every model -> interleaved end-to-end step times.

Every stage writes its output atomically under ``workdir`` and is skipped when rerun, so an
interrupted run continues where it stopped (pre-training resumes from its last checkpoint).

Model selection uses only the ``val`` classes (the pre-trained backbone by ProtoNet accuracy on val
episodes, the CCD variant by val episodes of another seed than the reported ones); the reported
episodes are drawn on ``val`` and, when the folder has ``test.csv``, on ``test``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from ._atomic import atomic_write_text
from ._checks import finite
from .data.folders import MiniImageNet
from .data.sampler import EpisodeSampler, split_episode
from .dependency import ClassDependencyModule, DependencyConfig
from .evaluate import evaluate_features
from .features import cached_features, meta_train_features, on_features
from .methods import CCDNet, FewShotClassifier, ProtoNet
from .methods.base import DISTANCES
from .models import build_backbone
from .pretrain import (
    PretrainConfig,
    dataset_fingerprint,
    embed_images,
    first_per_class,
    load_pretrained,
    pretrain,
)
from .train import TrainConfig

__all__ = ["Variant", "PipelineConfig", "run_pipeline", "build_variant", "time_steps"]

_DEP_FIELDS = {f.name for f in fields(DependencyConfig)} - {"dim", "bias"}


@dataclass
class Variant:
    """One CCD design for the frozen-feature stage: dependency-module fields, loss and episodes."""

    name: str
    num_heads: int = 8
    norm: str = "pre"
    residual: bool = True
    out_proj: bool = True
    adaptive_scale: bool = True
    scale_init: float = 1e-2
    dropout: float = 0.0
    contrastive_weight: float = 0.0  # FEAT's regulariser
    contrastive_temperature: float = 16.0  # FEAT's temperature2 for its ConvNet
    temperature: float = 64.0  # logits / temperature (FEAT's ConvNet: 64); learned from this value
    distance: str = "euclidean"  # the classifier's distance ("cosine": CCD on top of a cosine ProtoNet)
    train_way: int = 5  # ways of the training episodes (20: FEAT's / Snell's many-way training)
    train_steps: int | None = None  # training episodes (None: the pipeline's train_steps)
    lr: float | None = None  # Adam learning rate (None: the pipeline's lr)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"variant name must be a non-empty identifier, got {self.name!r}")
        if self.train_way < 2:
            raise ValueError(f"train_way must be >= 2, got {self.train_way}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.train_steps is not None and self.train_steps < 1:
            raise ValueError(f"train_steps must be >= 1 or None, got {self.train_steps}")
        if self.lr is not None:
            finite("lr", self.lr, low=0.0, low_open=True)
        self.dependency(self.num_heads if self.num_heads >= 1 else 1)  # validates the module fields

    def dependency(self, dim: int) -> DependencyConfig:
        return DependencyConfig(dim=dim, **{k: getattr(self, k) for k in _DEP_FIELDS})


DEFAULT_VARIANTS = (
    Variant("pre8"),  # the library's default module
    Variant("pre1", num_heads=1),
    Variant("post1", num_heads=1, norm="post", adaptive_scale=False),  # FEAT's layout
    Variant("pre8_noscale", adaptive_scale=False),
    Variant("pre8_scale1", scale_init=1.0),  # the adaptive scale starting at full strength
    Variant("pre8_20way", train_way=20),
    Variant("pre8_contrastive", contrastive_weight=1.0),  # FEAT's regulariser (weight 1: its 1-shot ConvNet)
    Variant("post1_long", num_heads=1, norm="post", adaptive_scale=False, train_steps=2000, lr=3e-4),
    # on top of a cosine ProtoNet (L2-normalised prototypes and queries; temperature 0.1, learned)
    Variant("post1_cos", num_heads=1, norm="post", adaptive_scale=False, distance="cosine", temperature=0.1),
    Variant("post1_long_cos", num_heads=1, norm="post", adaptive_scale=False, distance="cosine", temperature=0.1,
            train_steps=2000, lr=3e-4),
    Variant("post1_cos_4k", num_heads=1, norm="post", adaptive_scale=False, distance="cosine", temperature=0.1,
            train_steps=4000, lr=3e-4),
)


@dataclass
class PipelineConfig:
    """The whole run; the defaults are the full CPU budget (see benchmarks/README.md)."""

    backbone: str = "conv4"
    image_size: int = 84  # images are resized to this (84: mini-ImageNet's own size)
    seed: int = 0  # backbone initialisation and training episodes
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(
        epochs=8, batch_size=64, lr=0.05, warmup_steps=100, val_every=600, val_per_class=100,
        val_episodes=500, checkpoint_every=50))
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS  # searched on val for each setting, best one kept
    feature_train_per_class: int | None = 200  # train-class images embedded per class (None: all)
    train_steps: int = 400  # frozen-feature training episodes per variant and setting
    train_query: int = 15  # queries per class in training episodes
    lr: float = 1e-3  # Adam on the features
    settings: tuple[tuple[int, int], ...] = ((5, 1), (5, 5))  # evaluated (n_way, n_shot)
    select_episodes: int = 500  # val episodes for choosing the variant (seed select_seed)
    select_seed: int = 1
    eval_episodes: int = 2000  # reported episodes per setting and split (seed eval_seed)
    eval_query: int = 15
    eval_seed: int = 2024
    timing_steps: int = 20  # interleaved end-to-end steps per model for the step-time comparison
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.pretrain, dict):
            self.pretrain = PretrainConfig(**self.pretrain)
        self.variants = tuple(Variant(**v) if isinstance(v, dict) else v for v in self.variants)
        if not self.variants:
            raise ValueError("give at least one CCD variant")
        if len({v.name for v in self.variants}) != len(self.variants):
            raise ValueError(f"variant names must be unique, got {[v.name for v in self.variants]}")
        for name in ("train_steps", "train_query", "select_episodes", "eval_episodes", "eval_query"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.feature_train_per_class is not None and self.feature_train_per_class < 2:
            raise ValueError(f"feature_train_per_class must be >= 2 or None, got {self.feature_train_per_class}")
        if self.timing_steps < 0:
            raise ValueError(f"timing_steps must be >= 0, got {self.timing_steps}")


def build_variant(v: Variant, dim: int, *, seed: int = 0, backbone: nn.Module | None = None) -> CCDNet:
    """CCD of variant ``v`` on ``backbone`` (None: on features), weights from ``seed`` (forked RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        module = ClassDependencyModule(config=v.dependency(dim))
    return CCDNet(backbone if backbone is not None else nn.Identity(), module, distance=v.distance,
                  temperature=v.temperature,
                  learn_temperature=True, contrastive_weight=v.contrastive_weight,
                  contrastive_temperature=v.contrastive_temperature)


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1))


def _stage(path: Path, key: dict, compute) -> dict:
    """A resumable stage: the stored result when it was computed for ``key``, else ``compute()``."""
    key = json.loads(json.dumps(key))
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    result = compute()
    _write_json(path, {"key": key, "result": result})
    return result


def time_steps(models: dict[str, FewShotClassifier], dataset, *, n_way: int = 5, n_shot: int = 1,
               n_query: int = 15, steps: int = 20, seed: int = 0, lr: float = 1e-3) -> dict:
    """End-to-end training steps (forward, backward, Adam) of each model on the same episodes,
    interleaved model by model within each step (the order alternating) so that all see the same machine
    load; returns
    ``{name: {"median_ms", "mean_ms"}}`` (the first step of each, warm-up, is not counted)."""
    sampler = EpisodeSampler(dataset.labels, n_way=n_way, n_shot=n_shot, n_query=n_query, episodes=steps + 1,
                             seed=seed)
    opts = {m: torch.optim.Adam(model.parameters(), lr=lr) for m, model in models.items()}
    times: dict[str, list[float]] = {m: [] for m in models}
    for i, idx in enumerate(sampler):
        support, s_labels, query, q_labels = split_episode(dataset.load_batch(idx), n_way, n_shot, n_query)
        names = list(models) if i % 2 == 0 else list(models)[::-1]  # alternate who goes first
        for m in names:
            model = models[m]
            model.train()
            t = time.perf_counter()
            loss, _ = model.episode_loss(support, s_labels, query, q_labels)
            opts[m].zero_grad(set_to_none=True)
            loss.backward()
            opts[m].step()
            if i:
                times[m].append(1000.0 * (time.perf_counter() - t))
    out = {}
    for m, ts in times.items():
        ts = sorted(ts) or [float("nan")]
        out[m] = {"median_ms": ts[len(ts) // 2], "mean_ms": sum(ts) / len(ts), "steps": len(ts)}
    return out


def _splits(root: Path) -> list[str]:
    return ["val"] + (["test"] if (root / "test.csv").exists() or (root / "split" / "test.csv").exists() else [])


def run_pipeline(root: str | os.PathLike, workdir: str | os.PathLike, config: PipelineConfig,
                 *, cache: bool | str | os.PathLike = True) -> dict:
    """Runs (or resumes) every stage; returns the results dict (also in ``workdir/results.json``)."""
    root, workdir = Path(root), Path(workdir)
    t_all = time.perf_counter()
    sets = {s: MiniImageNet(root, split=s, image_size=config.image_size, cache=cache, progress=config.progress)
            for s in ["train", *_splits(root)]}
    train_set, val_set = sets["train"], sets["val"]
    backbone = build_backbone(config.backbone, in_channels=3, seed=config.seed)
    pre_cfg = replace(config.pretrain, checkpoint_dir=str(workdir / "pretrain"), progress=config.progress)
    t0 = time.perf_counter()
    pre = pretrain(backbone, train_set, pre_cfg, val_set=val_set)
    pre_s = time.perf_counter() - t0
    meta = load_pretrained(backbone, workdir / "pretrain", which="best")

    feats, labels = {}, {}
    for split, ds in sets.items():
        idx = first_per_class(ds.labels, config.feature_train_per_class if split == "train" else None)
        key = {"split": split, "data": dataset_fingerprint(ds), "backbone_step": meta["step"], "rows": len(idx),
               "pretrain": meta["config"], "fingerprint": meta["fingerprint"]}
        feats[split] = cached_features(
            workdir / "features" / f"{split}.npy", meta=key,
            compute=lambda ds=ds, idx=idx: embed_images(backbone, ds, indices=idx, progress=config.progress))
        labels[split] = torch.as_tensor(ds.labels)[idx]
    dim = feats["train"].shape[1]

    def train_variant(v: Variant, n_shot: int) -> CCDNet:
        model = build_variant(v, dim, seed=config.seed)
        steps = v.train_steps or config.train_steps
        meta_train_features(model, feats["train"], labels["train"], TrainConfig(
            n_way=v.train_way, n_shot=n_shot, n_query=config.train_query, steps=steps, lr=v.lr or config.lr,
            lr_decay_every=max(1, steps // 2), seed=config.seed, progress=config.progress))
        return model

    def score(model: FewShotClassifier, split: str, n_way: int, n_shot: int, episodes: int, seed: int) -> dict:
        r = evaluate_features(model, feats[split], labels[split], n_way=n_way, n_shot=n_shot,
                              n_query=config.eval_query, episodes=episodes, seed=seed)
        return {"mean": r.mean, "ci95": r.ci95, "episodes": r.episodes, "per_episode": r.per_episode}

    base_key = {"backbone_step": meta["step"], "fingerprint": meta["fingerprint"], "train_steps": config.train_steps,
                "train_query": config.train_query, "lr": config.lr, "seed": config.seed,
                "train_rows": len(labels["train"]), "image_size": config.image_size}
    protonet = on_features(ProtoNet(nn.Identity()))
    # the practitioner's other baseline on pre-trained features: cosine prototypes (SimpleShot-style L2 norm)
    protonet_cosine = on_features(ProtoNet(nn.Identity(), distance="cosine"))
    search: dict = {}
    search_protonet: dict = {}
    best: dict[str, Variant] = {}
    for way, shot in config.settings:  # the design search, per setting: one training per variant
        setting = f"{way}way{shot}shot"
        search[setting] = {}
        for v in config.variants:
            def run_search(v=v, way=way, shot=shot) -> dict:
                t = time.perf_counter()
                model = train_variant(v, shot)
                r = score(model, "val", way, shot, config.select_episodes, config.select_seed)
                return {"mean": r["mean"], "ci95": r["ci95"], "train_s": time.perf_counter() - t,
                        "alpha": model.dependency.alpha.item() if hasattr(model.dependency, "alpha") else None}
            search[setting][v.name] = _stage(
                workdir / "search" / f"{v.name}_{way}w{shot}s.json",
                base_key | {"variant": asdict(v), "select": [config.select_episodes, config.select_seed]}, run_search)
        for name, baseline in (("euclidean", protonet), ("cosine", protonet_cosine)):
            r = score(baseline, "val", way, shot, config.select_episodes, config.select_seed)
            search_protonet.setdefault(setting, {})[name] = {"mean": r["mean"], "ci95": r["ci95"]}
        best[setting] = max(config.variants, key=lambda v, s=setting: search[s][v.name]["mean"])

    accuracy: dict = {}
    trained: dict[str, CCDNet] = {}  # the chosen variant of each setting, trained once
    for split in feats:
        if split == "train":
            continue
        for n_way, n_shot in config.settings:
            name = f"{n_way}way{n_shot}shot"

            def run_eval(n_way=n_way, n_shot=n_shot, split=split, name=name) -> dict:
                if name not in trained:
                    trained[name] = train_variant(best[name], n_shot)
                models = {"protonet": protonet, "protonet_cosine": protonet_cosine, "ccd": trained[name]}
                return {m: score(model, split, n_way, n_shot, config.eval_episodes, config.eval_seed)
                        for m, model in models.items()}
            accuracy.setdefault(split, {})[name] = _stage(
                workdir / "eval" / f"{split}_{name}.json",
                base_key | {"variant": asdict(best[name]), "eval": [config.eval_episodes, config.eval_seed,
                                                                   config.eval_query]}, run_eval)

    first = best[f"{config.settings[0][0]}way{config.settings[0][1]}shot"]
    timing = None
    if config.timing_steps:
        def run_timing() -> dict:
            models = {"protonet": ProtoNet(copy.deepcopy(backbone)),
                      "ccd": build_variant(first, dim, seed=config.seed, backbone=copy.deepcopy(backbone))}
            return time_steps(models, train_set, steps=config.timing_steps, seed=config.seed)
        timing = _stage(workdir / "timing.json", base_key | {"variant": asdict(first), "steps": config.timing_steps},
                        run_timing)
    results = {
        "config": asdict(config), "pretrain": {
            "steps": pre.steps, "total_steps": pre.total_steps, "val": pre.val, "best_step": pre.best_step,
            "best_val": pre.best_val, "step_ms_this_call": pre.step_ms, "seconds_this_call": pre_s,
            "train_seconds_all_calls": pre.train_seconds,
            "loss_curve": pre.losses[:: max(1, len(pre.losses) // 100)],
            "train_acc_last_100": sum(pre.accuracies[-100:]) / max(1, len(pre.accuracies[-100:]))},
        "feature_dim": dim, "search": search, "search_protonet": search_protonet,
        "best_variant": {k: asdict(v) for k, v in best.items()}, "accuracy": accuracy, "timing": timing,
        "seconds_this_call": time.perf_counter() - t_all,
    }
    _write_json(workdir / "results.json", results)
    return results
