"""``CMCRecommender``: contrastive matrix completion behind the shared recommender API.

``fit`` carves a seeded validation split out of the ratings it is given (never the test set),
builds the user-item graph from the rest, trains :class:`ContrastiveMatrixModel` with early
stopping on validation RMSE, and keeps the best epoch.  ``predict`` uses the rating head;
``recommend`` ranks by the preference score (``rank_by="preference"``, the cosine the blog's
InfoNCE trains), by predicted rating (``rank_by="rating"``), or by default by their blend
``cosine + blend_weight * r_hat``.  ``blend_weight = 0.1`` was picked on a validation split carved
from ML-100K u1.base (seed 123; never a test set): Recall@10 0.070 (cosine) -> 0.106 (blend).

Optional second rating head (``CMCConfig.autoencoder``): a kernelised item autoencoder
(:mod:`cmc_rec.autoencoder`, whose first layer is a rating-weighted message pass over the same
training graph) is fitted on the same training part, and ``predict`` returns
``w0 + w1 * r_graph + w2 * r_autoencoder`` with the three weights fitted by least squares on the
validation split (the one early stopping uses; the test set is never seen).  ``recommend`` is
unchanged by it (it ranks with the graph model's scores).  ``graph_head()`` returns the fitted graph
model alone as a recommender, without refitting it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .autoencoder import AutoencoderConfig, KernelAutoencoderRecommender
from .data import Ratings, holdout_indices, random_split
from .metrics import evaluate
from .model import ContrastiveMatrixModel, LossConfig
from .recommender import BaseRecommender
from .train import TrainConfig, Trainer, TrainResult

RANK_BY = ("blend", "preference", "rating")


@dataclass
class CMCConfig:
    embedding_dim: int = 64  # D (the blog uses 128; 64 is as good on ML-100K and twice as fast)
    num_layers: int = 2  # message-passing layers in each view
    attention_dim: int = 16  # d_att of the denoising view's edge scores
    edge_dropout: float = 0.1  # augmentation of the variational view
    node_dropout: float = 0.3  # share of input node embeddings zeroed per step (training only; tuned on val)
    init_std: float = 0.1  # embeddings ~ N(0, init_std^2)
    standardize: bool = False  # train on (r - mean) / std: makes l2 etc. scale-free (e.g. YahooMusic's 1-100)
    rank_by: str = "blend"  # recommend() score: "preference" (InfoNCE cosine), "rating", or "blend" of both
    blend_weight: float = 0.1  # blend = cosine + blend_weight * predicted rating (chosen on a validation split)
    autoencoder: AutoencoderConfig | None = None  # second rating head, blended on validation (None: graph head only)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        if self.embedding_dim < 1 or self.num_layers < 1:
            raise ValueError(f"embedding_dim and num_layers must be >= 1, got {self.embedding_dim}, {self.num_layers}")


class CMCRecommender(BaseRecommender):
    """Contrastive matrix completion (blog + MCCL, arXiv 2506.10658) with the shared API."""

    def __init__(self, config: CMCConfig | None = None) -> None:
        super().__init__()
        self.config = config or CMCConfig()
        self.model: ContrastiveMatrixModel | None = None
        self.result: TrainResult | None = None
        self.timings: dict[str, float] = {}  # seconds each head took to fit

    def _fit(self, u, i, r) -> None:
        c, tc = self.config, self.config.train
        start = time.perf_counter()
        levels_raw = np.unique(r)
        levels = np.searchsorted(levels_raw, r)  # rating value -> level index
        self.levels = levels_raw
        tr, va = holdout_indices(len(r), tc.val_fraction, seed=tc.seed)
        # optional standardisation: the model sees (r - shift) / scale; predictions are mapped back
        self._shift = float(r[tr].mean()) if c.standardize else 0.0
        self._scale = float(r[tr].std()) if c.standardize and r[tr].std() > 0 else 1.0
        rs = ((r - self._shift) / self._scale).astype(np.float32)
        self.model = ContrastiveMatrixModel(
            self.n_users, self.n_items, c.embedding_dim, num_layers=c.num_layers, attention_dim=c.attention_dim,
            edge_dropout=c.edge_dropout, node_dropout=c.node_dropout, num_levels=len(levels_raw),
            global_mean=float(rs[tr].mean()), init_std=c.init_std, seed=tc.seed,
        )
        self.model.attach_graph(u[tr], i[tr], levels[tr])
        clip = tuple((x - self._shift) / self._scale for x in self.rating_range)
        self.result = Trainer(tc, c.loss).fit(
            self.model, (u[tr], i[tr], rs[tr]), (u[va], i[va], rs[va]) if len(va) else None, clip=clip
        )
        self.val_rmse = self.result.best_val_rmse * self._scale  # best validation RMSE, rating units
        self.model.cpu().eval()
        self.model.graph = self.model.graph.cpu()
        self._z = self.model.embeddings()  # (N, D) cached for inference
        self._bu = self.model.user_bias.weight.detach().squeeze(1)  # (U,)
        self._bi = self.model.item_bias.weight.detach().squeeze(1)  # (I,)
        self.autoencoder, self.head_weights = None, None
        self.timings = {"graph": time.perf_counter() - start}  # seconds, per head
        if c.autoencoder is not None:
            start = time.perf_counter()
            self._fit_autoencoder_head(u, i, r, tr, va)
            self.timings["autoencoder"] = time.perf_counter() - start

    def graph_head(self) -> CMCRecommender:
        """The fitted graph model alone (its MSE rating head), as a recommender; nothing is refitted.

        The graph model is trained before the autoencoder head and does not depend on it, so on the
        CPU (deterministic kernels) this predicts exactly what ``CMCRecommender`` without
        ``config.autoencoder`` gives at the same seed.  The returned recommender shares everything
        with this one (the fitted model, id maps, ``config.loss`` / ``config.train``) except the
        top level of ``config``: setting ``head.config.rank_by`` leaves this one's unchanged.
        """
        self._require_fitted()
        head = copy.copy(self)
        head.config = dataclasses.replace(self.config, autoencoder=None)
        head.autoencoder, head.head_weights = None, None
        head.timings = {"graph": self.timings["graph"]}
        return head

    def _fit_autoencoder_head(self, u, i, r, tr, va) -> None:
        """Fit the autoencoder on the training part; blend weights by least squares on validation."""
        # the autoencoder's "raw" ids are this model's indices; users / items seen only in the
        # validation part are unknown to it and get its documented bias fallback
        self.autoencoder = KernelAutoencoderRecommender(self.config.autoencoder).fit(Ratings(u[tr], i[tr], r[tr]))
        if len(va) == 0:  # nothing to fit the weights on: plain average of the two heads
            self.head_weights = np.array([0.0, 0.5, 0.5])
            return
        graph = self._graph_rating(u[va], i[va])  # (V,)
        ae = self.autoencoder.predict(u[va], i[va]).astype(np.float64)  # (V,)
        x = np.stack([np.ones(len(va)), graph, ae], 1)  # (V, 3)
        self.head_weights = np.linalg.lstsq(x, r[va].astype(np.float64), rcond=None)[0]  # (3,)

    # -- scoring ------------------------------------------------------------------------------
    def _graph_rating(self, u, i) -> np.ndarray:
        with torch.no_grad():
            pred = self.model.rating(self._z, torch.as_tensor(u), torch.as_tensor(i)).numpy()
        return pred.astype(np.float64) * self._scale + self._shift  # rating units

    def _score(self, u, i):
        graph = self._graph_rating(u, i)
        if self.autoencoder is None:
            return graph
        w0, w1, w2 = self.head_weights
        return w0 + w1 * graph + w2 * self.autoencoder.predict(u, i)

    def _score_all(self, u):
        zu = self._z[torch.as_tensor(u)]  # (B, D)
        zi = self._z[self.n_users :]  # (I, D)
        rating = self.model.global_mean + self._bu[torch.as_tensor(u)][:, None] + self._bi[None, :] + zu @ zi.T
        if self.config.rank_by == "rating":
            return rating.numpy() * self._scale + self._shift  # (B, I) predicted rating
        with torch.no_grad():
            pu, pi = self.model.pref_head(zu), self.model.pref_head(zi)  # projection head
        cosine = F.normalize(pu, dim=1) @ F.normalize(pi, dim=1).T  # (B, I)
        if self.config.rank_by == "preference":
            return cosine.numpy()
        return (cosine + self.config.blend_weight * rating).numpy()  # (B, I) blend

    def _user_bias(self, u):  # in rating units, relative to the global mean (fallback)
        return self._bu[torch.as_tensor(u)].numpy() * self._scale

    def _item_bias(self, i):
        return self._bi[torch.as_tensor(i)].numpy() * self._scale


def temperature_sweep(train, temperatures, config: CMCConfig | None = None, val_fraction: float = 0.1,
                      seed: int = 0, k: int = 10) -> list[dict]:
    """Fit one CMC per temperature on part of ``train`` and score it on the held-out rest.

    Only training data is used: ``train`` is split (seeded) into fit / validation parts; returns
    one dict per temperature with the validation metrics (RMSE, Recall@k, NDCG@k, coverage).
    """
    train = Ratings.from_any(train)
    temps = [float(t) for t in temperatures]
    if not temps or min(temps) <= 0:
        raise ValueError(f"temperatures must be a non-empty list of positive numbers, got {temperatures}")
    fit_part, val_part = random_split(train, val_fraction, seed=seed)
    base = config or CMCConfig()
    rows = []
    for t in temps:
        cfg = CMCConfig(**{**base.__dict__, "loss": LossConfig(**{**base.loss.__dict__, "temperature": t})})
        model = CMCRecommender(cfg).fit(fit_part)
        rows.append({"temperature": t, **evaluate(model, fit_part, val_part, k=k).as_dict()})
    return rows
