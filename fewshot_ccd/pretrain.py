"""Backbone pre-training on the base classes: cross-entropy over all of them with a linear head
(FEAT's first stage, Ye et al. 2020), with augmentation, few-shot validation, model selection,
atomic checkpoints and exact resume.

Batch ``s`` of epoch ``e`` is the ``s``-th slice of a permutation drawn from ``(seed, e)`` and is
augmented from a generator seeded by ``(seed, global step)``, so a run stopped and resumed at any
checkpoint takes exactly the steps an uninterrupted run takes.  Every ``val_every`` steps (and at
the end) the backbone's features of the validation classes are scored by ProtoNet on seeded
episodes; the best backbone is kept in ``best.pt`` and returned by :func:`load_pretrained`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import dataset_fingerprint, load_checkpoint, save_checkpoint
from .data.augment import AugmentConfig, augment_batch
from .data.sampler import _MIX

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "load_pretrained", "dataset_fingerprint",
           "embed_images", "first_per_class", "BEST_NAME", "LAST_NAME"]

LAST_NAME, BEST_NAME = "pretrain_last.pt", "pretrain_best.pt"
_RUN_ONLY = ("checkpoint_dir", "resume", "stop_after", "progress")  # may change between resumed calls


@dataclass
class PretrainConfig:
    """Pre-training recipe; the defaults are FEAT's (SGD 0.1, momentum 0.9, weight decay 5e-4,
    batch 128) with a cosine schedule over ``epochs`` scaled to the budget."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # images per step (the last incomplete batch of an epoch is dropped)
    lr: float = 0.1  # SGD learning rate at the start of the cosine schedule
    momentum: float = 0.9  # SGD momentum (Nesterov)
    weight_decay: float = 5e-4  # SGD weight decay
    min_lr_ratio: float = 0.0  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 0  # linear learning-rate warm-up from lr / warmup_steps (0: none)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # random padded crop + flip
    seed: int = 0  # head initialisation, shuffling and augmentation
    val_every: int = 0  # steps between validations (0: once per epoch)
    val_way: int = 5  # validation episodes: n_way, n_shot, queries, count, seed
    val_shot: int = 1
    val_query: int = 15
    val_episodes: int = 500
    val_seed: int = 0
    val_per_class: int | None = 200  # validate on the first this-many images of each class (None: all)
    channels_last: bool = True  # NHWC convolutions (faster on CPU)
    checkpoint_dir: str | None = None  # folder for pretrain_last.pt / pretrain_best.pt (None: none)
    checkpoint_every: int = 100  # steps between checkpoints (and at every validation)
    resume: bool = True  # continue from checkpoint_dir/pretrain_last.pt when it exists
    stop_after: int | None = None  # stop this call after this many steps in total (resumable)
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        for name in ("epochs", "batch_size", "checkpoint_every", "val_way", "val_shot", "val_episodes"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.val_every < 0 or self.val_query < 1:
            raise ValueError(f"val_every must be >= 0 and val_query >= 1, got {self.val_every}, {self.val_query}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0 or not self.weight_decay >= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"need 0 <= momentum < 1, weight_decay >= 0, 0 <= min_lr_ratio <= 1; got "
                             f"{self.momentum}, {self.weight_decay}, {self.min_lr_ratio}")
        if self.val_per_class is not None and self.val_per_class < self.val_shot + self.val_query:
            raise ValueError(f"val_per_class={self.val_per_class} < val_shot + val_query")


@dataclass
class PretrainResult:
    steps: int  # optimiser steps done in total (including resumed ones)
    total_steps: int  # steps of the whole schedule
    losses: list[float] = field(default_factory=list)  # training loss per step
    accuracies: list[float] = field(default_factory=list)  # training batch accuracy (%) per step
    val: list[dict] = field(default_factory=list)  # {"step", "mean", "ci95"} per validation
    best_step: int = -1  # step of the best validation accuracy (-1: never validated)
    best_val: float = float("nan")  # that accuracy (%)
    seconds: float = 0.0  # wall time of this call
    step_ms: float = 0.0  # mean training step time in this call (validation excluded)
    train_seconds: float = 0.0  # training-step time summed over every call of the run (resumes included)


def _load(dataset, indices: torch.Tensor) -> torch.Tensor:
    if hasattr(dataset, "load_batch"):
        return dataset.load_batch(indices)
    return torch.stack([dataset[i][0] for i in indices.tolist()])


@torch.no_grad()
def embed_images(backbone: nn.Module, dataset, *, indices: torch.Tensor | None = None, batch_size: int = 256,
                 channels_last: bool = False, progress: bool = False) -> torch.Tensor:
    """Eval-mode features ``(M, D)`` of ``dataset`` (all items, or ``indices``), in batches."""
    from tqdm.auto import tqdm

    idx = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices).long()
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for chunk in tqdm(idx.split(batch_size), disable=not progress, desc="embed", dynamic_ncols=True):
            images = _load(dataset, chunk).to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            out.append(backbone(images).flatten(1).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def first_per_class(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """Indices of the first ``per_class`` items of each class, class by class (None: every item)."""
    labels = torch.as_tensor(labels)
    if per_class is None:
        return torch.arange(len(labels))
    return torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in labels.unique().tolist()])


def _validate(backbone: nn.Module, val_set, config: PretrainConfig) -> dict:
    from .evaluate import evaluate_features
    from .methods import ProtoNet

    idx = first_per_class(val_set.labels, config.val_per_class)
    feats = embed_images(backbone, val_set, indices=idx, channels_last=config.channels_last)  # (M, D)
    r = evaluate_features(ProtoNet(nn.Identity()), feats, torch.as_tensor(val_set.labels)[idx],
                          n_way=config.val_way, n_shot=config.val_shot, n_query=config.val_query,
                          episodes=config.val_episodes, seed=config.val_seed)
    return {"mean": r.mean, "ci95": r.ci95}


def _lr_factor(step: int, total: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine from 1 to ``min_lr_ratio`` over the whole schedule."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / total))
    return warm * cosine


def _run_config(config: PretrainConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in _RUN_ONLY}


def pretrain(backbone: nn.Module, train_set, config: PretrainConfig, *, val_set=None,
             feature_dim: int | None = None) -> PretrainResult:
    """Trains ``backbone`` in place with a linear head over ``train_set.num_classes`` classes.

    Args:
        backbone: ``(B, C, H, W) -> (B, D)``.
        train_set: items ``(image, label)`` with ``labels`` and ``num_classes`` (a cached
            :class:`~fewshot_ccd.data.MiniImageNet` reads whole batches from its memory map).
        config: a :class:`PretrainConfig`.
        val_set: validation classes for model selection (None: no validation, the last backbone is kept).
        feature_dim: D (None: measured by one forward).

    Returns a :class:`PretrainResult`; with ``val_set`` the backbone is left at the *last* step
    (load ``best.pt`` with :func:`load_pretrained` for the selected one).
    """
    from tqdm.auto import tqdm

    from .backbones import feature_dim as measure_dim

    labels = torch.as_tensor(train_set.labels).long()
    num_classes = int(getattr(train_set, "num_classes", int(labels.max()) + 1))
    steps_per_epoch = len(labels) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={config.batch_size} is larger than the data set ({len(labels)} images)")
    total = steps_per_epoch * config.epochs
    end = total if config.stop_after is None else min(total, config.stop_after)
    if feature_dim is None:
        feature_dim = measure_dim(backbone, tuple(_load(train_set, torch.tensor([0])).shape[1:]))
    head = nn.Linear(feature_dim, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head.reset_parameters()
    net = nn.Sequential(backbone, nn.Flatten(1), head)
    if config.channels_last:
        net.to(memory_format=torch.channels_last)
    device = next(backbone.parameters()).device
    head.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, config))
    fingerprint = dataset_fingerprint(train_set)
    result = PretrainResult(steps=0, total_steps=total)
    folder = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if folder is not None and config.resume and (folder / LAST_NAME).exists():
        state = load_checkpoint(folder / LAST_NAME)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"checkpoint {folder / LAST_NAME} was written for other data (fingerprint "
                             f"{state['fingerprint']}, this data set {fingerprint})")
        if state["config"] != _run_config(config):
            diff = sorted(k for k in state["config"] if state["config"][k] != _run_config(config).get(k))
            raise ValueError(f"checkpoint {folder / LAST_NAME} was written with another config (differs in {diff})")
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        result = PretrainResult(**{k: state["result"][k] for k in ("steps", "total_steps", "losses", "accuracies",
                                                                   "val", "best_step", "best_val")},
                                train_seconds=state["result"].get("train_seconds", 0.0))

    def save(name: str, payload: dict) -> None:
        if folder is not None:
            save_checkpoint(folder / name, payload | {"fingerprint": fingerprint, "config": _run_config(config)})

    def checkpoint() -> None:
        save(LAST_NAME, {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                         "result": asdict(result)})

    def validate() -> None:
        if val_set is None:
            return
        v = _validate(backbone, val_set, config) | {"step": result.steps}
        result.val.append(v)
        if not v["mean"] <= result.best_val:  # first validation, or better (NaN-safe)
            result.best_step, result.best_val = result.steps, v["mean"]
            save(BEST_NAME, {"backbone": backbone.state_dict(), "step": result.steps, "val": v})

    every = config.val_every or steps_per_epoch
    net.train()
    bar = tqdm(total=end, initial=result.steps, disable=not config.progress, desc="pretrain", dynamic_ncols=True)
    t0, train_s, start = time.perf_counter(), 0.0, result.steps
    order, order_epoch = None, -1
    for step in range(result.steps, end):
        t_step = time.perf_counter()
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            g = torch.Generator().manual_seed((config.seed * _MIX + epoch) % (2**63))
            order, order_epoch = torch.randperm(len(labels), generator=g), epoch
        batch = order[pos * config.batch_size:(pos + 1) * config.batch_size]
        images = _load(train_set, batch)
        g = torch.Generator().manual_seed((config.seed * _MIX + 1_000_003 * (step + 1)) % (2**63))
        images = augment_batch(images, config.augment, g).to(device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = net(images)
        target = labels[batch].to(device)
        loss = F.cross_entropy(logits, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pre-training loss is {loss.item()} at step {step}; lower lr ({config.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        result.losses.append(loss.item())
        result.accuracies.append(100.0 * (logits.argmax(-1) == target).float().mean().item())
        result.steps = step + 1
        train_s += time.perf_counter() - t_step
        result.train_seconds += time.perf_counter() - t_step
        bar.update(1)
        if result.steps % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", best_val=f"{result.best_val:.2f}")
        validated = result.steps % every == 0 or result.steps == total
        if validated:
            validate()
        if validated or result.steps % config.checkpoint_every == 0 or result.steps == end:
            checkpoint()
    bar.close()
    result.seconds = time.perf_counter() - t0
    result.step_ms = 1000.0 * train_s / max(result.steps - start, 1)
    return result


def load_pretrained(backbone: nn.Module, checkpoint_dir: str | os.PathLike, *, which: str = "best") -> dict:
    """Loads the ``"best"`` (validation-selected) or ``"last"`` pre-trained backbone into ``backbone``;
    returns the checkpoint's metadata (step, validation accuracy, data fingerprint, config)."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    path = Path(checkpoint_dir) / (BEST_NAME if which == "best" else LAST_NAME)
    if not path.exists():
        raise FileNotFoundError(f"no pre-trained checkpoint {path}")
    state = load_checkpoint(path)
    if which == "best":
        backbone.load_state_dict(state["backbone"])
    else:
        backbone.load_state_dict({k[2:]: v for k, v in state["model"].items() if k.startswith("0.")})
    return {k: v for k, v in state.items() if k not in ("backbone", "model", "optimizer", "scheduler", "torch_rng")}
