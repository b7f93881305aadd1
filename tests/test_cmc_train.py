"""Trainer: validation split, early stopping, atomic checkpoints, exact resume; CMCRecommender."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cmc_rec import CMCConfig, CMCRecommender, LossConfig, MeanRecommender, TrainConfig, temperature_sweep
from cmc_rec.data import Ratings, holdout_indices, random_split
from cmc_rec.model import ContrastiveMatrixModel
from cmc_rec.recommender import damped_biases
from cmc_rec.train import Trainer, atomic_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (tests/conftest.py)


def low_rank(n_users=50, n_items=30, rank=2, density=0.5, seed=0):
    rng = np.random.default_rng(seed)
    u, i = rng.normal(size=(n_users, rank)), rng.normal(size=(n_items, rank))
    full = np.clip(np.round(3 + 1.3 * (u @ i.T) / np.sqrt(rank)), 1, 5)
    uu, ii = np.nonzero(rng.random((n_users, n_items)) < density)
    return np.stack([uu, ii, full[uu, ii]], axis=1).astype(np.float64)


def small_config(**train):
    """MCCL's graph model alone (no ranking model, no autoencoder): the pre-ranking CMC."""
    return CMCConfig(ranking=None, autoencoder=None, graph_rating=True, rank_by="blend", embedding_dim=8, num_layers=1, attention_dim=4, node_dropout=0.0,
                     loss=LossConfig(l2=0.01, contrast_batch=64),
                     train=TrainConfig(**{"epochs": 30, "batch_size": 256, "lr": 0.03, "patience": 5,
                                          "view_nodes": 32, "cpu": True, **train}))


def _model_and_data():
    data = low_rank()
    u, i, r = data[:, 0].astype(int), data[:, 1].astype(int), data[:, 2].astype(np.float32)
    m = ContrastiveMatrixModel(50, 30, 8, num_layers=1, attention_dim=4, num_levels=5, global_mean=float(r.mean()))
    m.attach_graph(u, i, (r - 1).astype(int))
    return m, (u, i, r), (u[:20], i[:20], r[:20])


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=256, lr=0.02, patience=100, view_nodes=16, cpu=True)
    m_full, train, val = _model_and_data()
    Trainer(cfg, LossConfig()).fit(m_full, train, val)

    cfg_ckpt = TrainConfig(**{**cfg.__dict__, "checkpoint_dir": str(tmp_path / "ck")})

    def stop_after_2(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    m_a, _, _ = _model_and_data()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg_ckpt, LossConfig()).fit(m_a, train, val, callback=stop_after_2)
    assert torch.load(tmp_path / "ck" / "last.pt", weights_only=False)["state"]["epoch"] == 2
    m_b, _, _ = _model_and_data()  # fresh process state: new model, new trainer
    res = Trainer(cfg_ckpt, LossConfig()).fit(m_b, train, val)
    assert res.epochs_run == 4 and len(res.history) == 4
    for (name, a), b in zip(m_full.state_dict().items(), m_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last.pt", "previous.pt"]  # no temp files
    other = TrainConfig(**{**cfg_ckpt.__dict__, "lr": 0.5})
    with pytest.raises(ValueError, match="another config"):
        Trainer(other, LossConfig()).fit(_model_and_data()[0], train, val)


def test_atomic_save_keeps_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"a": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - any pickling error
        atomic_save({"bad": lambda: 0}, path)
    assert torch.load(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_early_stopping_keeps_best_validation_epoch():
    m, train, val = _model_and_data()
    cfg = TrainConfig(epochs=100, batch_size=4096, lr=0.3, patience=3, view_nodes=16, cpu=True)
    res = Trainer(cfg, LossConfig(l2=0.0)).fit(m, train, val)
    vals = [h["val_rmse"] for h in res.history]
    assert res.epochs_run < 100 and res.best_epoch == int(np.argmin(vals)) + 1
    assert res.epochs_run - res.best_epoch == 3
    from cmc_rec.train import evaluate_rmse

    assert evaluate_rmse(m, *val) == pytest.approx(min(vals), abs=1e-5)  # best weights restored


def test_cmc_recommender_learns_and_never_sees_the_test_set():
    data = Ratings.from_any(low_rank())
    train, test = random_split(data, 0.2, seed=1)
    cmc = CMCRecommender(small_config(seed=3)).fit(train)
    mean = MeanRecommender().fit(train)
    err = lambda m: np.sqrt(np.mean((m.predict(test.users, test.items) - test.ratings) ** 2))  # noqa: E731
    assert err(cmc) < err(mean)
    assert cmc.result.best_val_rmse < 2.0 and 1 <= cmc.result.best_epoch <= cmc.result.epochs_run
    ids, scores = cmc.recommend(np.unique(train.users)[:5], k=4)
    assert ids.shape == (5, 4) and np.all(np.isfinite(scores))
    seen = set(zip(train.users.tolist(), train.items.tolist()))
    assert not any((u, i) in seen for u, row in zip(np.unique(train.users)[:5].tolist(), ids.tolist()) for i in row)
    p = cmc.predict([10_000, train.users[0]], [train.items[0], 10_000])
    assert np.all((p >= 1) & (p <= 5))
    users = np.unique(train.users)
    ranked = {}
    for rank_by, weight in [("preference", 0.1), ("rating", 0.1), ("blend", 0.0), ("blend", 1e6)]:
        cmc.config.rank_by, cmc.config.blend_weight = rank_by, weight
        ranked[(rank_by, weight)] = cmc.recommend(users, k=3)[0]
    assert np.array_equal(ranked[("blend", 0.0)], ranked[("preference", 0.1)])  # weight 0: cosine only
    assert np.array_equal(ranked[("blend", 1e6)], ranked[("rating", 0.1)])  # huge weight: rating order


def test_cmc_is_seeded():
    data = low_rank()
    cfg = small_config(seed=7, epochs=3)
    a = CMCRecommender(cfg).fit(data).predict(data[:10, 0], data[:10, 1])
    b = CMCRecommender(cfg).fit(data).predict(data[:10, 0], data[:10, 1])
    assert np.array_equal(a, b)


def test_temperature_sweep_and_config_errors():
    rows = temperature_sweep(low_rank(), [0.07, 0.2], small_config(epochs=2), val_fraction=0.2, seed=0, k=5)
    assert [r["temperature"] for r in rows] == [0.07, 0.2] and all(np.isfinite(r["rmse"]) for r in rows)
    with pytest.raises(ValueError, match="temperatures"):
        temperature_sweep(low_rank(), [], small_config())
    with pytest.raises(ValueError, match="rank_by"):
        CMCConfig(rank_by="popularity")
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_standardize_makes_training_scale_free():
    data = low_rank()
    scaled = data.copy()
    scaled[:, 2] = scaled[:, 2] * 20.0  # a 20-100 scale, like YahooMusic's 1-100
    cfg = small_config(seed=5, epochs=3)
    cfg.standardize = True
    a = CMCRecommender(cfg).fit(data)
    b = CMCRecommender(cfg).fit(scaled)
    pa, pb = a.predict(data[:30, 0], data[:30, 1]), b.predict(data[:30, 0], data[:30, 1])
    assert np.allclose(pb, 20.0 * pa, rtol=1e-4, atol=1e-3)
    assert np.array_equal(a.recommend(data[:5, 0], k=3)[0], b.recommend(data[:5, 0], k=3)[0])


def test_autoencoder_rating_head_blends_on_validation_and_keeps_ranking():
    from cmc_rec import AutoencoderConfig

    train, test = random_split(Ratings.from_any(low_rank()), 0.2, seed=0)
    plain = CMCRecommender(small_config()).fit(train)
    ae_cfg = AutoencoderConfig(hidden=16, num_hidden_layers=1, l2=1.0, kernel_l2=0.01, epochs=10, patience=10)
    hybrid = CMCRecommender(dataclasses.replace(small_config(), autoencoder=ae_cfg, user_autoencoder=None,
                                                neighbors=None)).fit(train)
    w0, w_bias, w1, w2 = hybrid.head_weights  # fitted on CMC's validation split
    u, i = hybrid.user_map.to_index(test.users), hybrid.item_map.to_index(test.items)
    known = (u >= 0) & (i >= 0)
    graph = plain.predict(test.users, test.items)[known]  # same seed: the same graph model
    ae = hybrid.autoencoder.predict(u[known], i[known])
    # the bias column: damped biases of the part the heads were fitted on (the validation carve removed)
    tu, ti = hybrid.user_map.to_index(train.users), hybrid.item_map.to_index(train.items)
    tr, _ = holdout_indices(len(train), hybrid.config.train.val_fraction, seed=hybrid.config.train.seed)
    mu = float(train.ratings[tr].mean())
    bu, bi = damped_biases(tu[tr], ti[tr], train.ratings[tr], hybrid.n_users, hybrid.n_items, mu)
    bias = mu + bu[u[known]] + bi[i[known]]
    expected = np.clip(w0 + w_bias * bias + w1 * graph + w2 * ae, 1, 5)
    assert np.allclose(hybrid.predict(test.users, test.items)[known], expected, atol=1e-4)
    rmse = lambda p: np.sqrt(np.mean((p - test.ratings[known]) ** 2))  # noqa: E731
    assert rmse(hybrid.predict(test.users, test.items)[known]) < rmse(graph)
    ids_p, _ = plain.recommend(test.users[:5], k=5)
    ids_h, _ = hybrid.recommend(test.users[:5], k=5)
    assert np.array_equal(ids_p, ids_h)  # recommend() ranks with the graph model only
    # graph_head(): the hybrid's graph model alone is the plain model, without a refit
    head = hybrid.graph_head()
    assert head.autoencoder is None and head.config.autoencoder is None and hybrid.autoencoder is not None
    assert np.array_equal(head.predict(test.users, test.items), plain.predict(test.users, test.items))
    assert np.array_equal(head.recommend(test.users[:5], k=5)[0], ids_p)
    assert set(hybrid.timings) == {"graph", "autoencoder"} and set(head.timings) == {"graph"}
    head.config.rank_by = "rating"  # the head's config is its own (the benchmark relies on it)
    assert hybrid.config.rank_by == "blend"
    with pytest.raises(RuntimeError, match="not fitted"):
        CMCRecommender(small_config()).graph_head()
