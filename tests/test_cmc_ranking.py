"""Ranking: the baselines (popularity, ItemKNN, EASE), the tuning helper, and CMC's InfoNCE ranking model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cmc_rec import CMCConfig, CMCRecommender, evaluate
from cmc_rec.baselines import EASE, ItemKNN, MostPopular
from cmc_rec.data import Ratings
from cmc_rec.metrics import catalog_coverage
from cmc_rec.ranking import RankingConfig
from cmc_rec.tuning import grid_points, per_user_split, tune

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (tests/conftest.py)


def clustered(n_users=60, n_items=40, n_groups=4, seed=0):
    """Users of group g rate (mostly) items of group g, high; a few random low ratings elsewhere."""
    rng = np.random.default_rng(seed)
    gu, gi = np.arange(n_users) % n_groups, np.arange(n_items) % n_groups
    rows = []
    for u in range(n_users):
        own = np.flatnonzero(gi == gu[u])
        for i in rng.choice(own, size=len(own) * 3 // 5, replace=False):
            rows.append((u + 1, i + 101, rng.choice([4.0, 5.0])))
        for i in rng.choice(np.flatnonzero(gi != gu[u]), size=2, replace=False):
            rows.append((u + 1, i + 101, rng.choice([1.0, 2.0])))
    return Ratings.from_any(np.array(rows))


def tiny_ranking(**kw):
    return RankingConfig(**{"embedding_dim": 16, "epochs": 40, "batch_size": 256, "lr": 0.03, "min_rating": 4.0, **kw})


def scores_of(cmc, users):
    """(users, I) recommend() scores of every item, columns in item-index order."""
    ids, scores = cmc.recommend(users, k=cmc.n_items, exclude_seen=False)
    out = np.empty_like(scores)
    np.put_along_axis(out, cmc.item_map.to_index(ids), scores, 1)
    return out


def test_per_user_split_holds_out_a_share_of_every_user():
    data = clustered()
    fit, val = per_user_split(data, 0.25, seed=1)
    assert len(fit) + len(val) == len(data)
    counts = {u: (data.users == u).sum() for u in np.unique(data.users)}
    for u, n in counts.items():
        assert (val.users == u).sum() == max(1, round(0.25 * n))
    pairs = lambda r: set(zip(r.users.tolist(), r.items.tolist()))  # noqa: E731
    assert not pairs(fit) & pairs(val)
    again, _ = per_user_split(data, 0.25, seed=1)
    other, _ = per_user_split(data, 0.25, seed=2)
    assert pairs(again) == pairs(fit) and pairs(other) != pairs(fit)
    with pytest.raises(ValueError, match="fraction"):
        per_user_split(data, 1.0)


def test_baselines_rank_the_users_own_cluster_and_popularity_is_counts():
    data = clustered()
    train, test = per_user_split(data, 0.3, seed=0)
    for model in (ItemKNN(k=10, min_rating=4.0), EASE(reg=5.0, min_rating=4.0)):  # learn from the liked items
        res = evaluate(model.fit(train), train, test, k=5)
        assert res.recall > 0.8 and np.isnan(res.rmse)  # ranking-only: no RMSE
        with pytest.raises(TypeError, match="predicts no rating"):
            model.predict(train.users[:1], train.items[:1])
    pop = MostPopular().fit(train)
    ids, scores = pop.recommend([train.users[0]], k=3, exclude_seen=False)
    counts = {i: (train.items == i).sum() for i in np.unique(train.items)}
    assert list(scores[0]) == sorted(counts.values(), reverse=True)[:3]
    assert [counts[i] for i in ids[0]] == list(scores[0])
    assert evaluate(pop, train, test, k=5).recall < 0.5  # popularity ignores the clusters


def test_ease_matches_its_closed_form_and_knn_keeps_k_neighbours():
    data = clustered(n_users=20, n_items=12)
    ease = EASE(reg=3.0).fit(data)
    x = np.zeros((ease.n_users, ease.n_items))
    x[ease.user_map.to_index(data.users), ease.item_map.to_index(data.items)] = 1.0
    p = np.linalg.inv(x.T @ x + 3.0 * np.eye(ease.n_items))
    b = np.eye(ease.n_items) - p / np.diag(p)[None, :]  # Steck (2019): B = I - P diagMat(1 / diag P)
    users = np.unique(data.users)
    ids, scores = ease.recommend(users, k=ease.n_items, exclude_seen=False)
    expect = x @ b  # (U, I)
    got = np.take_along_axis(expect, ease.item_map.to_index(ids), 1)
    assert np.allclose(got, scores, atol=1e-4)
    knn = ItemKNN(k=2).fit(data)
    ids, _ = knn.recommend(users[:1], k=3)
    assert ids.shape == (1, 3)
    with pytest.raises(ValueError, match="reg"):
        EASE(reg=float("nan"))
    with pytest.raises(ValueError, match="min_rating"):
        ItemKNN(min_rating=float("nan"))


def test_tune_picks_the_best_validation_point_and_reports_every_one():
    data = clustered()
    grid = {"reg": [0.5, 50.0, 5000.0]}
    res = tune(lambda reg: EASE(reg, min_rating=4.0), grid, data, fraction=0.2, seed=0, metric="ndcg", k=5)
    assert [r["params"] for r in res.rows] == grid_points(grid)
    best = max(res.rows, key=lambda r: r["ndcg"])
    assert res.best == best["params"] and res.best_row is best
    assert res.best["reg"] != 5000.0  # a huge lambda flattens EASE towards popularity
    assert res.best_row["ndcg"] > min(r["ndcg"] for r in res.rows)
    with pytest.raises(ValueError, match="metric"):
        tune(EASE, grid, data, metric="auc")
    with pytest.raises(ValueError, match="non-empty"):
        grid_points({"reg": []})


def test_ranking_cmc_learns_the_clusters_and_beats_popularity():
    data = clustered()
    train, test = per_user_split(data, 0.3, seed=0)
    cfg = CMCConfig(ranking=tiny_ranking(seed=3), autoencoder=None)
    cmc = CMCRecommender(cfg).fit(train)
    res = evaluate(cmc, train, test, k=5)
    pop = evaluate(MostPopular().fit(train), train, test, k=5)
    assert res.recall > 0.8 and res.recall > pop.recall + 0.3
    assert set(cmc.timings) == {"ranking"}
    # scores are cosines of unit embeddings (with the popularity penalty switched off)
    plain = CMCRecommender(CMCConfig(ranking=tiny_ranking(seed=3, popularity_penalty=0.0), autoencoder=None)).fit(train)
    _, scores = plain.recommend(np.unique(train.users)[:4], k=5)
    assert np.all(scores <= 1.0 + 1e-5) and np.all(np.diff(scores, axis=1) <= 1e-6)
    # without a rating head, predict falls back to the damped biases (finite, in range)
    p = cmc.predict(train.users[:10], train.items[:10])
    assert np.all((p >= 1) & (p <= 5))


def test_ranking_model_is_seeded_and_the_view_term_trains():
    data = clustered()
    a = CMCRecommender(CMCConfig(ranking=tiny_ranking(seed=1, epochs=3), autoencoder=None)).fit(data)
    b = CMCRecommender(CMCConfig(ranking=tiny_ranking(seed=1, epochs=3), autoencoder=None)).fit(data)
    c = CMCRecommender(CMCConfig(ranking=tiny_ranking(seed=2, epochs=3), autoencoder=None)).fit(data)
    users = np.unique(data.users)
    sa, sb, sc = (m.recommend(users, k=5)[1] for m in (a, b, c))
    assert np.array_equal(sa, sb) and not np.array_equal(sa, sc)
    view = CMCRecommender(CMCConfig(ranking=tiny_ranking(seed=1, epochs=3, view_weight=0.5), autoencoder=None))
    view.fit(data)
    assert not np.array_equal(view.recommend(users, k=5)[1], sa)  # the augmented-view term changes training


def test_sampled_logq_softmax_learns_and_equals_full_softmax_on_uniform_items():
    data = clustered()
    train, test = per_user_split(data, 0.3, seed=0)
    cmc = CMCRecommender(CMCConfig(ranking=tiny_ranking(seed=3, negatives=16), autoencoder=None)).fit(train)
    assert evaluate(cmc, train, test, k=5).recall > 0.8
    # the loss is the cross entropy of the positive against the K sampled items, every logit
    # corrected by -log q (samples equal to the positive masked out)
    model = cmc.ranker
    users, items = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 3])
    sampled = model.loss(users, items, torch.Generator().manual_seed(5))["rank"]
    neg = torch.multinomial(model.item_q, 16, replacement=True, generator=torch.Generator().manual_seed(5))
    zu, zi = model.normalized_embeddings()
    logits = zu[users] @ zi.T / model.config.temperature - model.item_q.log()  # (3, I) corrected
    cand = torch.cat([logits[torch.arange(3), items][:, None],
                      logits[:, neg].masked_fill(neg[None, :] == items[:, None], -torch.inf)], 1)
    assert torch.allclose(sampled, (torch.logsumexp(cand, 1) - cand[:, 0]).mean(), atol=1e-5)
    with pytest.raises(ValueError, match="negatives"):
        RankingConfig(negatives=-1)


def test_full_softmax_loss_is_cross_entropy_over_every_item():
    data = clustered(n_users=8, n_items=6)
    cmc = CMCRecommender(CMCConfig(ranking=tiny_ranking(epochs=0), autoencoder=None)).fit(data)
    model = cmc.ranker
    users, items = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 3])
    out = model.loss(users, items, torch.Generator().manual_seed(0))
    zu, zi = model.normalized_embeddings()
    logits = zu[users] @ zi.T / model.config.temperature  # (3, I)
    expect = (torch.logsumexp(logits, 1) - logits[torch.arange(3), items]).mean()
    assert torch.allclose(out["rank"], expect, atol=1e-5)


def test_user_batched_loss_equals_the_pair_batched_loss_and_its_gradient():
    data = clustered(n_users=8, n_items=6)
    cmc = CMCRecommender(CMCConfig(ranking=tiny_ranking(epochs=0), autoencoder=None)).fit(data)
    model = cmc.ranker
    users, rows = torch.tensor([0, 2, 5]), torch.tensor([0, 0, 1, 2, 2])  # user 0 has two positives
    items, w = torch.tensor([1, 3, 0, 4, 1]), torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0])
    grouped = model.user_loss(users, rows, items, w, torch.Generator().manual_seed(0))["loss"]  # = rank: no l2, view
    grouped.backward()
    g_grouped, model.h0.grad = model.h0.grad.clone(), None
    pairs = model.loss(users[rows], items, torch.Generator().manual_seed(0), w)["loss"]
    pairs.backward()
    assert torch.allclose(grouped, pairs, atol=1e-6) and torch.allclose(g_grouped, model.h0.grad, atol=1e-6)
    zu, zi = model.normalized_embeddings()
    logits = zu[users[rows]] @ zi.T / model.config.temperature  # (5, I)
    expect = ((torch.logsumexp(logits, 1) - logits[torch.arange(5), items]) * w).sum() / w.sum()
    assert torch.allclose(grouped.detach(), expect, atol=1e-5)


def test_rating_weight_is_a_no_op_on_equal_ratings_and_changes_training_otherwise():
    data = clustered()
    flat = Ratings(data.users, data.items, np.full(len(data), 4.0, np.float32))
    fit = lambda d, rw: scores_of(CMCRecommender(CMCConfig(  # noqa: E731
        ranking=tiny_ranking(epochs=5, min_rating=None, rating_weight=rw), autoencoder=None)).fit(d), [1, 2, 3])
    assert np.array_equal(fit(flat, 0.0), fit(flat, 2.0))  # every weight 1 + rw * 0
    assert not np.allclose(fit(data, 0.0), fit(data, 2.0))  # 5s pull harder than 1s
    with pytest.raises(ValueError, match="rating_weight"):
        RankingConfig(rating_weight=-1.0)


def test_recommend_scores_are_the_ensemble_mean_cosine_minus_the_popularity_penalty():
    data = clustered()
    cfg = tiny_ranking(epochs=3, ensemble=2, popularity_penalty=0.05)
    cmc = CMCRecommender(CMCConfig(ranking=cfg, autoencoder=None)).fit(data)
    assert len(cmc.rankers) == 2
    cos = [m.normalized_embeddings() for m in cmc.rankers]
    users = np.unique(data.users)[:5]
    u = torch.as_tensor(cmc.user_map.to_index(users))
    members = [(zu[u] @ zi.T).numpy() for zu, zi in cos]
    assert not np.allclose(*members)  # the members have other seeds
    expect = np.mean(members, 0) - 0.05 * cmc.rankers[0].item_q.log().numpy()[None, :]
    assert np.allclose(scores_of(cmc, users), expect, atol=1e-5)


def test_layer_weights_mix_the_hops_and_are_checked():
    data = clustered(n_users=8, n_items=6)
    base = CMCRecommender(CMCConfig(ranking=tiny_ranking(epochs=0), autoencoder=None)).fit(data).ranker
    only_h0 = CMCRecommender(CMCConfig(ranking=tiny_ranking(epochs=0, layer_weights=(1, 0, 0)), autoencoder=None))
    model = only_h0.fit(data).ranker
    with torch.no_grad():
        assert torch.allclose(model.propagate(), model.h0) and not torch.allclose(base.propagate(), base.h0)
        assert torch.allclose(CMCRecommender(CMCConfig(ranking=tiny_ranking(epochs=0, layer_weights=(2, 2, 2)),
                                                       autoencoder=None)).fit(data).ranker.propagate(), base.propagate())
    with pytest.raises(ValueError, match="layer_weights"):
        RankingConfig(num_layers=2, layer_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="ensemble"):
        RankingConfig(ensemble=0)


def test_denoising_gate_starts_near_one_learns_per_rating_level_and_changes_training():
    data = clustered()
    fit = lambda **kw: CMCRecommender(CMCConfig(  # noqa: E731
        ranking=tiny_ranking(min_rating=None, ensemble=1, **kw), autoencoder=None)).fit(data)
    plain, untrained = fit(epochs=0, denoise=False), fit(epochs=0, denoise=True)
    with torch.no_grad():  # before training the gate is 2 sigmoid(small): the propagation nearly LightGCN's
        gate = untrained.ranker.edge_gate()
        assert gate.shape == (untrained.ranker.graph.num_edges,) and torch.all((gate - 1).abs() < 0.2)
        assert torch.allclose(untrained.ranker.h0, plain.ranker.h0)  # the gate's weights drawn after h0
    model = fit(epochs=20, denoise=True).ranker
    bias = model.level_bias.detach()  # one per rating level (1, 2, 4, 5 in the clustered data)
    assert len(bias) == 4 and bias[:2].mean() < bias[2:].mean()  # the off-cluster low ratings gated down
    users = [1, 2, 3]
    assert not np.allclose(scores_of(fit(epochs=5, denoise=False), users), scores_of(fit(epochs=5, denoise=True), users))
    assert RankingConfig().denoise  # the default (validation carve of u1.base)
    with pytest.raises(ValueError, match="attention_dim"):
        RankingConfig(attention_dim=0)


def test_default_cmc_ranks_and_predicts_with_the_autoencoder_head():
    from cmc_rec import AutoencoderConfig

    data = clustered()
    train, test = per_user_split(data, 0.3, seed=0)
    ae = AutoencoderConfig(hidden=16, num_hidden_layers=1, l2=1.0, kernel_l2=0.01, epochs=5, patience=5)
    user_ae = dataclasses.replace(ae, user_based=True)
    cmc = CMCRecommender(dataclasses.replace(CMCConfig(ranking=tiny_ranking()), autoencoder=ae,
                                             user_autoencoder=user_ae)).fit(train)
    assert set(cmc.timings) == {"ranking", "autoencoder", "user autoencoder", "neighbors"}
    assert cmc.head_names == ["intercept", "biases", "autoencoder", "user autoencoder", "neighbors"]
    assert len(cmc.head_weights) == 5 and cmc.user_autoencoder.config.user_based
    # predict is the blend of the heads, each fitted on the part left after CMC's validation carve
    u, i = cmc.user_map.to_index(test.users), cmc.item_map.to_index(test.items)
    known = (u >= 0) & (i >= 0)
    x = cmc._head_features(u[known], i[known])
    assert np.allclose(x[:, 4], cmc.neighbors.predict(u[known], i[known]))
    assert np.allclose(cmc.predict(test.users, test.items)[known], np.clip(x @ cmc.head_weights, 1, 5), atol=1e-5)
    res = evaluate(cmc, train, test, k=5)
    assert np.isfinite(res.rmse) and res.recall > 0.8
    # without the item autoencoder there is no blend: its partners are not fitted either
    alone = CMCRecommender(CMCConfig(ranking=tiny_ranking(), autoencoder=None, user_autoencoder=user_ae)).fit(train)
    assert set(alone.timings) == {"ranking"} and alone.user_autoencoder is None and alone.head_weights is None
    with pytest.raises(ValueError, match="user_based"):
        CMCConfig(user_autoencoder=ae)
    # no validation carve to blend on: predict is the mean of the heads
    from cmc_rec import TrainConfig

    mean = CMCRecommender(CMCConfig(ranking=tiny_ranking(epochs=0), autoencoder=ae, user_autoencoder=user_ae,
                                    train=TrainConfig(val_fraction=0.0))).fit(train)
    heads = [mean.autoencoder, mean.user_autoencoder, mean.neighbors]
    expected = np.clip(np.mean([h.predict(u[known], i[known]) for h in heads], 0), 1, 5)
    assert mean.head_weights is None
    assert np.allclose(mean.predict(test.users, test.items)[known], expected, atol=1e-5)
    assert catalog_coverage(cmc.recommend(np.unique(train.users), k=5)[0], len(np.unique(train.items))) > 0.3
    defaults = CMCConfig()
    assert defaults.rank_by == "ranking" and defaults.ranking is not None and defaults.autoencoder is not None
    assert defaults.user_autoencoder.user_based and defaults.neighbors is not None


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="temperature"):
        RankingConfig(temperature=float("nan"))
    with pytest.raises(ValueError, match="edge_dropout"):
        RankingConfig(edge_dropout=1.0)
    with pytest.raises(ValueError, match="graph_rating"):
        CMCConfig(rank_by="blend")
    with pytest.raises(ValueError, match="ranking"):
        CMCConfig(ranking=None)
    with pytest.raises(ValueError, match="min_rating"):
        CMCRecommender(CMCConfig(ranking=RankingConfig(min_rating=9.0), autoencoder=None)).fit(clustered())


def test_implicit_wrappers_rank_the_clusters_or_skip_with_the_reason():
    from cmc_rec.implicit_models import ImplicitALS, ImplicitBPR, implicit_available

    if not implicit_available():
        with pytest.raises(ImportError, match="tokenprune-diffusers\\[ranking\\]"):
            ImplicitALS().fit(clustered())
        pytest.skip("implicit is not installed (optional extra tokenprune-diffusers[ranking])")
    data = clustered()
    train, test = per_user_split(data, 0.3, seed=0)
    als = ImplicitALS(factors=8, regularization=0.1, iterations=10, min_rating=4.0, seed=0).fit(train)
    pop = evaluate(MostPopular().fit(train), train, test, k=5).recall
    assert evaluate(als, train, test, k=5).recall > max(0.6, pop + 0.3)
    a = ImplicitBPR(factors=8, iterations=5, seed=1).fit(train).recommend(np.unique(train.users)[:5], k=3)[1]
    b = ImplicitBPR(factors=8, iterations=5, seed=1).fit(train).recommend(np.unique(train.users)[:5], k=3)[1]
    assert np.array_equal(a, b)  # seeded
    with pytest.raises(ValueError, match="alpha"):
        ImplicitALS(alpha=0.0)
