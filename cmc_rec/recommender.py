"""Recommender API shared by every model (Surprise / implicit style), and the two baselines.

``fit(ratings) -> self``; ``predict(users, items) -> (n,)``; ``recommend(users, k) -> (ids, scores)``.

Fallback for ids not seen in ``fit`` (documented, never a crash): a known user with an unknown
item gets ``mu + b_u``; an unknown user with a known item gets ``mu + b_i``; both unknown get
``mu`` (the global mean of the training ratings).  ``recommend`` for an unknown user ranks items
by ``mu + b_i``.  Every prediction is clipped to the training rating range.

At the boundary: ``fit`` refuses repeated (user, item) pairs (``Ratings.deduplicate`` keeps the
last of each), and a model whose fit produced NaN / inf scores (a diverged training) raises
instead of returning; queries with ids of the other type than the fit's (int vs str) are refused.
``recommend(users, k)`` returns ``min(k, n_items)`` columns; when a user has fewer unseen items
than that, the row ends with padding: score ``-inf`` and id :data:`PAD_ID` (``-1`` for integer
item ids, ``""`` for string ids) -- a seen item is never returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._util import check_number, rating_scale
from .ratings import IdMap, Ratings, as_ids, id_kind

PAD_ID = {"integer": -1, "string": ""}  # the id of recommend()'s padding slots, by item id type


class BaseRecommender:
    """Holds the id maps, rating range, seen-item index, clipping and batched top-K.

    Subclasses implement ``_fit(u, i, r)`` on contiguous indices, ``_user_bias`` / ``_item_bias``
    (for the fallback) and ``_score(u_idx, i_idx)`` / ``_score_all(u_idx)``.
    """

    predicts_ratings = True  # False for ranking-only models: predict raises, evaluate reports NaN RMSE

    def __init__(self) -> None:
        self.user_map: IdMap | None = None
        self.item_map: IdMap | None = None
        self.global_mean = 0.0
        self.rating_range = (0.0, 0.0)

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, ratings) -> BaseRecommender:
        """Fit on an (n, 3) array, a DataFrame (user, item, rating) or :class:`Ratings`; returns self.

        Refuses an empty data set and repeated (user, item) pairs; raises ``FloatingPointError``
        if the fitted model scores NaN / inf (the model is then left unfitted).
        """
        data = Ratings.from_any(ratings)
        if len(data) == 0:
            raise ValueError("cannot fit on zero ratings (the data set is empty)")
        user_map, item_map = IdMap(data.users), IdMap(data.items)
        u, i = user_map.to_index(data.users), item_map.to_index(data.items)
        order = np.lexsort((i, u))  # CSR of seen items per user; stable: a repeat follows its first
        su, si = u[order], i[order]
        data.check_unique_pairs(order[1:][(su[1:] == su[:-1]) & (si[1:] == si[:-1])])
        r = data.ratings.astype(np.float32)
        self.user_map, self.item_map = user_map, item_map
        self.global_mean = float(r.mean())
        self.rating_range = (float(r.min()), float(r.max()))
        self._seen_indptr = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=len(self.user_map)))])
        self._seen_items = i[order]
        try:
            self._fit(u, i, r)
            self._check_finite(u, i)
        except BaseException:
            self.user_map = self.item_map = None  # a failed fit leaves the model unfitted
            raise
        return self

    def _check_finite(self, u: np.ndarray, i: np.ndarray) -> None:
        """Raise if the fitted model scores a sample of users / training pairs as NaN or inf."""
        sample = [np.asarray(self._score_all(np.arange(min(self.n_users, 256)))).ravel()]
        if self.predicts_ratings:
            sample.append(np.asarray(self._score(u[:1024], i[:1024])).ravel())
        scores = np.concatenate(sample)
        bad = ~np.isfinite(scores)
        if bad.any():
            lo, hi = self.rating_range
            raise FloatingPointError(
                f"{type(self).__name__}.fit produced non-finite scores ({bad.mean():.0%} of a sample of {len(scores)}) "
                f"on ratings in [{lo:g}, {hi:g}]: the training diverged; {self._divergence_hint()}")

    def _divergence_hint(self) -> str:
        return "lower the learning rate or raise the regularisation"

    @property
    def n_users(self) -> int:
        return len(self._require_fitted().user_map)

    @property
    def n_items(self) -> int:
        return len(self._require_fitted().item_map)

    def _require_fitted(self) -> BaseRecommender:
        if self.user_map is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(ratings) first")
        return self

    # -- prediction ------------------------------------------------------------------------
    def predict(self, users, items) -> np.ndarray:
        """Predicted ratings for aligned raw ids, clipped to the training range; (n,) float32."""
        self._require_fitted()
        users, items = as_ids(users, "user ids"), as_ids(items, "item ids")
        if users.shape != items.shape:
            raise ValueError(f"users and items must have one shape, got {users.shape} and {items.shape}")
        u, i = self.user_map.to_index(users), self.item_map.to_index(items)
        ku, ki = u >= 0, i >= 0
        out = np.full(len(u), self.global_mean, dtype=np.float64)
        both = ku & ki
        if both.any():
            out[both] = self._score(u[both], i[both])
        only_u, only_i = ku & ~ki, ~ku & ki
        if only_u.any():
            out[only_u] = self.global_mean + self._user_bias(u[only_u])
        if only_i.any():
            out[only_i] = self.global_mean + self._item_bias(i[only_i])
        return np.clip(out, *self.rating_range).astype(np.float32)

    def recommend(self, users, k: int = 10, exclude_seen: bool = True, batch_size: int = 1024):
        """Top-``k`` raw item ids and scores per user: two (n_users, k) arrays, best first.

        Users are scored ``batch_size`` at a time, so memory is (batch_size, n_items) whatever
        the number of users.  With ``exclude_seen`` the user's training items are never returned;
        if fewer than ``k`` items remain unseen for a user, the row's tail is padding: score ``-inf``
        and id :data:`PAD_ID` (``-1`` for integer item ids, ``""`` for string ids), never a seen item.
        """
        self._require_fitted()
        check_number("k", k, low=1, integer=True)
        check_number("batch_size", batch_size, low=1, integer=True)
        users = as_ids(users, "user ids")
        k_eff = min(k, self.n_items)
        u_all = self.user_map.to_index(users)
        ids = np.empty((len(users), k_eff), dtype=np.int64)
        scores = np.empty((len(users), k_eff), dtype=np.float32)
        fallback = torch.as_tensor(self._item_bias(np.arange(self.n_items)), dtype=torch.float32)  # (I,)
        for start in range(0, len(users), batch_size):
            u = u_all[start : start + batch_size]  # (B,)
            known = u >= 0
            s = fallback.expand(len(u), -1).clone()  # (B, I)
            if known.any():
                s[torch.as_tensor(known)] = torch.as_tensor(self._score_all(u[known]), dtype=torch.float32)
            n_unseen = np.full(len(u), self.n_items)  # (B,)
            if exclude_seen and known.any():
                rows, cols = self._seen_pairs(u)
                s[rows, cols] = -torch.inf
                n_unseen -= np.bincount(rows.numpy(), minlength=len(u))
            top = torch.topk(s, k_eff, dim=1)
            pad = np.arange(k_eff)[None, :] >= n_unseen[:, None]  # (B, k): past the unseen items
            ids[start : start + len(u)] = np.where(pad, -1, top.indices.numpy())
            scores[start : start + len(u)] = np.where(pad, -np.inf, top.values.numpy())
        pad = ids < 0
        raw = self.item_map.to_raw(np.where(pad, 0, ids))
        if pad.any():
            raw[pad] = PAD_ID[id_kind(self.item_map.raw)]
        return raw, scores

    def _seen_pairs(self, u: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(row in batch, item index) of every training rating of the batch's known users."""
        starts, ends = self._seen_indptr[np.maximum(u, 0)], self._seen_indptr[np.maximum(u, 0) + 1]
        lens = np.where(u >= 0, ends - starts, 0)
        rows = np.repeat(np.arange(len(u)), lens)
        offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        cols = self._seen_items[np.repeat(starts, lens) + offsets]
        return torch.as_tensor(rows), torch.as_tensor(cols)

    # -- to implement ----------------------------------------------------------------------
    def _fit(self, u: np.ndarray, i: np.ndarray, r: np.ndarray) -> None:
        raise NotImplementedError

    def _score(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _score_all(self, u: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _user_bias(self, u: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _item_bias(self, i: np.ndarray) -> np.ndarray:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Mean baseline
# ----------------------------------------------------------------------------------------------


class MeanRecommender(BaseRecommender):
    """``mu + b_u + b_i`` with damped (regularised) biases; ``biased=False`` gives the global mean.

    The biases come from ``n_iter`` rounds of the closed-form alternating updates of Koren (2010)
    ``b_i = sum(r - mu - b_u) / (reg_i + n_i)``, ``b_u = sum(r - mu - b_i) / (reg_u + n_u)``.
    """

    def __init__(self, biased: bool = True, reg_user: float = 15.0, reg_item: float = 10.0, n_iter: int = 10) -> None:
        super().__init__()
        check_number("reg_user", reg_user, low=0)
        check_number("reg_item", reg_item, low=0)
        check_number("n_iter", n_iter, low=1, integer=True)
        self.biased, self.reg_user, self.reg_item, self.n_iter = biased, reg_user, reg_item, n_iter

    def _fit(self, u, i, r) -> None:
        self.bu = np.zeros(self.n_users)
        self.bi = np.zeros(self.n_items)
        if self.biased:
            self.bu, self.bi = damped_biases(u, i, r, self.n_users, self.n_items, self.global_mean,
                                             self.reg_user, self.reg_item, self.n_iter)

    def _score(self, u, i):
        return self.global_mean + self.bu[u] + self.bi[i]

    def _score_all(self, u):
        return self.global_mean + self.bu[u][:, None] + self.bi[None, :]

    def _user_bias(self, u):
        return self.bu[u]

    def _item_bias(self, i):
        return self.bi[i]


def damped_biases(u, i, r, n_users: int, n_items: int, mu: float, reg_user: float = 15.0, reg_item: float = 10.0,
                  n_iter: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """User and item biases (U,), (I,) by alternating closed-form updates (Koren 2010)."""
    bu, bi = np.zeros(n_users), np.zeros(n_items)
    nu, ni = np.bincount(u, minlength=n_users), np.bincount(i, minlength=n_items)
    for _ in range(n_iter):
        bi = np.bincount(i, r - mu - bu[u], n_items) / (reg_item + ni)
        bu = np.bincount(u, r - mu - bi[i], n_users) / (reg_user + nu)
    return bu, bi


# ----------------------------------------------------------------------------------------------
# Biased matrix factorisation, trained like Surprise's SVD
# ----------------------------------------------------------------------------------------------


@dataclass
class SVDConfig:
    n_factors: int = 100  # Surprise default
    n_epochs: int = 20  # Surprise default
    lr: float = 0.005  # SGD step for every parameter (Surprise lr_all)
    reg: float = 0.02  # L2 for every parameter (Surprise reg_all)
    init_std: float = 0.1  # factors ~ N(0, init_std^2), biases 0 (Surprise)
    batch_size: int = 128  # ratings per vectorised step; per-rating updates are summed
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_factors", "batch_size"):
            check_number(f"SVDConfig.{name}", getattr(self, name), low=1, integer=True)
        check_number("SVDConfig.n_epochs", self.n_epochs, low=0, integer=True)
        check_number("SVDConfig.seed", self.seed, integer=True)
        check_number("SVDConfig.lr", self.lr, low=0, low_open=True)
        check_number("SVDConfig.reg", self.reg, low=0)
        check_number("SVDConfig.init_std", self.init_std, low=0)


class SVDRecommender(BaseRecommender):
    """Biased MF ``mu + b_u + b_i + q_i . p_u`` (Funk / Koren), trained like ``surprise.SVD``.

    Surprise applies one SGD update per rating.  Here ``batch_size`` ratings are processed at once:
    each rating's Surprise update is computed from the same parameter snapshot and the updates are
    summed with ``index_add_`` (identical to Surprise for batch_size=1; a few users or items repeat
    inside a batch of 128 out of 80k ratings, so the difference is small).  Shuffled each epoch with
    a seeded ``torch.Generator``.

    Scale: training runs on ``r / s`` with ``s = (max - min) / 4`` of the training ratings (1 on a
    1-5 scale, so there it is Surprise's SGD exactly); predictions are multiplied back.  Summed
    updates on raw ratings of a larger scale (e.g. 50-250) would diverge with Surprise's lr.  A fit
    that still diverges (too large an ``lr``) raises ``FloatingPointError`` naming the epoch.
    """

    def __init__(self, config: SVDConfig | None = None, *, n_factors: int | None = None, n_epochs: int | None = None,
                 lr: float | None = None, reg: float | None = None, seed: int | None = None) -> None:
        super().__init__()
        cfg = config or SVDConfig()
        overrides = {"n_factors": n_factors, "n_epochs": n_epochs, "lr": lr, "reg": reg, "seed": seed}
        self.config = SVDConfig(**{**cfg.__dict__, **{k: v for k, v in overrides.items() if v is not None}})

    def _fit(self, u, i, r) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of tiny steps: extra threads only add OpenMP spin-waiting
        try:
            self._sgd(u, i, r)
        finally:
            torch.set_num_threads(threads)

    def _sgd(self, u, i, r) -> None:
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        self.P = torch.randn(self.n_users, c.n_factors, generator=g) * c.init_std  # (U, F)
        self.Q = torch.randn(self.n_items, c.n_factors, generator=g) * c.init_std  # (I, F)
        self.bu = torch.zeros(self.n_users)
        self.bi = torch.zeros(self.n_items)
        self._scale = rating_scale(*self.rating_range)
        ut, it, rt = torch.as_tensor(u), torch.as_tensor(i), torch.as_tensor(r / self._scale)
        self._mu = self.global_mean / self._scale  # the global mean in training units
        mu, lr, reg = self._mu, c.lr, c.reg
        for epoch in range(1, c.n_epochs + 1):
            perm = torch.randperm(len(rt), generator=g)
            for start in range(0, len(rt), c.batch_size):
                b = perm[start : start + c.batch_size]
                ub, ib = ut[b], it[b]
                p, q = self.P[ub], self.Q[ib]  # (B, F)
                err = rt[b] - (mu + self.bu[ub] + self.bi[ib] + (p * q).sum(1))  # (B,)
                self.bu.index_add_(0, ub, lr * (err - reg * self.bu[ub]))
                self.bi.index_add_(0, ib, lr * (err - reg * self.bi[ib]))
                self.P.index_add_(0, ub, lr * (err[:, None] * q - reg * p))
                self.Q.index_add_(0, ib, lr * (err[:, None] * p - reg * q))
            if not all(bool(torch.isfinite(x).all()) for x in (self.P, self.Q, self.bu, self.bi)):
                raise FloatingPointError(f"SVDRecommender diverged: non-finite factors after epoch {epoch} of "
                                         f"{c.n_epochs}; {self._divergence_hint()}")

    def _divergence_hint(self) -> str:
        c = self.config
        return f"lr={c.lr:g} is too large for batch_size={c.batch_size} (summed updates): lower lr"

    def _score(self, u, i):
        u, i = torch.as_tensor(u), torch.as_tensor(i)
        return (self._mu + self.bu[u] + self.bi[i] + (self.P[u] * self.Q[i]).sum(1)).numpy() * self._scale

    def _score_all(self, u):
        u = torch.as_tensor(u)
        return (self._mu + self.bu[u][:, None] + self.bi[None, :] + self.P[u] @ self.Q.T).numpy() * self._scale

    def _user_bias(self, u):
        return self.bu[torch.as_tensor(u)].numpy() * self._scale

    def _item_bias(self, i):
        return self.bi[torch.as_tensor(i)].numpy() * self._scale
