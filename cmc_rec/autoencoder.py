"""A kernelised item autoencoder for rating prediction (the strongest published family on ML-100K u1).

Sparse FC (Muller et al., "Kernelized Synaptic Weight Matrices", ICML 2018) and GLocal-K (Han et
al., CIKM 2021) reconstruct each item's column of the rating matrix with an autoencoder whose
weights are multiplied by a finite-support kernel of learned 5-d positions of their two ends:
``W_eff = W * max(0, 1 - ||u_in - v_out||^2)``, with an L2 penalty on ``W`` and one on the kernel
(which makes it sparse).  Read as a graph model, the first layer is message passing over the
user-item graph: item i's code is ``sigmoid(sum_u r_ui W_eff[u] + b)``, a rating-weighted sum of
per-user vectors over i's edges (a sparse matmul here); the last layer is a dot product of the item
code with a per-user output vector.  This is GLocal-K's local-kernel pre-training stage only (its
global-kernel fine-tuning is not implemented), trained full-batch with L-BFGS as both papers do.

Unlike the public GLocal-K code, which keeps the epoch with the lowest *test* RMSE, ``fit`` keeps
the epoch with the lowest RMSE on a seeded validation split carved out of the training ratings.
Ratings are divided by ``(max - min) / 4`` before training (1 on a 1-5 scale), so the two L2
weights mean the same on YahooMusic's 1-100.  Memory: the output layer is evaluated densely,
(items x users) floats (ML-1M: 22 M).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._util import check_number, rating_scale, show_progress
from .data import holdout_indices
from .metrics import rmse
from .recommender import BaseRecommender, damped_biases

__all__ = ["AutoencoderConfig", "KernelAutoencoder", "KernelAutoencoderRecommender"]

logger = logging.getLogger(__name__)


@dataclass
class AutoencoderConfig:
    hidden: int = 500  # units of each hidden layer (both papers)
    num_hidden_layers: int = 2  # GLocal-K: 2
    kernel_dim: int = 5  # dimension of the learned kernel positions (both papers)
    l2: float = 20.0  # lambda_2, L2 on the weights (GLocal-K's ML-100K value)
    kernel_l2: float = 0.006  # lambda_s, L2 on the kernel values (GLocal-K's ML-100K value)
    epochs: int = 40  # outer epochs; each runs `iters_per_epoch` L-BFGS iterations, then validates
    iters_per_epoch: int = 5  # GLocal-K: 5 on ML-100K
    patience: int = 8  # stop after this many epochs without a better validation RMSE
    val_fraction: float = 0.05  # validation split carved (seeded) out of the training ratings
    ensemble: int = 1  # average this many autoencoders (seeds seed, seed+1, ...; each its own validation carve)
    user_based: bool = False  # reconstruct each user's row of ratings (U-AutoRec) instead of each item's column
    seed: int = 0
    progress: bool | None = None  # tqdm bar over each member's epochs; None: when stderr is a terminal

    def __post_init__(self) -> None:
        for name in ("hidden", "num_hidden_layers", "kernel_dim", "epochs", "iters_per_epoch", "patience", "ensemble"):
            check_number(f"AutoencoderConfig.{name}", getattr(self, name), low=1, integer=True)
        check_number("AutoencoderConfig.seed", self.seed, integer=True)
        check_number("AutoencoderConfig.l2", self.l2, low=0.0)
        check_number("AutoencoderConfig.kernel_l2", self.kernel_l2, low=0.0)
        check_number("AutoencoderConfig.val_fraction", self.val_fraction, low=0.0, high=1.0, high_open=True)


class KernelLinear(nn.Module):
    """``x @ (W * K) + b`` with ``K[a, b] = max(0, 1 - ||u_a - v_b||^2)`` (learned positions u, v)."""

    def __init__(self, n_in: int, n_out: int, kernel_dim: int, generator: torch.Generator) -> None:
        super().__init__()
        bound = (6.0 / (n_in + n_out)) ** 0.5  # Glorot uniform, as the papers' TensorFlow default
        self.weight = nn.Parameter((torch.rand(n_in, n_out, generator=generator) * 2 - 1) * bound)  # (in, out)
        self.bias = nn.Parameter(torch.zeros(n_out))  # (out,)
        self.u = nn.Parameter(torch.randn(n_in, 1, kernel_dim, generator=generator) * 1e-3)  # (in, 1, k)
        self.v = nn.Parameter(torch.randn(1, n_out, kernel_dim, generator=generator) * 1e-3)  # (1, out, k)

    def kernel(self) -> torch.Tensor:
        u, v = self.u.squeeze(1), self.v.squeeze(0)  # (in, k), (out, k)
        # ||u_a - v_b||^2 expanded: one small matmul instead of an (in, out, k) difference tensor
        dist2 = u.pow(2).sum(1, keepdim=True) + v.pow(2).sum(1) - 2.0 * (u @ v.T)  # (in, out)
        return torch.clamp(1.0 - dist2.clamp(min=0.0), min=0.0)  # (in, out)

    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.kernel()  # (in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()  # (in, out)
        return (torch.sparse.mm(x, w) if x.is_sparse else x @ w) + self.bias  # (n, out)


class KernelAutoencoder(nn.Module):
    """Item-based autoencoder: an item's ratings by all users (U,) -> its code (H,) -> ratings (U,).

    Shapes: ``encode(R)`` with R the (I, U) rating matrix (sparse or dense, 0 = unrated) -> (I, H);
    ``forward(R)`` -> (I, U) reconstructed ratings.
    """

    def __init__(self, num_users: int, config: AutoencoderConfig) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(config.seed)
        dims = [num_users] + [config.hidden] * config.num_hidden_layers
        self.encoder = nn.ModuleList(
            KernelLinear(dims[k], dims[k + 1], config.kernel_dim, g) for k in range(config.num_hidden_layers)
        )
        self.decoder = KernelLinear(config.hidden, num_users, config.kernel_dim, g)
        self.config = config

    def encode(self, ratings: torch.Tensor) -> torch.Tensor:
        h = ratings  # (I, U)
        for layer in self.encoder:
            h = torch.sigmoid(layer(h))  # (I, H)
        return h

    def forward(self, ratings: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(ratings))  # (I, U)

    def penalty(self) -> torch.Tensor:
        """``l2/2 * sum ||W||^2 + kernel_l2/2 * sum ||K||^2`` over every layer."""
        layers = [*self.encoder, self.decoder]
        w2 = sum(layer.weight.pow(2).sum() for layer in layers)
        k2 = sum(layer.kernel().pow(2).sum() for layer in layers)
        return 0.5 * self.config.l2 * w2 + 0.5 * self.config.kernel_l2 * k2


class KernelAutoencoderRecommender(BaseRecommender):
    """The kernelised item autoencoder behind the shared recommender API (``fit`` -> self).

    With ``config.ensemble = n`` it averages n autoencoders fitted with seeds ``seed .. seed+n-1``
    (each with its own seeded validation carve): on ML-100K u1, 3 members cut the test RMSE by
    about 0.008 against one.  Unknown users / items fall back to damped biases (as
    :class:`MeanRecommender`); top-K ranks by predicted rating.
    """

    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or AutoencoderConfig()
        self.members: list[_Member] = []

    @property
    def val_rmse(self) -> float:
        """Mean over members of each one's best validation RMSE, in rating units (nan without a carve)."""
        return float(np.mean([m.val_rmse for m in self.members])) * self._scale

    @property
    def best_epoch(self) -> int:  # first member's (the one a single-model fit has)
        return self.members[0].best_epoch

    @property
    def history(self) -> list[float]:  # first member's validation RMSE after each epoch
        return self.members[0].history

    def _sides(self, u, i) -> tuple:
        """(rows, columns, number of rows, of columns): items x users, or users x items when user-based."""
        if self.config.user_based:
            return u, i, self.n_users, self.n_items
        return i, u, self.n_items, self.n_users

    def _matrix(self, u: np.ndarray, i: np.ndarray, r: np.ndarray) -> torch.Tensor:
        rows, cols, n_rows, n_cols = self._sides(u, i)
        idx = torch.as_tensor(np.stack([rows, cols]), dtype=torch.long)  # (2, E)
        return torch.sparse_coo_tensor(idx, torch.as_tensor(r), (n_rows, n_cols), check_invariants=True).coalesce()

    def _fit(self, u, i, r) -> None:
        c = self.config
        self._bias = damped_biases(u, i, r, self.n_users, self.n_items, self.global_mean)  # fallback
        # the networks see r / scale: 1 on a 1-5 scale, so l2 / kernel_l2 keep their meaning on
        # other scales (YahooMusic's 1-100: 24.75); predictions are multiplied back
        self._scale = rating_scale(*self.rating_range)
        self.members = [self._fit_member(u, i, r / self._scale, c.seed + k, f"autoencoder {k + 1}/{c.ensemble}")
                        for k in range(c.ensemble)]

    def _fit_member(self, u, i, r, seed: int, desc: str) -> _Member:
        from tqdm import tqdm  # plain tqdm: tqdm.auto probes for IPython / widgets, seconds of imports

        c = dataclasses.replace(self.config, seed=seed)
        tr, va = holdout_indices(len(r), c.val_fraction, seed=seed)
        inputs = self._matrix(u[tr], i[tr], r[tr])  # (I, U) sparse, the training graph ((U, I) user-based)
        rows, cols, _, n_cols = self._sides(u, i)
        ti, tu = torch.as_tensor(rows[tr]), torch.as_tensor(cols[tr])
        target = torch.as_tensor(r[tr])
        vi, vu, vr = torch.as_tensor(rows[va]), torch.as_tensor(cols[va]), torch.as_tensor(r[va])
        lo, hi = (x / self._scale for x in self.rating_range)
        model = KernelAutoencoder(n_cols, c)
        opt = torch.optim.LBFGS(model.parameters(), max_iter=c.iters_per_epoch, history_size=10,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            out = model(inputs)  # (I, U)
            loss = 0.5 * (out[ti, tu] - target).pow(2).sum() + model.penalty()
            loss.backward()
            return loss

        best, best_state, since, best_epoch, history = float("inf"), None, 0, 0, []
        bar = tqdm(range(1, c.epochs + 1), desc=desc, disable=not show_progress(c.progress))
        for epoch in bar:
            opt.step(closure)
            if len(va) == 0:
                best_epoch = epoch
                continue
            with torch.no_grad():
                pred = model(inputs)[vi, vu].clamp(lo, hi)  # (V,)
                val = rmse(vr.numpy(), pred.numpy()) if torch.isfinite(pred).all() else float("inf")
            history.append(val)
            bar.set_postfix(val=f"{val * self._scale:.4f}")
            if val < best:
                best, best_state, since, best_epoch = val, copy.deepcopy(model.state_dict()), 0, epoch
            else:
                since += 1
                if since >= c.patience:
                    bar.set_postfix(val=f"{val * self._scale:.4f}", stopped=f"early, best epoch {best_epoch}")
                    logger.info("%s: early stopping at epoch %d (no better validation RMSE for %d epochs); "
                                "keeping epoch %d (RMSE %.4f)", desc, epoch, c.patience, best_epoch,
                                best * self._scale)
                    break
        bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            codes = model.encode(inputs)  # (I, H)
            out_w = model.decoder.effective_weight()  # (H, U)
            bias = model.decoder.bias.detach().clone()  # (U,)
        return _Member(codes, out_w, bias, best if len(va) else float("nan"), best_epoch, history)

    def _score(self, u, i):
        rows, cols, _, _ = self._sides(torch.as_tensor(u), torch.as_tensor(i))
        scores = [((m.codes[rows] * m.out_w[:, cols].T).sum(1) + m.bias[cols]).numpy() for m in self.members]  # (n,)
        return np.mean(scores, 0) * self._scale

    def _score_all(self, u):
        u = torch.as_tensor(u)
        if self.config.user_based:
            scores = [(m.codes[u] @ m.out_w + m.bias).numpy() for m in self.members]  # (B, I) each
        else:
            scores = [(m.codes @ m.out_w[:, u] + m.bias[u]).T.numpy() for m in self.members]  # (B, I) each
        return np.mean(scores, 0) * self._scale

    def _user_bias(self, u):
        return self._bias[0][u]

    def _item_bias(self, i):
        return self._bias[1][i]


@dataclass
class _Member:
    """One fitted autoencoder, kept as what scoring needs: item codes, output weights and bias."""

    codes: torch.Tensor  # (I, H) ((U, H) user-based)
    out_w: torch.Tensor  # (H, U) effective (kernel-masked) decoder weight ((H, I) user-based)
    bias: torch.Tensor  # (U,) ((I,) user-based)
    val_rmse: float  # best validation RMSE, in units of r / scale (nan without a validation carve)
    best_epoch: int
    history: list[float]  # validation RMSE after each epoch
