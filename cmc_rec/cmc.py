"""``CMCRecommender``: contrastive matrix completion behind the shared recommender API.

Two parts, both fitted by ``fit`` on the ratings it is given (never a test set):

* **ranking** (``recommend``): graph embeddings trained by InfoNCE over all items
  (:mod:`cmc_rec.ranking`, ``CMCConfig.ranking``); items are ranked by the cosine of the user's
  and the item's embedding.
* **rating** (``predict``): the kernelised item autoencoder (:mod:`cmc_rec.autoencoder`,
  ``CMCConfig.autoencoder``) with its blend partners, a user-based autoencoder
  (``CMCConfig.user_autoencoder``) and an item kNN on baseline residuals (:mod:`cmc_rec.neighbors`,
  ``CMCConfig.neighbors``), and, optionally (``CMCConfig.graph_rating``), MCCL's graph model with
  its MSE rating head (denoising + variational views, :class:`ContrastiveMatrixModel`, early
  stopping on validation RMSE).  With the autoencoder, ``predict`` returns
  ``w . (1, damped biases, graph head if fitted, autoencoder, user autoencoder, kNN)`` (``head_names``)
  with the weights fitted by least
  squares on a seeded validation split carved out of the ratings (``TrainConfig.val_fraction``);
  the heads are fitted on the rest.  A lone graph model predicts with its own head.

With ``graph_rating`` the graph model can also rank: ``rank_by="preference"`` (cosine of its
projection head), ``"rating"`` (its predicted rating) or ``"blend"`` (``cosine + blend_weight *
r_hat``).  ``graph_head()`` returns the fitted graph model alone as a recommender, without refitting.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ._util import check_number
from .autoencoder import AutoencoderConfig, KernelAutoencoderRecommender
from .data import Ratings, holdout_indices
from .model import ContrastiveMatrixModel, LossConfig
from .neighbors import KNNBaselineRecommender, NeighborConfig
from .ranking import RankingConfig, ranking_embeddings, train_ranking
from .recommender import BaseRecommender, damped_biases
from .train import TrainConfig, Trainer, TrainResult

RANK_BY = ("ranking", "blend", "preference", "rating")


def default_autoencoder() -> AutoencoderConfig:
    """The default item-based rating head: two kernel autoencoders of 250 units averaged.

    With the user-based autoencoder and the item kNN beside it in the blend (validation RMSE on
    u1.base's 10% per-user carve, docs/cmc_rec.md): biases + 3 item autoencoders 0.8857; 2 + the
    user-based one + kNN 0.8811; 3 + both 0.8804, for a third more autoencoder time.
    """
    return AutoencoderConfig(hidden=250, ensemble=2)


def default_user_autoencoder() -> AutoencoderConfig:
    """The default user-based rating head (U-AutoRec): one kernel autoencoder of 250 units."""
    return AutoencoderConfig(hidden=250, user_based=True)


@dataclass
class CMCConfig:
    ranking: RankingConfig | None = field(default_factory=RankingConfig)  # recommend()'s model (None: off)
    autoencoder: AutoencoderConfig | None = field(default_factory=default_autoencoder)  # item-based rating head
    # the item autoencoder's partners in the rating blend (fitted only with `autoencoder`: None there
    # turns the whole blend off): a user-based autoencoder and an item kNN on baseline residuals
    user_autoencoder: AutoencoderConfig | None = field(default_factory=default_user_autoencoder)
    neighbors: NeighborConfig | None = field(default_factory=NeighborConfig)
    graph_rating: bool = False  # also fit MCCL's graph model (MSE rating head; fields below) as a rating head
    rank_by: str = "ranking"  # "ranking" (the InfoNCE model above) or, with graph_rating, one of the graph model's
    # -- MCCL's graph model (graph_rating=True) ------------------------------------------------
    embedding_dim: int = 64  # D (the blog uses 128; 64 is as good on ML-100K and twice as fast)
    num_layers: int = 2  # message-passing layers in each view
    attention_dim: int = 16  # d_att of the denoising view's edge scores
    edge_dropout: float = 0.1  # augmentation of the variational view
    node_dropout: float = 0.3  # share of input node embeddings zeroed per step (training only; tuned on val)
    init_std: float = 0.1  # embeddings ~ N(0, init_std^2)
    standardize: bool = False  # train on (r - mean) / std: makes l2 etc. scale-free (e.g. YahooMusic's 1-100)
    blend_weight: float = 0.1  # rank_by="blend": cosine + blend_weight * predicted rating (chosen on validation)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    progress: bool | None = None  # tqdm bars of every part whose own `progress` is None; None: stderr a terminal

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "num_layers", "attention_dim"):
            check_number(f"CMCConfig.{name}", getattr(self, name), low=1, integer=True)
        for name in ("edge_dropout", "node_dropout"):
            check_number(f"CMCConfig.{name}", getattr(self, name), low=0.0, high=1.0, high_open=True)
        check_number("CMCConfig.init_std", self.init_std, low=0.0, low_open=True)
        check_number("CMCConfig.blend_weight", self.blend_weight)
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        if self.rank_by == "ranking" and self.ranking is None:
            raise ValueError("rank_by='ranking' needs CMCConfig.ranking (a RankingConfig), got None")
        if self.user_autoencoder is not None and not self.user_autoencoder.user_based:
            raise ValueError("CMCConfig.user_autoencoder must have user_based=True (the item-based one is "
                             "CMCConfig.autoencoder)")
        if self.rank_by != "ranking" and not self.graph_rating:
            raise ValueError(f"rank_by={self.rank_by!r} ranks with the graph model: set graph_rating=True")


class CMCRecommender(BaseRecommender):
    """Contrastive matrix completion (blog + MCCL, arXiv 2506.10658) with the shared API.

    ``CMCRecommender()`` ranks with :mod:`cmc_rec.ranking` and predicts with the autoencoder head;
    ``timings`` holds the seconds each part took to fit, ``head_weights`` the rating blend.
    """

    def __init__(self, config: CMCConfig | None = None) -> None:
        super().__init__()
        self.config = config or CMCConfig()
        self.model: ContrastiveMatrixModel | None = None
        self.result: TrainResult | None = None
        self.timings: dict[str, float] = {}  # seconds each head took to fit

    def _parts(self) -> tuple[RankingConfig | None, AutoencoderConfig | None, AutoencoderConfig | None, TrainConfig]:
        """The parts' configs, with ``CMCConfig.progress`` filled in where a part leaves it None."""
        c = self.config

        def fill(part):
            return part if part is None or part.progress is not None else dataclasses.replace(part, progress=c.progress)

        return fill(c.ranking), fill(c.autoencoder), fill(c.user_autoencoder), fill(c.train)

    def _fit(self, u, i, r) -> None:
        c, tc = self.config, self.config.train
        ranking, autoencoder, user_autoencoder, _ = self._parts()
        self.timings = {}  # seconds each part took to fit
        self.model, self.result, self.autoencoder, self.ranker, self.rankers = None, None, None, None, []
        self.user_autoencoder, self.neighbors = None, None
        tr, va = holdout_indices(len(r), tc.val_fraction, seed=tc.seed)
        if c.ranking is not None:  # ranks from every rating: it has no validation-based choice to make
            start = time.perf_counter()
            self.rankers = train_ranking(u, i, r, self.n_users, self.n_items, ranking)
            self.ranker = self.rankers[0]
            self._zu, self._zi = ranking_embeddings(self.rankers)  # (U, n D), (I, n D)
            self.timings["ranking"] = time.perf_counter() - start
        self._biases = damped_biases(u[tr], i[tr], r[tr], self.n_users, self.n_items, float(r[tr].mean()))
        self._bias_mean = float(r[tr].mean())
        if c.graph_rating:
            start = time.perf_counter()
            self._fit_graph(u, i, r, tr, va)
            self.timings["graph"] = time.perf_counter() - start
        if c.autoencoder is not None:
            start = time.perf_counter()
            # the autoencoder's "raw" ids are this model's indices; users / items seen only in the
            # validation part are unknown to it and get its documented bias fallback
            self.autoencoder = KernelAutoencoderRecommender(autoencoder).fit(Ratings(u[tr], i[tr], r[tr]))
            self.timings["autoencoder"] = time.perf_counter() - start
        if c.autoencoder is not None and c.user_autoencoder is not None:
            start = time.perf_counter()
            self.user_autoencoder = KernelAutoencoderRecommender(user_autoencoder).fit(Ratings(u[tr], i[tr], r[tr]))
            self.timings["user autoencoder"] = time.perf_counter() - start
        if c.autoencoder is not None and c.neighbors is not None:
            start = time.perf_counter()
            self.neighbors = KNNBaselineRecommender(c.neighbors).fit(Ratings(u[tr], i[tr], r[tr]))
            self.timings["neighbors"] = time.perf_counter() - start
        self.head_weights = None
        if len(va) and self._blended_heads():  # a lone graph model predicts by itself
            x = self._head_features(u[va], i[va])  # (V, F)
            self.head_weights = np.linalg.lstsq(x, r[va].astype(np.float64), rcond=None)[0]  # (F,)

    def _fit_graph(self, u, i, r, tr, va) -> None:
        """MCCL's graph model with its MSE rating head, early-stopped on the validation part."""
        c, tc = self.config, self._parts()[3]
        levels_raw = np.unique(r)
        levels = np.searchsorted(levels_raw, r)  # rating value -> level index
        self.levels = levels_raw
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
        graph_config = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)
                        if f.name not in ("ranking", "autoencoder", "user_autoencoder", "neighbors", "rank_by", "blend_weight", "loss", "train", "progress")}
        self.result = Trainer(tc, c.loss).fit(
            self.model, (u[tr], i[tr], rs[tr]), (u[va], i[va], rs[va]) if len(va) else None, clip=clip,
            context=graph_config,
        )
        self.val_rmse = self.result.best_val_rmse * self._scale  # best validation RMSE, rating units
        self.model.cpu().eval()
        self.model.graph = self.model.graph.cpu()
        self._z = self.model.embeddings()  # (N, D) cached for inference
        self._bu = self.model.user_bias.weight.detach().squeeze(1)  # (U,)
        self._bi = self.model.item_bias.weight.detach().squeeze(1)  # (I,)

    def graph_head(self) -> CMCRecommender:
        """The fitted graph model alone (its MSE rating head), as a recommender; nothing is refitted.

        The graph model is trained before the autoencoder head and does not depend on it, so on the
        CPU (deterministic kernels) this predicts exactly what ``CMCRecommender`` without
        ``config.autoencoder`` gives at the same seed.  The returned recommender shares everything
        with this one (the fitted model, id maps, ``config.loss`` / ``config.train``) except the
        top level of ``config``: setting ``head.config.rank_by`` leaves this one's unchanged.
        """
        self._require_fitted()
        if self.model is None:
            raise ValueError("this CMCRecommender has no graph model: fit it with CMCConfig(graph_rating=True)")
        head = copy.copy(self)
        head.config = dataclasses.replace(self.config, autoencoder=None, user_autoencoder=None, neighbors=None,
                                          ranking=None, rank_by="blend")
        head.autoencoder, head.head_weights, head.ranker, head.rankers = None, None, None, []
        head.user_autoencoder, head.neighbors = None, None
        head.timings = {"graph": self.timings["graph"]}
        return head

    # -- scoring ------------------------------------------------------------------------------
    def _graph_rating(self, u, i) -> np.ndarray:
        with torch.no_grad():
            pred = self.model.rating(self._z, torch.as_tensor(u), torch.as_tensor(i)).numpy()
        return pred.astype(np.float64) * self._scale + self._shift  # rating units

    def _blended_heads(self) -> list[tuple[str, BaseRecommender]]:
        """The fitted rating heads other than the graph model, in blend order."""
        heads = (("autoencoder", self.autoencoder), ("user autoencoder", self.user_autoencoder),
                 ("neighbors", self.neighbors))
        return [(name, head) for name, head in heads if head is not None]

    @property
    def head_names(self) -> list[str]:
        """Names of the columns ``head_weights`` weigh (fitted model)."""
        self._require_fitted()
        return ["intercept", "biases"] + ["graph"] * (self.model is not None) + [n for n, _ in self._blended_heads()]

    def _head_features(self, u, i) -> np.ndarray:
        """(n, F) columns: 1, damped-bias baseline, graph head (if fitted), then every fitted head of
        ``_blended_heads`` (item autoencoder, user autoencoder, kNN)."""
        cols = [np.ones(len(u)), self._bias_mean + self._biases[0][u] + self._biases[1][i]]
        if self.model is not None:
            cols.append(self._graph_rating(u, i))
        cols += [head.predict(u, i).astype(np.float64) for _, head in self._blended_heads()]
        return np.stack(cols, 1)

    def _score(self, u, i):
        if self.head_weights is not None:
            return self._head_features(u, i) @ self.head_weights
        if self.model is not None:
            return self._graph_rating(u, i)
        heads = self._blended_heads()
        if heads:  # no validation carve to blend on: the mean of the heads
            return np.mean([head.predict(u, i).astype(np.float64) for _, head in heads], 0)
        return self._bias_mean + self._biases[0][u] + self._biases[1][i]

    def _score_all(self, u):
        if self.config.rank_by == "ranking":
            return (self._zu[torch.as_tensor(u)] @ self._zi.T).numpy()  # (B, I) cosine
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
        if self.model is not None:
            return self._bu[torch.as_tensor(u)].numpy() * self._scale
        return self._biases[0][u] + self._bias_mean - self.global_mean

    def _item_bias(self, i):
        if self.model is not None:
            return self._bi[torch.as_tensor(i)].numpy() * self._scale
        return self._biases[1][i]


def with_temperature(config: CMCConfig, temperature: float) -> CMCConfig:
    """``config`` with tau of every InfoNCE term set to ``temperature`` (ranking model and graph model)."""
    ranking = None if config.ranking is None else dataclasses.replace(config.ranking, temperature=temperature)
    return dataclasses.replace(config, ranking=ranking, loss=dataclasses.replace(config.loss, temperature=temperature))


def temperature_sweep(train, temperatures, config: CMCConfig | None = None, val_fraction: float = 0.1,
                      seed: int = 0, k: int = 10) -> list[dict]:
    """Fit one CMC per temperature on part of ``train`` and score it on the held-out rest.

    Only training data is used: :func:`cmc_rec.tuning.tune` carves a seeded per-user validation
    share ``val_fraction`` out of ``train``; returns one dict per temperature with the validation
    metrics (RMSE, Recall@k, NDCG@k, coverage, fit seconds).
    """
    from .tuning import tune

    temps = list(temperatures)
    if not temps:
        raise ValueError(f"temperatures must be a non-empty list of positive numbers, got {temperatures}")
    temps = [float(check_number("temperature", t, low=0.0, low_open=True)) for t in temps]
    base = config or CMCConfig()
    result = tune(lambda temperature: CMCRecommender(with_temperature(base, temperature)),
                  {"temperature": temps}, train, fraction=val_fraction, seed=seed, k=k)
    return [{**row["params"], **{key: v for key, v in row.items() if key != "params"}} for row in result.rows]
