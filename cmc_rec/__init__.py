"""Contrastive matrix completion for recommendation (blog reproduction + MCCL, arXiv 2506.10658).

Quick start::

    from cmc_rec import CMCRecommender, EASE, evaluate, load_movielens_100k_split
    train, test = load_movielens_100k_split("u1")   # from $CMC_REC_DATA/ml-100k, or path=...
    model = CMCRecommender().fit(train)       # ranks with InfoNCE graph embeddings, predicts with the autoencoder
    print(evaluate(model, train, test))
    item_ids, scores = model.recommend([1, 2, 3], k=10)
    print(evaluate(EASE(reg=250.0).fit(train), train, test))  # the strongest baseline: ranking only

Importing this package pulls in numpy and torch only (h5py, pandas, accelerate, matplotlib are
imported inside the functions that need them).
"""

from __future__ import annotations

from .autoencoder import AutoencoderConfig, KernelAutoencoderRecommender
from .baselines import EASE, ItemKNN, MostPopular, RankingRecommender
from .cmc import CMCConfig, CMCRecommender, temperature_sweep
from .data import (
    ChecksumError,
    DatasetNotFoundError,
    IdMap,
    Ratings,
    atomic_fetch,
    data_root,
    download_movielens,
    load_monti,
    load_movielens_1m,
    load_movielens_100k,
    load_movielens_100k_split,
    random_split,
)
from .implicit_models import ImplicitALS, ImplicitBPR
from .metrics import EvalResult, catalog_coverage, evaluate, mae, popularity_bias, recall_ndcg_at_k, rmse
from .model import DEFAULT_TEMPERATURE, ContrastiveMatrixModel, LossConfig, info_nce
from .neighbors import KNNBaselineRecommender, NeighborConfig
from .ranking import RankingConfig, RankingModel
from .recommender import PAD_ID, BaseRecommender, MeanRecommender, SVDConfig, SVDRecommender
from .train import TrainConfig, Trainer, TrainResult, atomic_save
from .tuning import TuneResult, per_user_split, tune

__all__ = [
    "DEFAULT_TEMPERATURE",
    "PAD_ID",
    "EASE",
    "AutoencoderConfig",
    "BaseRecommender",
    "CMCConfig",
    "CMCRecommender",
    "ChecksumError",
    "ContrastiveMatrixModel",
    "DatasetNotFoundError",
    "EvalResult",
    "IdMap",
    "ImplicitALS",
    "ImplicitBPR",
    "ItemKNN",
    "KNNBaselineRecommender",
    "KernelAutoencoderRecommender",
    "LossConfig",
    "MeanRecommender",
    "MostPopular",
    "NeighborConfig",
    "RankingConfig",
    "RankingModel",
    "RankingRecommender",
    "Ratings",
    "SVDConfig",
    "SVDRecommender",
    "TrainConfig",
    "TrainResult",
    "TuneResult",
    "Trainer",
    "atomic_fetch",
    "atomic_save",
    "catalog_coverage",
    "data_root",
    "download_movielens",
    "evaluate",
    "info_nce",
    "load_monti",
    "load_movielens_100k",
    "load_movielens_100k_split",
    "load_movielens_1m",
    "mae",
    "per_user_split",
    "popularity_bias",
    "random_split",
    "recall_ndcg_at_k",
    "rmse",
    "temperature_sweep",
    "tune",
]
