"""Model factories of the library: a backbone by name, and ProtoNet / CCD on it."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import Conv4, ResNet12, feature_dim
from .dependency import ClassDependencyModule
from .methods import CCDNet, FewShotClassifier, ProtoNet

__all__ = ["METHODS", "BACKBONES", "build_backbone", "build_model"]

METHODS = ("protonet", "ccd", "ccd_qkv")
BACKBONES = ("conv4", "resnet12")


def build_backbone(name: str = "conv4", *, in_channels: int = 3, seed: int = 0) -> nn.Module:
    """Conv-4 or ResNet-12 with weights drawn from ``seed`` in a forked RNG (the global RNG is untouched)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Conv4(in_channels) if name == "conv4" else ResNet12(in_channels)


def build_model(
    method: str,
    *,
    backbone: str = "conv4",
    in_channels: int = 1,
    image_size: int = 28,
    seed: int = 0,
    num_heads: int = 8,
    contrastive_weight: float = 0.0,
    scale_init: float = 1e-2,
    distance: str = "euclidean",
) -> FewShotClassifier:
    """ProtoNet or CCD with a Conv-4 (64-d on 28x28, 1600-d on 84x84) or ResNet-12 (640-d) backbone.

    The weights are drawn from ``seed`` inside a forked RNG (the global RNG is left untouched), and
    the backbone weights are the same for every method at the same seed.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    net = build_backbone(backbone, in_channels=in_channels, seed=seed)
    dim = feature_dim(net, (in_channels, image_size, image_size))  # the dependency module's width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        if method == "protonet":
            return ProtoNet(net, distance=distance)
        module = ClassDependencyModule.blog_qkv(dim) if method == "ccd_qkv" else ClassDependencyModule(
            dim, num_heads=num_heads, scale_init=scale_init)
        return CCDNet(net, module, distance=distance, contrastive_weight=contrastive_weight)
