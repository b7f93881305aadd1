"""Few-shot methods: one pure call ``model(support_images, support_labels, query_images) -> logits``."""

from __future__ import annotations

from .base import FewShotClassifier, check_support_labels, class_means
from .ccd import CCDNet
from .protonet import ProtoNet

__all__ = ["FewShotClassifier", "ProtoNet", "CCDNet", "check_support_labels", "class_means"]
