"""The kernelised item autoencoder: kernel maths, shapes, learning, determinism, API contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cmc_helpers import low_rank_ratings

from cmc_rec import AutoencoderConfig, KernelAutoencoderRecommender, MeanRecommender, Ratings, random_split
from cmc_rec.autoencoder import KernelAutoencoder, KernelLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (tests/conftest.py)

SMALL = dict(hidden=16, num_hidden_layers=1, l2=1.0, kernel_l2=0.01, epochs=30, iters_per_epoch=5, patience=30)


def test_kernel_is_finite_support_and_matches_formula():
    layer = KernelLinear(4, 3, kernel_dim=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.u.copy_(torch.tensor([[[0.0, 0.0]], [[0.5, 0.0]], [[2.0, 0.0]], [[0.0, 0.3]]]))  # (4, 1, 2)
        layer.v.copy_(torch.zeros(1, 3, 2))
    k = layer.kernel()  # (4, 3)
    assert torch.allclose(k[:, 0], torch.tensor([1.0, 0.75, 0.0, 0.91]))  # max(0, 1 - d^2); far pairs are cut
    x = torch.randn(5, 4)
    assert torch.allclose(layer(x), x @ (layer.weight * k) + layer.bias)
    assert torch.allclose(layer(x.to_sparse()), layer(x), atol=1e-6)  # the sparse (graph) path


def test_autoencoder_shapes_and_penalty():
    cfg = AutoencoderConfig(hidden=8, num_hidden_layers=2)
    model = KernelAutoencoder(num_users=11, config=cfg)
    ratings = torch.zeros(7, 11)
    ratings[0, 3] = 4.0
    assert model.encode(ratings).shape == (7, 8) and model(ratings.to_sparse()).shape == (7, 11)
    p = model.penalty()
    assert p.item() > 0 and p.requires_grad


def test_learns_low_rank_ratings_better_than_the_mean():
    train, test = random_split(Ratings.from_any(low_rank_ratings()), 0.2, seed=0)
    ae = KernelAutoencoderRecommender(AutoencoderConfig(**SMALL)).fit(train)
    mean = MeanRecommender().fit(train)
    err = lambda m: np.sqrt(np.mean((m.predict(test.users, test.items) - test.ratings) ** 2))  # noqa: E731
    assert err(ae) < 0.9 * err(mean)
    assert ae.best_epoch >= 1 and len(ae.history) >= ae.best_epoch and np.isfinite(ae.val_rmse)


def test_seeded_and_api_contract():
    data = low_rank_ratings()
    cfg = AutoencoderConfig(**{**SMALL, "epochs": 3})
    a = KernelAutoencoderRecommender(cfg).fit(data)
    b = KernelAutoencoderRecommender(cfg).fit(data)
    assert np.array_equal(a.predict(data[:20, 0], data[:20, 1]), b.predict(data[:20, 0], data[:20, 1]))
    pred = a.predict([100, -1, -1], [5, 5, -9])  # known pair, unknown user, both unknown
    assert pred.shape == (3,) and pred.dtype == np.float32 and np.all((pred >= 1) & (pred <= 5))
    assert pred[2] == pytest.approx(np.clip(data[:, 2].mean(), 1, 5))
    ids, scores = a.recommend([100, 107], k=5)
    assert ids.shape == (2, 5) and np.all(np.diff(scores, axis=1) <= 0)
    seen = set(data[data[:, 0] == 100, 1])
    assert not seen & set(ids[0])
    # the dense-free scoring path agrees with the full reconstruction
    u, i = a.user_map.to_index(data[:5, 0]), a.item_map.to_index(data[:5, 1])
    full = a._score_all(u)  # (5, I)
    assert np.allclose(a._score(u, i), full[np.arange(5), i], atol=1e-5)


@pytest.mark.parametrize("bad", [dict(hidden=0), dict(l2=-1.0), dict(epochs=0), dict(val_fraction=1.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AutoencoderConfig(**bad)


def test_ensemble_averages_members_fitted_with_consecutive_seeds():
    data = low_rank_ratings()
    single = {**SMALL, "epochs": 3}
    a = KernelAutoencoderRecommender(AutoencoderConfig(**single, seed=0)).fit(data)
    b = KernelAutoencoderRecommender(AutoencoderConfig(**single, seed=1)).fit(data)
    ens = KernelAutoencoderRecommender(AutoencoderConfig(**single, ensemble=2, seed=0)).fit(data)
    users, items = data[:30, 0], data[:30, 1]
    pa, pb = a.predict(users, items), b.predict(users, items)
    assert not np.allclose(pa, pb)  # the members differ (seeded init and validation carve)
    assert np.allclose(ens.predict(users, items), (pa + pb) / 2, atol=1e-5)
    assert len(ens.members) == 2 and ens.val_rmse == pytest.approx((a.val_rmse + b.val_rmse) / 2)
    with pytest.raises(ValueError, match="ensemble"):
        AutoencoderConfig(ensemble=0)


def test_rating_scale_does_not_change_the_fit():
    """Ratings 20x larger (20-100) train the same networks as 1-5: the regularisers keep their meaning."""
    data = low_rank_ratings()
    wide = data.copy()
    wide[:, 2] = data[:, 2] * 20
    cfg = AutoencoderConfig(**{**SMALL, "epochs": 3})
    a = KernelAutoencoderRecommender(cfg).fit(data)
    b = KernelAutoencoderRecommender(cfg).fit(wide)
    assert a._scale == 1.0 and b._scale == 20.0
    pa, pb = a.predict(data[:30, 0], data[:30, 1]), b.predict(data[:30, 0], data[:30, 1])
    assert np.allclose(pb, 20 * pa, rtol=1e-4)
    assert b.val_rmse == pytest.approx(20 * a.val_rmse, rel=1e-4)


def test_user_based_autoencoder_is_the_item_based_one_on_the_transposed_matrix():
    data = low_rank_ratings()
    cfg = AutoencoderConfig(**{**SMALL, "epochs": 3})
    user = KernelAutoencoderRecommender(AutoencoderConfig(**{**SMALL, "epochs": 3}, user_based=True)).fit(data)
    swapped = KernelAutoencoderRecommender(cfg).fit(data[:, [1, 0, 2]])  # users <-> items
    assert user.members[0].codes.shape[0] == len(np.unique(data[:, 0]))  # one code per user
    users, items = data[:40, 0], data[:40, 1]
    assert np.allclose(user.predict(users, items), swapped.predict(items, users), atol=1e-5)
    u, i = user.user_map.to_index(users), user.item_map.to_index(items)
    assert np.allclose(user._score(u, i), user._score_all(u)[np.arange(40), i], atol=1e-5)
    train, test = random_split(Ratings.from_any(data), 0.2, seed=0)
    fitted = KernelAutoencoderRecommender(AutoencoderConfig(**SMALL, user_based=True)).fit(train)
    mean = MeanRecommender().fit(train)
    err = lambda m: np.sqrt(np.mean((m.predict(test.users, test.items) - test.ratings) ** 2))  # noqa: E731
    assert err(fitted) < err(mean)
