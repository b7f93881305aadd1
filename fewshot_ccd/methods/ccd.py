"""CCD: prototypes refined by attention across the classes of the episode (+ FEAT's regulariser)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import finite
from ..dependency import ClassDependencyModule
from .base import FewShotClassifier, check_support_labels

__all__ = ["CCDNet"]


class CCDNet(FewShotClassifier):
    """Backbone + :class:`ClassDependencyModule` on the prototypes + prototype classifier.

    The conditional-class-dependency method the blog post reproduces; the closest published anchor
    is FEAT (Ye, Hu, Zhan, Sha, "Few-Shot Learning via Embedding Adaptation with Set-to-Set
    Functions", CVPR 2020), whose optional contrastive regulariser is available here.

    Args:
        backbone: ``nn.Module`` mapping images ``(B, C, H, W)`` to features ``(B, D)``.
        dependency: a :class:`ClassDependencyModule` of dimension D (refines prototypes ``(N, D)``).
        distance: ``"euclidean"`` (squared), ``"euclidean_unsquared"`` or ``"cosine"``.
        temperature: logits are divided by it.
        learn_temperature: learn the temperature.
        contrastive_weight: weight of FEAT's regulariser (0 disables it).  Each class's support
            and query embeddings ``(K + Kq, D)`` form one set, transformed by the same module, and
            every instance is classified against the set centres ``(N, D)``.
        contrastive_temperature: temperature of the regulariser's logits (FEAT's ``temperature2``).

    Call: ``model(support_images (S, C, H, W), support_labels (S,) in 0..N-1,
    query_images (Q, C, H, W)) -> logits (Q, N)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dependency: ClassDependencyModule,
        *,
        distance: str = "euclidean",
        temperature: float = 1.0,
        learn_temperature: bool = False,
        contrastive_weight: float = 0.0,
        contrastive_temperature: float = 1.0,
    ) -> None:
        super().__init__(backbone, distance=distance, temperature=temperature,
                         learn_temperature=learn_temperature)
        if not isinstance(dependency, ClassDependencyModule):
            raise ValueError(f"dependency must be a ClassDependencyModule, got {type(dependency).__name__}")
        finite("contrastive_weight", contrastive_weight, low=0.0)
        finite("contrastive_temperature", contrastive_temperature, low=0.0, low_open=True)
        self.dependency = dependency
        self.contrastive_weight = float(contrastive_weight)
        self.contrastive_temperature = float(contrastive_temperature)

    def refine_prototypes(self, prototypes: torch.Tensor) -> torch.Tensor:
        return self.dependency(prototypes)  # (N, D)

    def auxiliary_loss(
        self,
        support_feats: torch.Tensor,
        support_labels: torch.Tensor,
        query_feats: torch.Tensor,
        query_labels: torch.Tensor,
    ) -> torch.Tensor | None:
        if self.contrastive_weight == 0:
            return None
        feats = torch.cat([support_feats, query_feats])  # (S + Q, D)
        labels = torch.cat([support_labels, query_labels])  # (S + Q,)
        n_way = check_support_labels(support_labels, len(support_feats))
        sets, mask = _group_by_class(feats, labels, n_way)  # (N, M, D), (N, M)
        adapted = self.dependency(sets, mask)  # (N, M, D)
        w = mask.unsqueeze(-1).to(adapted.dtype)  # (N, M, 1)
        centres = (adapted * w).sum(1) / w.sum(1).clamp_min(1.0)  # (N, D)
        logits = -torch.cdist(feats.float(), centres.float()).pow(2) / self.contrastive_temperature
        return self.contrastive_weight * F.cross_entropy(logits, labels)


def _group_by_class(
    feats: torch.Tensor, labels: torch.Tensor, n_way: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads the instances of each class into sets: ``(S, D), (S,) -> (N, M, D), mask (N, M)``."""
    counts = torch.bincount(labels, minlength=n_way)  # (N,)
    order = torch.argsort(labels, stable=True)  # instances grouped by class
    sorted_labels = labels[order]
    starts = torch.cumsum(counts, 0) - counts  # (N,)
    slot = torch.arange(len(labels), device=labels.device) - starts[sorted_labels]  # position in set
    m = int(counts.max())
    sets = feats.new_zeros(n_way, m, feats.shape[1])  # (N, M, D)
    sets[sorted_labels, slot] = feats[order]
    mask = torch.zeros(n_way, m, dtype=torch.bool, device=feats.device)
    mask[sorted_labels, slot] = True
    return sets, mask
