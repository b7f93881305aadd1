"""Evaluation on a fixed, seeded list of episodes (the same for every method), mean ± 95% CI,
and Lake et al.'s 20 official Omniglot one-shot runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import positive_int
from .data.omniglot import LakeRun
from .data.sampler import EpisodeSampler, split_episode
from .methods.base import FewShotClassifier

__all__ = ["EvalResult", "LakeResult", "mean_ci95", "embed_dataset", "evaluate", "evaluate_features",
           "evaluate_lake_runs"]


def mean_ci95(values: list[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and the 95% confidence half-width ``1.96 * std / sqrt(n)`` (sample std, ddof = 1)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("no values to average")
    if v.numel() == 1:
        return float(v[0]), 0.0
    return float(v.mean()), 1.96 * float(v.std(unbiased=True)) / math.sqrt(v.numel())


@dataclass
class EvalResult:
    """Accuracy in percent over ``episodes`` episodes: ``mean ± ci95``."""

    mean: float
    ci95: float
    episodes: int
    per_episode: list[float] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.ci95:.2f}"


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def embed_dataset(
    model: FewShotClassifier, dataset: torch.utils.data.Dataset, *, batch_size: int = 256, num_workers: int = 0
) -> torch.Tensor:
    """Features ``(len(dataset), D)`` of every item, in eval mode (on the model's device)."""
    device = _device_of(model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model.embed(images.to(device)) for images, _ in loader])  # (M, D)
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: FewShotClassifier,
    dataset: torch.utils.data.Dataset,
    *,
    n_way: int,
    n_shot: int,
    n_query: int = 15,
    episodes: int = 1000,
    seed: int = 0,
    features: torch.Tensor | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Accuracy of ``model`` on ``episodes`` seeded episodes of ``dataset`` (needs ``dataset.labels``).

    The episodes depend only on (labels, n_way, n_shot, n_query, episodes, seed), so every method
    evaluated with the same arguments sees exactly the same episodes.  In eval mode the backbone
    embeds each image independently, so the images are embedded once (or pass ``features`` from
    :func:`embed_dataset` to share them between settings) and episodes are scored on features;
    this gives the same logits as ``model(support, labels, query)`` per episode, much faster.
    """
    positive_int("episodes", episodes)  # before embedding the whole data set
    if features is None:
        features = embed_dataset(model, dataset, num_workers=num_workers)  # (M, D)
    if len(features) != len(dataset):
        raise ValueError(f"features has {len(features)} rows but the dataset has {len(dataset)} items")
    return evaluate_features(model, features, dataset.labels, n_way=n_way, n_shot=n_shot, n_query=n_query,
                             episodes=episodes, seed=seed, progress=progress)


@torch.no_grad()
def evaluate_features(
    model: FewShotClassifier,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_way: int,
    n_shot: int,
    n_query: int = 15,
    episodes: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> EvalResult:
    """:func:`evaluate` on precomputed features ``(M, D)`` with their class labels ``(M,)``: the episodes
    depend only on (labels, n_way, n_shot, n_query, episodes, seed)."""
    from tqdm.auto import tqdm

    positive_int("episodes", episodes)
    if features.dim() != 2 or len(features) != len(labels):
        raise ValueError(f"features must be (M, D) with one label each, got {tuple(features.shape)} and "
                         f"{len(labels)} labels")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    sampler = EpisodeSampler(labels, n_way=n_way, n_shot=n_shot, n_query=n_query, episodes=episodes, seed=seed)
    was_training = model.training
    model.eval()
    accs = []
    try:
        for indices in tqdm(sampler, disable=not progress, desc=f"eval {n_way}w{n_shot}s"):
            feats = features[torch.tensor(indices, device=features.device)]  # (N*(K+Kq), D)
            support, s_labels, query, q_labels = split_episode(feats, n_way, n_shot, n_query)
            logits = model.logits_from_features(support, s_labels, query)  # (N*Kq, N)
            accs.append(100.0 * (logits.argmax(-1) == q_labels).float().mean().item())
    finally:
        model.train(was_training)
    mean, ci = mean_ci95(accs)
    return EvalResult(mean=mean, ci95=ci, episodes=len(accs), per_episode=accs)


@dataclass
class LakeResult:
    """Error rate in percent over Lake's runs (400 trials for the 20 runs); ``ci95`` across runs."""

    error: float
    ci95: float
    per_run: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.error:.2f}% ± {self.ci95:.2f}"


@torch.no_grad()
def evaluate_lake_runs(model: FewShotClassifier, runs: list[LakeRun]) -> LakeResult:
    """Error of ``model`` on Lake's 20-way one-shot runs: one support image per class, 20 tests."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    errors = []
    try:
        for run in runs:
            labels = torch.arange(len(run.train_images), device=device)
            logits = model(run.train_images.to(device), labels, run.test_images.to(device))  # (20, 20)
            errors.append(100.0 * (logits.argmax(-1).cpu() != run.test_labels).float().mean().item())
    finally:
        model.train(was_training)
    mean, ci = mean_ci95(errors)
    return LakeResult(error=mean, ci95=ci, per_run=errors)
