"""Item kNN on baseline residuals (Koren 2010; Surprise's ``KNNBaseline`` with pearson-baseline similarity).

``r_ui = mu + b_u + b_i + sum_j s_ij (r_uj - b_uj) / sum_j s_ij`` over the items j rated by u among
item i's ``k`` most similar items (a fixed neighbourhood per item, so scoring is two matrix
products).  ``s_ij`` is the Pearson correlation of the two items' residuals ``r - b`` over their
common raters, shrunk by ``n_ij / (n_ij + shrink)`` (``n_ij`` common raters); only positive
similarities are kept.  Biases: damped, alternating (:func:`cmc_rec.recommender.damped_biases`).

It is the cheap, different-family member of CMC's rating blend (a second or two on ML-100K).
Memory: dense (users x items) residuals and (items x items) similarities, as the autoencoder head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._util import check_number
from .recommender import BaseRecommender, damped_biases

__all__ = ["KNNBaselineRecommender", "NeighborConfig"]


@dataclass
class NeighborConfig:
    k: int = 200  # neighbours kept per item (chosen on u1.base's validation carve, see docs/cmc_rec.md)
    shrink: float = 300.0  # similarity * n / (n + shrink), n = common raters
    batch_size: int = 4096  # (user, item) pairs scored at a time: (batch, items) floats

    def __post_init__(self) -> None:
        check_number("NeighborConfig.k", self.k, low=1, integer=True)
        check_number("NeighborConfig.shrink", self.shrink, low=0.0)
        check_number("NeighborConfig.batch_size", self.batch_size, low=1, integer=True)


class KNNBaselineRecommender(BaseRecommender):
    """Item-based kNN with baselines behind the shared recommender API (``fit`` -> self)."""

    def __init__(self, config: NeighborConfig | None = None) -> None:
        super().__init__()
        self.config = config or NeighborConfig()

    def _fit(self, u, i, r) -> None:
        c = self.config
        r = r.astype(np.float64)
        self._mu = float(r.mean())
        self._bu, self._bi = damped_biases(u, i, r, self.n_users, self.n_items, self._mu)
        res = np.zeros((self.n_users, self.n_items))  # (U, I) residuals, 0 = unrated
        mask = np.zeros((self.n_users, self.n_items))
        res[u, i] = r - self._mu - self._bu[u] - self._bi[i]
        mask[u, i] = 1.0
        sq = res**2
        common = mask.T @ mask  # (I, I) common raters
        norm = np.sqrt((sq.T @ mask) * (mask.T @ sq))  # (I, I) residual norms over the common raters
        sim = np.where(norm > 0, (res.T @ res) / np.where(norm > 0, norm, 1.0), 0.0) * common / (common + c.shrink)
        np.fill_diagonal(sim, 0.0)
        sim = np.maximum(sim, 0.0)
        k = min(c.k, self.n_items)
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1 : k]  # (I, 1) the k-th largest of each row
        self._sim = np.where((sim >= kth) & (sim > 0), sim, 0.0).astype(np.float32)  # (I, I) neighbours of row i
        self._res, self._mask = res.astype(np.float32), mask.astype(np.float32)

    def _offsets(self, num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)

    def _score(self, u, i):
        out = self._mu + self._bu[u] + self._bi[i]
        for s in range(0, len(u), self.config.batch_size):
            uu, ii = u[s : s + self.config.batch_size], i[s : s + self.config.batch_size]
            nb = self._sim[ii]  # (n, I) neighbour weights of each pair's item
            out[s : s + len(uu)] += self._offsets((nb * self._res[uu]).sum(1), (nb * self._mask[uu]).sum(1))
        return out

    def _score_all(self, u):
        base = self._mu + self._bu[u][:, None] + self._bi[None, :]  # (B, I)
        return base + self._offsets(self._res[u] @ self._sim.T, self._mask[u] @ self._sim.T)

    def _user_bias(self, u):
        return self._bu[u]  # global_mean is the training mean mu

    def _item_bias(self, i):
        return self._bi[i]
