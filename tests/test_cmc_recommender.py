"""Shared recommender API: id mapping, fallback, clipping, batched top-K; Mean and SVD baselines."""

from __future__ import annotations

import numpy as np
import pytest
from cmc_testdata import needs_ml100k

from cmc_rec import MeanRecommender, SVDRecommender
from cmc_rec.data import load_movielens_100k_split, random_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (tests/conftest.py)


def low_rank_ratings(n_users=60, n_items=40, rank=3, density=0.5, seed=0):
    """Synthetic ratings 1..5 from a rank-`rank` matrix, with string-free but non-contiguous ids."""
    rng = np.random.default_rng(seed)
    u, i = rng.normal(size=(n_users, rank)), rng.normal(size=(n_items, rank))
    full = np.clip(np.round(3 + 1.2 * (u @ i.T) / np.sqrt(rank)), 1, 5)
    mask = rng.random((n_users, n_items)) < density
    uu, ii = np.nonzero(mask)
    return np.stack([uu * 7 + 100, ii * 3 + 5, full[uu, ii]], axis=1).astype(np.float64)


def test_svd_beats_mean_on_low_rank_data():
    from cmc_rec.data import Ratings

    train, test = random_split(Ratings.from_any(low_rank_ratings()), 0.2, seed=0)
    mean = MeanRecommender().fit(train)
    svd = SVDRecommender(n_factors=8, n_epochs=60, lr=0.02, reg=0.02, seed=0).fit(train)
    err = lambda m: np.sqrt(np.mean((m.predict(test.users, test.items) - test.ratings) ** 2))  # noqa: E731
    assert err(svd) < 0.8 * err(mean)


def test_svd_is_seeded():
    data = low_rank_ratings()
    a = SVDRecommender(n_factors=4, n_epochs=3, seed=1).fit(data).predict(data[:20, 0], data[:20, 1])
    b = SVDRecommender(n_factors=4, n_epochs=3, seed=1).fit(data).predict(data[:20, 0], data[:20, 1])
    c = SVDRecommender(n_factors=4, n_epochs=3, seed=2).fit(data).predict(data[:20, 0], data[:20, 1])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_predict_clips_and_falls_back_for_unknown_ids():
    data = low_rank_ratings()
    m = MeanRecommender().fit(data)
    known_u, known_i = data[0, 0], data[0, 1]
    p = m.predict([known_u, known_u, -1, -1], [known_i, -5, known_i, -5])
    u_idx, i_idx = m.user_map.to_index([known_u])[0], m.item_map.to_index([known_i])[0]
    assert p[1] == pytest.approx(m.global_mean + m.bu[u_idx], abs=1e-5)  # unknown item: mu + b_u
    assert p[2] == pytest.approx(m.global_mean + m.bi[i_idx], abs=1e-5)  # unknown user: mu + b_i
    assert p[3] == pytest.approx(m.global_mean, abs=1e-5)  # both unknown: mu
    m.bu[:] = 100.0  # absurd biases are clipped to the training range
    assert m.predict([known_u], [known_i])[0] == 5.0
    with pytest.raises(ValueError, match="shape"):
        m.predict([1, 2], [1])


def test_recommend_excludes_seen_is_batched_and_returns_raw_ids():
    data = low_rank_ratings()
    m = SVDRecommender(n_factors=4, n_epochs=2).fit(data)
    users = np.unique(data[:, 0])
    ids, scores = m.recommend(users, k=5, batch_size=7)
    ids_big, scores_big = m.recommend(users, k=5, batch_size=1000)
    assert ids.shape == (len(users), 5) and np.array_equal(ids, ids_big) and np.allclose(scores, scores_big)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    seen = {(u, i) for u, i in data[:, :2].tolist()}
    assert not any((u, i) in seen for u, row in zip(users.tolist(), ids.tolist()) for i in row)
    assert set(ids.ravel().tolist()) <= set(data[:, 1].tolist())  # raw item ids
    # scores equal predict() for the recommended pairs (ranking by rating), up to clipping
    assert np.allclose(np.clip(scores[:, 0], 1, 5), m.predict(users, ids[:, 0]), atol=1e-4)
    ids_all, _ = m.recommend(users[:1], k=5, exclude_seen=False)
    assert ids_all.shape == (1, 5)
    unknown, _ = m.recommend([-42], k=3)  # unknown user: items ranked by item bias
    assert list(unknown[0]) == list(m.item_map.to_raw(np.argsort(-m.bi.numpy(), kind="stable")[:3]))
    with pytest.raises(ValueError, match="k must"):
        m.recommend(users, k=0)


def test_recommend_pads_with_minus_inf_when_user_saw_everything():
    data = np.array([[1, 1, 5], [1, 2, 3], [2, 1, 4]], dtype=float)
    m = MeanRecommender().fit(data)
    ids, scores = m.recommend([1], k=2)
    assert np.all(np.isinf(scores[0])) and scores.shape == (1, 2)


def test_not_fitted_and_bad_config_errors():
    with pytest.raises(RuntimeError, match="fit"):
        MeanRecommender().predict([1], [1])
    with pytest.raises(ValueError, match="lr"):
        SVDRecommender(lr=-1.0)
    with pytest.raises(ValueError, match="zero ratings"):
        MeanRecommender().fit(np.zeros((0, 3)))


@needs_ml100k
def test_surprise_like_svd_on_ml100k_u1():
    train, test = load_movielens_100k_split("u1")
    svd = SVDRecommender(n_epochs=5, seed=0).fit(train)  # a short run: Surprise's defaults otherwise
    err = np.sqrt(np.mean((svd.predict(test.users, test.items) - test.ratings) ** 2))
    mean_err = np.sqrt(np.mean((MeanRecommender().fit(train).predict(test.users, test.items) - test.ratings) ** 2))
    assert 0.9 < err < 1.0 and mean_err < 0.97  # u1 is the hardest of the five folds
