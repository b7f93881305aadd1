"""Shared machinery of the prototype-based few-shot classifiers.

One pure call per episode::

    logits = model(support_images, support_labels, query_images)   # (Q, N)

No episode tensor is kept between calls.  For predicting single new images, :meth:`fit` stores
the prototypes of a support set in a registered buffer (it follows ``.to(device)``) and
:meth:`predict` classifies against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import finite, integer_labels

__all__ = ["DISTANCES", "FewShotClassifier", "check_support_labels"]

DISTANCES = ("euclidean", "euclidean_unsquared", "cosine")


def check_support_labels(support_labels: torch.Tensor, n_support: int) -> int:
    """Validates episode labels ``(S,)`` in ``0..N-1`` with every class present; returns N."""
    if support_labels.dim() != 1 or support_labels.numel() != n_support:
        raise ValueError(
            f"support_labels must be 1-D with one label per support image ({n_support}), "
            f"got shape {tuple(support_labels.shape)}"
        )
    if support_labels.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool):
        raise ValueError(f"support_labels must be integers, got dtype {support_labels.dtype}")
    if n_support == 0:
        raise ValueError("the support set is empty")
    lo, hi = int(support_labels.min()), int(support_labels.max())
    if lo < 0:
        raise ValueError(f"support_labels must be in 0..N-1, got label {lo}")
    counts = torch.bincount(support_labels, minlength=hi + 1)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"support_labels must cover 0..{hi} with no gap; classes {missing} have no image")
    return hi + 1


class FewShotClassifier(nn.Module):
    """Base class: backbone -> class prototypes -> (optional refinement) -> distance logits.

    Args:
        backbone: ``nn.Module`` mapping images ``(B, C, H, W)`` to features ``(B, D)``.
        distance: ``"euclidean"`` (negative squared distance, Snell et al. 2017),
            ``"euclidean_unsquared"`` (negative distance, as easyfsl's ``PrototypicalNetworks``
            computes it with ``torch.cdist``) or ``"cosine"``.
        temperature: logits are divided by it (1 for Snell et al.'s Euclidean ProtoNet; cosine
            similarities are usually divided by a small value such as 0.1).
        learn_temperature: make the temperature a learned parameter (stored as its log).

    Subclasses override :meth:`refine_prototypes` (and optionally :meth:`auxiliary_loss`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        distance: str = "euclidean",
        temperature: float = 1.0,
        learn_temperature: bool = False,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        finite("temperature", temperature, low=0.0, low_open=True)
        self.backbone = backbone
        self.distance = distance
        log_t = torch.tensor(float(temperature)).log()
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.register_buffer("_fit_prototypes", None, persistent=False)
        self.register_buffer("_fit_classes", None, persistent=False)

    # ---- one episode ------------------------------------------------------------------------
    def forward(
        self, support_images: torch.Tensor, support_labels: torch.Tensor, query_images: torch.Tensor
    ) -> torch.Tensor:
        """``(S, C, H, W), (S,), (Q, C, H, W) -> logits (Q, N)``."""
        support_feats, query_feats = self.embed_episode(support_images, query_images)
        return self.logits_from_features(support_feats, support_labels, query_feats)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, D)``."""
        return self.backbone(images).flatten(1)

    def embed_episode(
        self, support_images: torch.Tensor, query_images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeds support and query in one backbone pass (BatchNorm sees the whole episode)."""
        if support_images.dim() < 2 or query_images.shape[1:] != support_images.shape[1:]:
            raise ValueError(
                f"support and query images must share their per-image shape, got "
                f"{tuple(support_images.shape)} and {tuple(query_images.shape)}"
            )
        feats = self.embed(torch.cat([support_images, query_images]))  # (S + Q, D)
        return feats[: len(support_images)], feats[len(support_images):]  # (S, D), (Q, D)

    def logits_from_features(
        self, support_feats: torch.Tensor, support_labels: torch.Tensor, query_feats: torch.Tensor
    ) -> torch.Tensor:
        """``(S, D), (S,), (Q, D) -> (Q, N)``."""
        n_way = check_support_labels(support_labels, len(support_feats))
        prototypes = self.refine_prototypes(class_means(support_feats, support_labels, n_way))  # (N, D)
        return self.score(query_feats, prototypes)

    def refine_prototypes(self, prototypes: torch.Tensor) -> torch.Tensor:
        """Hook: ``(N, D) -> (N, D)``; identity for ProtoNet."""
        return prototypes

    def score(self, query_feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """``(Q, D), (N, D) -> logits (Q, N)``, divided by the temperature."""
        if self.distance == "euclidean":
            logits = -torch.cdist(query_feats.float(), prototypes.float()).pow(2)  # (Q, N)
        elif self.distance == "euclidean_unsquared":
            logits = -torch.cdist(query_feats.float(), prototypes.float())  # (Q, N)
        else:
            logits = F.normalize(query_feats.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T
        return logits / self.log_temperature.exp()

    # ---- training ---------------------------------------------------------------------------
    def episode_loss(
        self,
        support_images: torch.Tensor,
        support_labels: torch.Tensor,
        query_images: torch.Tensor,
        query_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy on the query set plus :meth:`auxiliary_loss`; returns ``(loss, logits)``."""
        support_feats, query_feats = self.embed_episode(support_images, query_images)
        return self.features_loss(support_feats, support_labels, query_feats, query_labels)

    def features_loss(
        self,
        support_feats: torch.Tensor,
        support_labels: torch.Tensor,
        query_feats: torch.Tensor,
        query_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`episode_loss` on embedded episodes ``(S, D), (S,), (Q, D), (Q,)`` (frozen-feature training)."""
        logits = self.logits_from_features(support_feats, support_labels, query_feats)  # (Q, N)
        loss = F.cross_entropy(logits, query_labels)
        aux = self.auxiliary_loss(support_feats, support_labels, query_feats, query_labels)
        return (loss if aux is None else loss + aux), logits

    def auxiliary_loss(
        self,
        support_feats: torch.Tensor,
        support_labels: torch.Tensor,
        query_feats: torch.Tensor,
        query_labels: torch.Tensor,
    ) -> torch.Tensor | None:
        """Hook for a method-specific regulariser (None: no extra term)."""
        return None

    # ---- single-image prediction ------------------------------------------------------------
    @torch.no_grad()
    def fit(self, support_images: torch.Tensor, support_labels: torch.Tensor) -> FewShotClassifier:
        """Stores the (refined) prototypes of a support set; labels may be any integers."""
        labels = torch.as_tensor(support_labels)
        if labels.dim() != 1 or len(labels) != len(support_images):
            raise ValueError(
                f"need one label per support image: {len(support_images)} images, labels shape "
                f"{tuple(labels.shape)}"
            )
        labels = integer_labels(labels, "support_labels").to(support_images.device)
        classes, episode_labels = torch.unique(labels, sorted=True, return_inverse=True)
        was_training = self.training
        self.eval()
        try:
            feats = self.embed(support_images)  # (S, D)
            prototypes = self.refine_prototypes(class_means(feats, episode_labels, len(classes)))
        finally:
            self.train(was_training)
        self._fit_prototypes = prototypes  # (N, D)
        self._fit_classes = classes  # (N,)
        return self

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(Q, N)`` of images ``(Q, C, H, W)`` (or one image ``(C, H, W)``) after :meth:`fit`."""
        if self._fit_prototypes is None:
            raise RuntimeError("call fit(support_images, support_labels) before predict")
        single = images.dim() == 3
        was_training = self.training
        self.eval()
        try:
            logits = self.score(self.embed(images.unsqueeze(0) if single else images), self._fit_prototypes)
        finally:
            self.train(was_training)
        return logits[0] if single else logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted labels (the labels given to :meth:`fit`): ``(Q,)``, or a 0-d tensor for one image."""
        logits = self.predict_logits(images)
        return self._fit_classes[logits.argmax(dim=-1)]


def class_means(feats: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Prototypes: mean feature of each class, ``(S, D), (S,) -> (N, D)``."""
    sums = feats.new_zeros(n_way, feats.shape[1]).index_add_(0, labels, feats)  # (N, D)
    counts = torch.bincount(labels, minlength=n_way).clamp_min(1).to(feats.dtype)  # (N,)
    return sums / counts.unsqueeze(1)
