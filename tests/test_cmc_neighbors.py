"""Item kNN on baseline residuals: learning, the scoring paths, the neighbourhood size, config errors."""

from __future__ import annotations

import numpy as np
import pytest
from cmc_helpers import low_rank_ratings

from cmc_rec import KNNBaselineRecommender, MeanRecommender, NeighborConfig, Ratings, random_split
from cmc_rec.recommender import damped_biases


def rmse(model, test):
    return float(np.sqrt(np.mean((model.predict(test.users, test.items) - test.ratings) ** 2)))


def test_learns_low_rank_ratings_better_than_the_biases():
    train, test = random_split(Ratings.from_any(low_rank_ratings()), 0.2, seed=0)
    knn = KNNBaselineRecommender(NeighborConfig(k=20, shrink=10.0)).fit(train)
    assert rmse(knn, test) < 0.9 * rmse(MeanRecommender().fit(train), test)


def test_pair_and_all_item_scores_agree_and_batches_do_not_matter():
    data = low_rank_ratings()
    a = KNNBaselineRecommender(NeighborConfig(k=10, batch_size=7)).fit(data)
    b = KNNBaselineRecommender(NeighborConfig(k=10)).fit(data)
    u, i = a.user_map.to_index(data[:50, 0]), a.item_map.to_index(data[:50, 1])
    assert np.allclose(a._score(u, i), a._score_all(u)[np.arange(50), i], atol=1e-5)
    assert np.allclose(a._score(u, i), b._score(u, i), atol=1e-6)
    ids, scores = a.recommend([100, 107], k=5)
    assert ids.shape == (2, 5) and np.all(np.diff(scores, axis=1) <= 0)
    assert not set(data[data[:, 0] == 100, 1]) & set(ids[0])  # seen items excluded


def test_neighbourhood_is_the_k_most_similar_positive_items():
    data = low_rank_ratings()
    one = KNNBaselineRecommender(NeighborConfig(k=1)).fit(data)
    assert np.all((one._sim > 0).sum(1) <= 1) and np.all(one._sim >= 0)
    wide = KNNBaselineRecommender(NeighborConfig(k=10_000)).fit(data)  # k above the catalog: every positive item
    assert np.all(np.diag(wide._sim) == 0)
    best = wide._sim.argmax(1)
    assert np.all((one._sim.argmax(1) == best) | (one._sim.max(1) == 0))


def test_a_user_without_rated_neighbours_gets_the_baseline_and_unknown_ids_fall_back():
    # two disjoint blocks: items of block A have no co-raters with block B, so no neighbours there
    data = np.array([[1, 10, 5], [1, 11, 4], [2, 10, 4], [2, 11, 5], [3, 20, 1], [3, 21, 2], [4, 20, 2], [4, 21, 1]],
                    float)
    knn = KNNBaselineRecommender().fit(data)
    u, i = knn.user_map.to_index(data[:, 0]), knn.item_map.to_index(data[:, 1])
    mu = data[:, 2].mean()
    bu, bi = damped_biases(u, i, data[:, 2], 4, 4, mu)
    pred = knn.predict([1], [20])  # user 1 rated nothing near item 20
    assert pred[0] == pytest.approx(mu + bu[0] + bi[knn.item_map.to_index(np.array([20]))[0]], abs=1e-5)
    assert knn.predict([99], [99])[0] == pytest.approx(mu)  # both unknown: the global mean


@pytest.mark.parametrize("bad", [dict(k=0), dict(shrink=-1.0), dict(batch_size=0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        NeighborConfig(**bad)
