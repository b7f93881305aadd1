"""Top-N ranking baselines a practitioner compares a recommender with, on the shared API.

* :class:`MostPopular` -- items ranked by their number of training ratings;
* :class:`ItemKNN` -- item-item cosine similarity of the binary interaction matrix, top-``k``
  neighbours per item (Sarwar et al. 2001; Deshpande & Karypis 2004);
* :class:`EASE` -- the closed-form shallow autoencoder of Steck (2019),
  ``B = I - P diagMat(1 / diag(P))``, ``P = (X^T X + lambda I)^-1``.

They learn from which items a user rated (ratings at or above ``min_rating`` when it is given) and
rank; they predict no rating, so ``predict`` raises and :func:`cmc_rec.metrics.evaluate` reports
their RMSE / MAE as NaN.  Memory: ItemKNN and EASE hold an (items x items) float32 matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from .recommender import BaseRecommender

__all__ = ["EASE", "ItemKNN", "MostPopular", "RankingRecommender", "interaction_matrix"]


def interaction_matrix(u: np.ndarray, i: np.ndarray, r: np.ndarray, n_users: int, n_items: int,
                       min_rating: float | None = None) -> torch.Tensor:
    """Binary (U, I) float32 sparse COO matrix (coalesced: rows sorted): 1 where the user rated the
    item (at or above ``min_rating`` when given); a repeated (user, item) pair counts once."""
    keep = np.ones(len(r), bool) if min_rating is None else r >= min_rating
    pairs = np.unique(u[keep].astype(np.int64) * n_items + i[keep])  # sorted by user, then item
    idx = torch.as_tensor(np.stack([pairs // n_items, pairs % n_items]), dtype=torch.long)
    return torch.sparse_coo_tensor(idx, torch.ones(len(pairs)), (n_users, n_items), is_coalesced=True,
                                   check_invariants=True)


def csr_rows(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Dense (B, n_cols) float32 0/1 rows ``rows`` of the binary CSR matrix (indptr, indices)."""
    starts, lens = indptr[rows], indptr[rows + 1] - indptr[rows]  # (B,)
    row_of = torch.repeat_interleave(torch.arange(len(rows)), lens)  # (nnz_B,)
    offsets = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    out = torch.zeros(len(rows), n_cols)
    out[row_of, indices[torch.repeat_interleave(starts, lens) + offsets]] = 1.0
    return out


class RankingRecommender(BaseRecommender):
    """Base of the ranking-only models: binary interactions, no rating prediction.

    Subclasses implement ``_fit_interactions(x)`` with ``x`` the (U, I) sparse binary matrix and
    ``_score_all``.  Unknown users are ranked by popularity (``_item_bias``).
    """

    predicts_ratings = False

    def __init__(self, min_rating: float | None = None) -> None:
        super().__init__()
        if min_rating is not None and not np.isfinite(min_rating):
            raise ValueError(f"min_rating must be a finite number or None, got {min_rating}")
        self.min_rating = min_rating

    def _fit(self, u, i, r) -> None:
        x = interaction_matrix(u, i, r, self.n_users, self.n_items, self.min_rating)
        rows, self._indices = x.indices()  # CSR arrays of the (U, I) matrix
        self._indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.bincount(rows, minlength=self.n_users), 0)])
        self._popularity = torch.bincount(x.indices()[1], minlength=self.n_items).float()  # (I,)
        self._fit_interactions(x)

    def _fit_interactions(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _user_rows(self, u: np.ndarray) -> torch.Tensor:
        """Dense (B, I) interaction rows of users ``u`` (built from the CSR arrays, O(B * I) memory)."""
        return csr_rows(self._indptr, self._indices, torch.as_tensor(u), self.n_items)

    def _score(self, u, i):
        raise TypeError(f"{type(self).__name__} ranks items and predicts no rating; use recommend()")

    def _user_bias(self, u):
        return np.zeros(len(u), dtype=np.float32)

    def _item_bias(self, i):
        return self._popularity[torch.as_tensor(i)].numpy()

    def predict(self, users, items) -> np.ndarray:
        """Not defined for a ranking-only model: raises ``TypeError`` (see ``predicts_ratings``)."""
        self._require_fitted()
        raise TypeError(f"{type(self).__name__} ranks items and predicts no rating; use recommend()")


class MostPopular(RankingRecommender):
    """Every user gets the most-rated items (of those not seen)."""

    def _fit_interactions(self, x) -> None:
        pass

    def _score_all(self, u):
        return self._popularity.expand(len(u), -1).numpy()


class ItemKNN(RankingRecommender):
    """Item-based cosine k-nearest neighbours: ``score(u, j) = sum_{i in N_k(j)} x_ui * sim(i, j)``.

    ``shrink`` damps similarities of items with few common raters: ``sim = dot / (|i| |j| + shrink)``.
    """

    def __init__(self, k: int = 200, shrink: float = 0.0, min_rating: float | None = None) -> None:
        super().__init__(min_rating)
        if k < 1 or not shrink >= 0:
            raise ValueError(f"k must be >= 1 and shrink >= 0, got k={k}, shrink={shrink}")
        self.k, self.shrink = k, shrink

    def _fit_interactions(self, x) -> None:
        co = torch.sparse.mm(x.t().coalesce(), x.to_dense())  # (I, I) co-occurrence counts
        norm = self._popularity.sqrt()  # (I,)
        sim = co / (norm[:, None] * norm[None, :] + self.shrink + 1e-12)
        sim.fill_diagonal_(0.0)
        k = min(self.k, self.n_items - 1)
        if k < self.n_items - 1:  # keep each target item's k most similar items
            top = torch.topk(sim, k, dim=0)
            sim = torch.zeros_like(sim).scatter_(0, top.indices, top.values)
        self._sim = sim  # (I, I): sim[i, j] = weight of seen item i for target j

    def _score_all(self, u):
        return (self._user_rows(u) @ self._sim).numpy()


class EASE(RankingRecommender):
    """Embarrassingly Shallow Autoencoder (Steck, WWW 2019), closed form; ``reg`` is its lambda."""

    def __init__(self, reg: float = 500.0, min_rating: float | None = None) -> None:
        super().__init__(min_rating)
        if not reg > 0:
            raise ValueError(f"reg must be > 0, got {reg}")
        self.reg = reg

    def _fit_interactions(self, x) -> None:
        xd = x.to_dense().double()  # (U, I)
        gram = xd.T @ xd + self.reg * torch.eye(self.n_items, dtype=torch.float64)  # (I, I)
        p = torch.linalg.inv(gram)
        b = -p / torch.diagonal(p)[None, :]
        b.fill_diagonal_(0.0)
        self._b = b.float()  # (I, I)

    def _score_all(self, u):
        return (self._user_rows(u) @ self._b).numpy()
