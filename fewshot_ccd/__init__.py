"""Few-shot classification with conditional class dependencies (CCD).

``ClassDependencyModule`` refines the class prototypes of an episode by attention across the
classes; ``ProtoNet`` and ``CCDNet`` share one pure call
``model(support_images, support_labels, query_images) -> logits``.
"""

from __future__ import annotations

from .backbones import Conv4, FeatureExtractor, ResNet12, feature_dim
from .data import (
    CIFARFS,
    EpisodeCollate,
    EpisodeSampler,
    ImageFolderDataset,
    MiniImageNet,
    OmniglotDataset,
    load_lake_runs,
)
from .dependency import ClassDependencyModule, DependencyConfig
from .evaluate import EvalResult, LakeResult, embed_dataset, evaluate, evaluate_lake_runs, mean_ci95
from .methods import CCDNet, FewShotClassifier, ProtoNet
from .train import PretrainConfig, TrainConfig, TrainResult, meta_train, pretrain_backbone

__all__ = [
    "ClassDependencyModule", "DependencyConfig",
    "FewShotClassifier", "ProtoNet", "CCDNet",
    "Conv4", "ResNet12", "FeatureExtractor", "feature_dim",
    "EpisodeSampler", "EpisodeCollate", "OmniglotDataset", "load_lake_runs",
    "ImageFolderDataset", "MiniImageNet", "CIFARFS",
    "TrainConfig", "TrainResult", "meta_train", "PretrainConfig", "pretrain_backbone",
    "EvalResult", "LakeResult", "embed_dataset", "evaluate", "evaluate_lake_runs", "mean_ci95",
]
