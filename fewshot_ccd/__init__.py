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
from .features import meta_train_features
from .methods import CCDNet, FewShotClassifier, ProtoNet
from .models import build_backbone, build_model
from .pretrain import PretrainConfig, PretrainResult, load_pretrained, pretrain
from .train import TrainConfig, TrainResult, meta_train

__all__ = [
    "ClassDependencyModule", "DependencyConfig",
    "FewShotClassifier", "ProtoNet", "CCDNet",
    "Conv4", "ResNet12", "FeatureExtractor", "feature_dim",
    "EpisodeSampler", "EpisodeCollate", "OmniglotDataset", "load_lake_runs",
    "ImageFolderDataset", "MiniImageNet", "CIFARFS",
    "TrainConfig", "TrainResult", "meta_train", "meta_train_features",
    "PretrainConfig", "PretrainResult", "pretrain", "load_pretrained", "build_backbone", "build_model",
    "EvalResult", "LakeResult", "embed_dataset", "evaluate", "evaluate_lake_runs", "mean_ci95",
]
