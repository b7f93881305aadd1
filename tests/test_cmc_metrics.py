"""The metric module shared by every model."""

from __future__ import annotations

import numpy as np
import pytest

from cmc_rec import metrics as M


def test_rmse_mae():
    assert M.rmse([1, 2, 3], [1, 2, 5]) == pytest.approx(np.sqrt(4 / 3))
    assert M.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.rmse([1, 2], [1])


def test_recall_ndcg_hand_computed():
    rec = np.array([[1, 2, 3], [4, 5, 6]])
    rel = [{2, 9}, {4}]
    recall, ndcg = M.recall_ndcg_at_k(rec, rel)
    # user 0: 1 hit of 2 relevant at rank 2; user 1: hit at rank 1
    assert recall == pytest.approx((0.5 + 1.0) / 2)
    ndcg0 = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    assert ndcg == pytest.approx((ndcg0 + 1.0) / 2)


def test_coverage_and_popularity_bias():
    assert M.catalog_coverage(np.array([[1, 2], [2, 3]]), 10) == pytest.approx(0.3)
    train_items = np.array([1, 1, 1, 2, 2, 3])  # popularity 1 > 2 > 3
    pct_pop, gini_pop = M.popularity_bias(np.array([[1], [1]]), train_items)
    pct_tail, gini_even = M.popularity_bias(np.array([[3], [2], [1]]), train_items)
    assert pct_pop == pytest.approx(1.0) and pct_tail == pytest.approx((1 / 3 + 2 / 3 + 1) / 3)
    assert gini_pop > gini_even and gini_even == pytest.approx(0.0)


class _Oracle:
    """A stand-in recommender whose outputs are fixed, to test evaluate() on its own."""

    def predict(self, users, items):
        return np.full(len(users), 4.0, dtype=np.float32)

    def recommend(self, users, k=10, exclude_seen=True, batch_size=1024):
        return np.tile(np.array([10, 11]), (len(users), 1))[:, :k], np.zeros((len(users), 2))


def test_evaluate_protocol_uses_only_relevant_users():
    from cmc_rec.data import Ratings

    train = Ratings([1, 1, 2], [10, 12, 11], [5, 3, 4])
    test = Ratings([1, 2, 3], [11, 10, 10], [5, 2, 3])  # only user 1 has a relevant (>=4) item
    res = M.evaluate(_Oracle(), train, test, k=2)
    assert res.n_rank_users == 1 and res.recall == pytest.approx(1.0)
    assert res.rmse == pytest.approx(np.sqrt((1 + 4 + 1) / 3))
    assert res.coverage == pytest.approx(2 / 3)
