"""Episodic training on frozen, cached features: the backbone is embedded once (eval mode), then
only the method's own parameters (CCD's dependency module, a learned temperature) are trained on
episodes of feature rows.  Training the dependency module then takes minutes instead of hours,
which is what the design search of the module needs.

The model is any :class:`~fewshot_ccd.methods.FewShotClassifier`; its backbone is ignored here
(build it on ``nn.Identity()``, see :func:`on_features`).  Episodes come from the same
:class:`~fewshot_ccd.data.EpisodeSampler` and layout as image training, so step ``s`` of a run uses
the same class / item draw as step ``s`` of an image run with the same seed.

Feature files: :func:`cached_features` stores ``(M, D)`` float32 features with an ``.npy`` next to
a JSON of what produced them (backbone checkpoint, data fingerprint), written atomically.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._atomic import atomic_path, atomic_write_text
from .data.sampler import EpisodeSampler, split_episode
from .methods.base import FewShotClassifier
from .train import TrainConfig

__all__ = ["FeatureTrainResult", "meta_train_features", "cached_features", "on_features"]


@dataclass
class FeatureTrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # loss per step
    accuracies: list[float] = field(default_factory=list)  # training query accuracy (%) per step
    seconds: float = 0.0
    step_ms: float = 0.0


def on_features(model: FewShotClassifier) -> FewShotClassifier:
    """``model`` with its backbone replaced by ``nn.Identity()`` (it then takes features as inputs)."""
    model.backbone = nn.Identity()
    return model


def meta_train_features(
    model: FewShotClassifier, features: torch.Tensor, labels: torch.Tensor, config: TrainConfig
) -> FeatureTrainResult:
    """Trains the parameters of ``model`` (not its backbone) on episodes of ``features (M, D)``.

    Uses ``config``'s episode layout (``n_way``, ``n_shot``, ``n_query``), ``steps``, ``meta_batch``,
    Adam ``lr`` / ``weight_decay``, the step decay, ``grad_clip``, ``seed`` and ``progress``; the
    image-only fields (checkpoints, workers, precision, channels_last) do not apply: a run takes
    minutes and is simply repeated.  Returns the per-step losses and accuracies.
    """
    from tqdm.auto import tqdm

    if config.checkpoint_dir is not None:
        raise ValueError("meta_train_features keeps no checkpoints (a run takes minutes); set checkpoint_dir=None")
    labels = torch.as_tensor(labels).long()
    if features.dim() != 2 or len(features) != len(labels):
        raise ValueError(f"features must be (M, D) with one label per row, got {tuple(features.shape)} and "
                         f"{len(labels)} labels")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    params = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters outside its backbone to train on features")
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay)
    sampler = EpisodeSampler(labels, n_way=config.n_way, n_shot=config.n_shot, n_query=config.n_query,
                             episodes=config.steps * config.meta_batch, seed=config.seed)
    result = FeatureTrainResult(steps=0)
    model.train()
    t0 = time.perf_counter()
    episodes = iter(sampler)
    for _ in tqdm(range(config.steps), disable=not config.progress, desc="train on features", dynamic_ncols=True):
        step_loss, step_acc = 0.0, 0.0
        for _m in range(config.meta_batch):
            rows = features[torch.tensor(next(episodes), device=features.device)]  # (N*(K+Kq), D)
            support, s_labels, query, q_labels = split_episode(rows, config.n_way, config.n_shot, config.n_query)
            loss, logits = model.features_loss(support, s_labels, query, q_labels)
            (loss / config.meta_batch).backward()
            step_loss += loss.item() / config.meta_batch
            step_acc += 100.0 * (logits.argmax(-1) == q_labels).float().mean().item() / config.meta_batch
        if not np.isfinite(step_loss):
            raise FloatingPointError(f"loss is {step_loss} at step {result.steps}; lower lr ({config.lr})")
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(step_loss)
        result.accuracies.append(step_acc)
        result.steps += 1
    result.seconds = time.perf_counter() - t0
    result.step_ms = 1000.0 * result.seconds / max(result.steps, 1)
    model.eval()
    return result


def cached_features(path: str | os.PathLike, compute, *, meta: dict) -> torch.Tensor:
    """Features stored at ``path`` (``.npy``) when its ``.json`` sidecar equals ``meta``; else
    ``compute()`` -> ``(M, D)`` tensor, saved atomically with ``meta`` and returned."""
    path = Path(path)
    side = path.with_suffix(".json")
    if path.exists() and side.exists() and json.loads(side.read_text()) == json.loads(json.dumps(meta)):
        return torch.from_numpy(np.load(path))
    feats = compute()
    if not torch.isfinite(feats).all():
        raise ValueError(f"computed features for {path} contain NaN or infinite values")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, feats.float().numpy())
    atomic_write_text(side, json.dumps(meta, indent=1))
    return feats.float()
