"""``implicit``'s ALS (Hu, Koren & Volinsky 2008) and BPR (Rendle et al. 2009) on the shared API.

Optional: needs the ``implicit`` package (``pip install tokenprune-diffusers[ranking]``); importing this
module works without it, ``fit`` raises ``ImportError`` naming the extra.  Ranking-only models: the
binary interaction matrix (ratings at or above ``min_rating`` when given) is what they learn from.
"""

from __future__ import annotations

import numpy as np
import torch

from .baselines import RankingRecommender

__all__ = ["ImplicitALS", "ImplicitBPR", "implicit_available"]


def implicit_available() -> bool:
    try:
        import implicit  # noqa: F401
    except ImportError:
        return False
    return True


def _require_implicit():
    try:
        import implicit.cpu.als
        import implicit.cpu.bpr
    except ImportError as err:
        raise ImportError("ImplicitALS / ImplicitBPR need the `implicit` package: "
                          "pip install 'tokenprune-diffusers[ranking]' (or pip install implicit)") from err
    return implicit


class _ImplicitBase(RankingRecommender):
    def __init__(self, factors: int, regularization: float, iterations: int, min_rating: float | None,
                 seed: int, num_threads: int) -> None:
        super().__init__(min_rating)
        if factors < 1 or iterations < 1 or num_threads < 0 or not regularization >= 0:
            raise ValueError(f"need factors >= 1, iterations >= 1, regularization >= 0, num_threads >= 0; got "
                             f"{factors}, {iterations}, {regularization}, {num_threads}")
        self.factors, self.regularization, self.iterations = factors, regularization, iterations
        self.seed, self.num_threads = seed, num_threads

    def _fit_interactions(self, x) -> None:
        import scipy.sparse as sp

        rows, cols = x.indices().numpy()
        user_items = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(self.n_users, self.n_items))
        model = self._make(_require_implicit())
        model.fit(user_items, show_progress=False)
        self._user_f = torch.as_tensor(np.asarray(model.user_factors))  # (U, F')
        self._item_f = torch.as_tensor(np.asarray(model.item_factors))  # (I, F')

    def _score_all(self, u):
        return (self._user_f[torch.as_tensor(u)] @ self._item_f.T).numpy()


class ImplicitALS(_ImplicitBase):
    """Weighted ALS for implicit feedback; confidence ``1 + alpha`` on observed pairs."""

    def __init__(self, factors: int = 64, regularization: float = 0.01, alpha: float = 1.0, iterations: int = 15,
                 min_rating: float | None = None, seed: int = 0, num_threads: int = 1) -> None:
        super().__init__(factors, regularization, iterations, min_rating, seed, num_threads)
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def _make(self, implicit):
        return implicit.cpu.als.AlternatingLeastSquares(
            factors=self.factors, regularization=self.regularization, alpha=self.alpha, iterations=self.iterations,
            random_state=self.seed, num_threads=self.num_threads)


class ImplicitBPR(_ImplicitBase):
    """Bayesian personalised ranking by SGD over (user, seen item, unseen item) triples."""

    def __init__(self, factors: int = 100, learning_rate: float = 0.01, regularization: float = 0.01,
                 iterations: int = 100, min_rating: float | None = None, seed: int = 0, num_threads: int = 1) -> None:
        super().__init__(factors, regularization, iterations, min_rating, seed, num_threads)
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.learning_rate = learning_rate

    def _make(self, implicit):
        return implicit.cpu.bpr.BayesianPersonalizedRanking(
            factors=self.factors, learning_rate=self.learning_rate, regularization=self.regularization,
            iterations=self.iterations, random_state=self.seed, num_threads=self.num_threads)
