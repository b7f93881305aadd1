"""Episodic data: seeded sampler, Omniglot, mini-ImageNet, CIFAR-FS, class folders, downloads."""

from __future__ import annotations

from .download import atomic_write_bytes, download, download_omniglot, sha256_file, verify_file
from .folders import CIFARFS, ImageFolderDataset, MiniImageNet, load_image
from .omniglot import LakeRun, OmniglotDataset, load_lake_runs, omniglot_dir
from .paths import cache_dir, data_root, dataset_dir
from .sampler import EpisodeCollate, EpisodeSampler, episode_labels, split_episode

__all__ = [
    "EpisodeSampler", "EpisodeCollate", "episode_labels", "split_episode",
    "OmniglotDataset", "LakeRun", "load_lake_runs", "omniglot_dir",
    "ImageFolderDataset", "MiniImageNet", "CIFARFS", "load_image",
    "data_root", "dataset_dir", "cache_dir",
    "download", "download_omniglot", "sha256_file", "verify_file", "atomic_write_bytes",
]
