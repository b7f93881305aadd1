"""Shared fixtures-as-functions of the cmc_rec tests."""

from __future__ import annotations

import numpy as np


def low_rank_ratings(n_users=60, n_items=40, rank=3, density=0.5, seed=0):
    """(n, 3) user, item, rating of a seeded low-rank 1-5 matrix, ids offset so they are not indices."""
    rng = np.random.default_rng(seed)
    u, i = rng.normal(size=(n_users, rank)), rng.normal(size=(n_items, rank))
    full = np.clip(np.round(3 + 1.2 * (u @ i.T) / np.sqrt(rank)), 1, 5)
    uu, ii = np.nonzero(rng.random((n_users, n_items)) < density)
    return np.stack([uu * 7 + 100, ii * 3 + 5, full[uu, ii]], axis=1).astype(np.float64)
