"""Prototypical Networks (Snell, Swersky and Zemel, NeurIPS 2017)."""

from __future__ import annotations

from .base import FewShotClassifier

__all__ = ["ProtoNet"]


class ProtoNet(FewShotClassifier):
    """Prototypical Networks: a query is scored by its distance to each class's mean embedding.

    Snell, Swersky, Zemel, "Prototypical Networks for Few-shot Learning", NeurIPS 2017.

    Args:
        backbone: ``nn.Module`` mapping images ``(B, C, H, W)`` to features ``(B, D)``.
        distance: ``"euclidean"`` (squared, as in the paper), ``"euclidean_unsquared"`` (as easyfsl)
            or ``"cosine"``.
        temperature: logits are divided by it.
        learn_temperature: learn the temperature.

    Call: ``model(support_images (S, C, H, W), support_labels (S,) in 0..N-1,
    query_images (Q, C, H, W)) -> logits (Q, N)``.
    """
