"""The ranking side of CMC: graph embeddings trained by InfoNCE over all items (a full softmax).

The blog's loss, ``InfoNCE(user, liked item)``, is a sampled softmax over items; with in-batch
negatives and no popularity (logQ) correction it pushes popular items down, and ranking collapses.
By default every item of the catalog is a negative (``softmax over I`` of ``cos(z_u, z_j) / tau``).
Every positive pair of one user has the same logit row, so the default batches *users*
(``users_per_step``): each user's (I,) logits are computed once for all of its positives, and the
loss ``sum_e w_e (logsumexp_j s_uj - s_ui_e) / sum_e w_e`` is exactly the pair-batched loss over
those pairs, for (users, I) logits instead of (pairs, I): one step over u1.base's 943 users
computes (943, I) logits where an epoch of pair batches computed (80,000, I).  Positives are weighted by their rating
(``rating_weight``: ``w = 1 + rating_weight * (r - mean r)``), so a 5 pulls harder than a 2.
For large catalogs, ``negatives=K`` samples K items per step (pair batches) from the item
popularity ``q`` and corrects every logit by ``- log q_j`` (the logQ correction of Yi et al.,
RecSys 2019), so the sampled softmax estimates the full one: (B, K) logits per step.

Embeddings are propagated over the user-item graph with sparse ops (LightGCN:
``z = mean_l (D^-1/2 A D^-1/2)^l h0``, ``num_layers`` hops; ``layer_weights`` for another mix).
MCCL's denoising view (``denoise``): every edge's value is multiplied by a learned gate
``2 sigmoid(<h_dst W_q, h_src W_k> / sqrt(d_att) + b[rating level])``, near 1 at the start.
Regulariser: MCCL's augmented view -- the same propagation on a graph with ratings dropped
(``edge_dropout``), pulled toward the clean view by a node-level InfoNCE (``view_weight``; SGL).
``recommend`` ranks by the mean cosine over ``ensemble`` seeds minus ``popularity_penalty * log q_i``
(a small push toward the long tail).

Memory: O(E + N * D) for the graph and embeddings plus (users_per_step or batch_size, I) logits;
nothing is O(U * I).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._util import check_number, show_progress
from .graph import BipartiteGraph
from .model import DEFAULT_TEMPERATURE, info_nce

__all__ = ["RankingConfig", "RankingModel", "ranking_embeddings", "train_ranking"]


@dataclass
class RankingConfig:
    embedding_dim: int = 64  # D
    num_layers: int = 2  # propagation hops
    temperature: float = DEFAULT_TEMPERATURE  # tau of the softmax over items (the model module's default)
    epochs: int = 80  # passes over the users (full softmax) or the positive pairs (sampled)
    users_per_step: int = 1024  # full softmax: users per Adam step, each with all of its positives (0: pair batches)
    batch_size: int = 2048  # positive (user, item) pairs per step of the sampled softmax (or users_per_step=0)
    lr: float = 0.05  # Adam
    l2: float = 0.0  # L2 on the input embeddings of the batch's users and items, per pair
    min_rating: float | None = None  # positives: ratings >= min_rating (None: every rating)
    rating_weight: float = 0.5  # a positive's weight in the loss: 1 + rating_weight * (r - mean r), at least 0.05
    popularity_penalty: float = 0.015  # recommend() ranks by cos(u, i) - popularity_penalty * log q_i
    view_weight: float = 0.0  # weight of the augmented-view InfoNCE (0: off)
    edge_dropout: float = 0.1  # share of ratings dropped in the augmented view
    view_nodes: int = 1024  # nodes per step in the view InfoNCE
    denoise: bool = True  # MCCL's denoising view: each edge's propagation value scaled by a learned gate
    attention_dim: int = 16  # d_att of the denoising gate's query / key projections
    negatives: int = 0  # 0: softmax over every item; K > 0: K popularity-sampled negatives per step, logQ-corrected
    init_std: float = 0.1  # h0 ~ N(0, init_std^2)
    layer_weights: tuple[float, ...] | None = None  # weights of hops 0..L in the output (None: the mean)
    ensemble: int = 2  # models with seeds seed, seed+1, ...; scores are the mean of their cosines
    seed: int = 0  # init, shuffling, edge dropout
    progress: bool | None = None  # tqdm bar over epochs; None: when stderr is a terminal

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "num_layers", "batch_size", "view_nodes", "ensemble", "attention_dim"):
            check_number(f"RankingConfig.{name}", getattr(self, name), low=1, integer=True)
        for name in ("epochs", "negatives", "users_per_step"):
            check_number(f"RankingConfig.{name}", getattr(self, name), low=0, integer=True)
        check_number("RankingConfig.seed", self.seed, integer=True)
        for name in ("temperature", "lr", "init_std"):
            check_number(f"RankingConfig.{name}", getattr(self, name), low=0.0, low_open=True)
        for name in ("l2", "view_weight"):
            check_number(f"RankingConfig.{name}", getattr(self, name), low=0.0)
        check_number("RankingConfig.edge_dropout", self.edge_dropout, low=0.0, high=1.0, high_open=True)
        if self.min_rating is not None:
            check_number("RankingConfig.min_rating", self.min_rating)
        check_number("RankingConfig.rating_weight", self.rating_weight, low=0.0)
        check_number("RankingConfig.popularity_penalty", self.popularity_penalty)
        if self.layer_weights is not None:
            self.layer_weights = tuple(float(check_number("RankingConfig.layer_weights", w, low=0.0))
                                       for w in self.layer_weights)
            if len(self.layer_weights) != self.num_layers + 1 or sum(self.layer_weights) <= 0:
                raise ValueError(f"RankingConfig.layer_weights must be num_layers + 1 = {self.num_layers + 1} "
                                 f"non-negative weights with a positive sum, got {self.layer_weights}")


class RankingModel(nn.Module):
    """Node embeddings h0 (users then items) and LightGCN propagation over a :class:`BipartiteGraph`."""

    def __init__(self, graph: BipartiteGraph, config: RankingConfig) -> None:
        super().__init__()
        self.graph, self.config = graph, config
        self.num_users, self.num_items = graph.num_users, graph.num_items
        g = torch.Generator().manual_seed(config.seed)
        counts = torch.bincount(graph.dst[graph.dst >= self.num_users] - self.num_users, minlength=self.num_items)
        self.register_buffer("item_q", (counts.float() + 1.0) / (counts.sum() + self.num_items), persistent=False)
        self.h0 = nn.Parameter(torch.randn(graph.num_nodes, config.embedding_dim, generator=g) * config.init_std)
        if config.denoise:  # gate logits start near 0: the gate near 1, plain LightGCN
            d, a = config.embedding_dim, config.attention_dim
            self.query = nn.Parameter(torch.randn(d, a, generator=g) / d**0.5)
            self.key = nn.Parameter(torch.randn(d, a, generator=g) / d**0.5)
            self.level_bias = nn.Parameter(torch.zeros(graph.num_levels))  # (R,) one per rating level

    def edge_gate(self) -> torch.Tensor:
        """(2E,) MCCL's denoising weights ``2 sigmoid(<h_dst W_q, h_src W_k> / sqrt(d_att) + b[r_e])``."""
        g = self.graph
        q, k = self.h0 @ self.query, self.h0 @ self.key  # (N, d_att)
        logits = (q[g.dst] * k[g.src]).sum(-1) / self.config.attention_dim**0.5 + self.level_bias[g.level]
        return 2.0 * torch.sigmoid(logits)

    def propagate(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) mean over hops 0..L of ``A_norm^l h0`` (on the kept edges when ``keep`` is given)."""
        values = self.graph.normalized_values(keep)
        if self.config.denoise:
            values = values * self.edge_gate()
        h, layers = self.h0, [self.h0]
        for _ in range(self.config.num_layers):
            h = self.graph.spmm(values, h, keep)
            layers.append(h)
        if self.config.layer_weights is None:
            return torch.stack(layers).mean(0)
        w = torch.tensor(self.config.layer_weights) / sum(self.config.layer_weights)
        return torch.einsum("l,lnd->nd", w, torch.stack(layers))

    def loss(self, users: torch.Tensor, items: torch.Tensor, generator: torch.Generator,
             weights: torch.Tensor | None = None) -> dict:
        """Full-softmax InfoNCE of the batch's (user, item) pairs (B,) (weighted by ``weights`` (B,) when
        given), plus the view and L2 terms."""
        c = self.config
        z = self.propagate()  # (N, D)
        zu = F.normalize(z[users], dim=1)  # (B, D)
        if c.negatives == 0:
            zi = F.normalize(z[self.num_users :], dim=1)  # (I, D)
            rank = F.cross_entropy(zu @ zi.T / c.temperature, items, reduction="none")  # softmax over every item
        else:  # sampled softmax with the logQ correction
            neg = torch.multinomial(self.item_q, c.negatives, replacement=True, generator=generator)  # (K,)
            log_q = self.item_q.log()
            pos = (zu * F.normalize(z[items + self.num_users], dim=1)).sum(1) / c.temperature - log_q[items]  # (B,)
            logits = zu @ F.normalize(z[neg + self.num_users], dim=1).T / c.temperature - log_q[neg]  # (B, K)
            logits = logits.masked_fill(neg[None, :] == items[:, None], -torch.inf)  # a sample of the positive
            rank = F.cross_entropy(torch.cat([pos[:, None], logits], 1), torch.zeros_like(items), reduction="none")
        rank = rank.mean() if weights is None else (rank * weights).sum() / weights.sum()
        view = self._view_loss(z, generator) if c.view_weight > 0 else rank * 0.0
        total = rank + c.view_weight * view if c.view_weight > 0 else rank
        if c.l2 > 0:
            total = total + c.l2 * (self.h0[users].pow(2).sum() + self.h0[items + self.num_users].pow(2).sum()) / len(users)
        return {"loss": total, "rank": rank.detach(), "view": view.detach()}

    def _view_loss(self, z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """InfoNCE between the propagated embeddings ``z`` (N, D) and those of an edge-dropped
        (augmented) view, on a sample of nodes: the contrastive regulariser of both losses."""
        c = self.config
        keep = self.graph.symmetric_keep(c.edge_dropout, generator)  # (2E,)
        z_aug = self.propagate(keep)  # (N, D)
        nodes = torch.randperm(self.graph.num_nodes, generator=generator)[: c.view_nodes]
        return info_nce(z[nodes], z_aug[nodes], c.temperature)

    def user_loss(self, users: torch.Tensor, rows: torch.Tensor, items: torch.Tensor, weights: torch.Tensor,
                  generator: torch.Generator) -> dict:
        """The full-softmax InfoNCE of every positive of the batch's users (B,), each user's logits once.

        Pair e = (users[rows[e]], items[e]) with weight weights[e]: the loss is
        ``sum_e w_e (logsumexp_j s_{u j} - s_{u i_e}) / sum_e w_e``, exactly the pair-batched loss
        over the same pairs, for (B, I) logits instead of (pairs, I).
        """
        c = self.config
        z = self.propagate()  # (N, D)
        zu = F.normalize(z[users], dim=1) / c.temperature  # (B, D)
        zi = F.normalize(z[self.num_users :], dim=1)  # (I, D)
        logits = zu @ zi.T  # (B, I)
        lse = torch.logsumexp(logits, 1)  # (B,)
        per_pair = lse[rows] - logits[rows, items]  # (P,)
        rank = (per_pair * weights).sum() / weights.sum()
        view = self._view_loss(z, generator) if c.view_weight > 0 else rank * 0.0
        total = rank + c.view_weight * view if c.view_weight > 0 else rank
        if c.l2 > 0:
            total = total + c.l2 * (self.h0[users].pow(2).sum(1) @ torch.bincount(rows, minlength=len(users)).float()
                                    + self.h0[items + self.num_users].pow(2).sum()) / len(items)
        return {"loss": total, "rank": rank.detach(), "view": view.detach()}

    @torch.no_grad()
    def normalized_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm user (U, D) and item (I, D) embeddings: ``score = <user, item> / tau``."""
        z = F.normalize(self.propagate(), dim=1)
        return z[: self.num_users].clone(), z[self.num_users :].clone()


def ranking_embeddings(models: list[RankingModel]) -> tuple[torch.Tensor, torch.Tensor]:
    """User (U, n D + 1) and item (I, n D + 1) scoring vectors of an ensemble of n models.

    Each model's unit embeddings, concatenated and divided by sqrt(n), plus one column
    (``-popularity_penalty`` for users, ``log q_i`` for items): ``user . item`` is the mean of the
    members' cosines minus ``popularity_penalty * log q_i``.
    """
    parts = [m.normalized_embeddings() for m in models]
    scale = len(parts) ** -0.5
    zu, zi = torch.cat([p[0] for p in parts], 1) * scale, torch.cat([p[1] for p in parts], 1) * scale
    penalty = torch.full((len(zu), 1), -models[0].config.popularity_penalty)
    return torch.cat([zu, penalty], 1), torch.cat([zi, models[0].item_q.log()[:, None]], 1)


def train_ranking(u: np.ndarray, i: np.ndarray, r: np.ndarray, num_users: int, num_items: int,
                  config: RankingConfig) -> list[RankingModel]:
    """Fit ``config.ensemble`` :class:`RankingModel` s (seeds ``seed, seed + 1, ...``) on contiguous
    user / item indices and ratings (n,) each."""
    c = config
    keep = np.ones(len(r), bool) if c.min_rating is None else r >= c.min_rating
    if not keep.any():
        raise ValueError(f"no rating >= min_rating={c.min_rating}: nothing to rank from")
    return [_train_one(u[keep], i[keep], r[keep], num_users, num_items, dataclasses.replace(c, seed=c.seed + k))
            for k in range(c.ensemble)]


def _train_one(u: np.ndarray, i: np.ndarray, r: np.ndarray, num_users: int, num_items: int,
               c: RankingConfig, callback=None) -> RankingModel:
    from tqdm import tqdm  # plain tqdm: tqdm.auto probes for IPython / widgets, seconds of imports

    levels_raw, levels = np.unique(r, return_inverse=True)  # rating levels: the denoising gate's bias
    graph = BipartiteGraph(u, i, levels.reshape(-1), num_users, num_items, len(levels_raw))
    model = RankingModel(graph, c)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    g = torch.Generator().manual_seed(c.seed + 1)
    ut, it = torch.as_tensor(u, dtype=torch.long), torch.as_tensor(i, dtype=torch.long)
    wt = None
    if c.rating_weight > 0:
        wt = (1.0 + c.rating_weight * (torch.as_tensor(r, dtype=torch.float32) - float(r.mean()))).clamp(min=0.05)
    model.history = []
    if c.users_per_step > 0 and c.negatives == 0:
        _train_by_user(model, opt, ut, it, wt, g, c, callback)
        model.eval()
        return model
    for _ in tqdm(range(c.epochs), desc="cmc ranking", disable=not show_progress(c.progress)):
        perm = torch.randperm(len(ut), generator=g)
        total, steps = 0.0, 0
        for start in range(0, len(perm), c.batch_size):
            b = perm[start : start + c.batch_size]
            out = model.loss(ut[b], it[b], g, None if wt is None else wt[b])
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            total, steps = total + float(out["loss"].detach()), steps + 1
        model.history.append(total / max(steps, 1))
    model.eval()
    return model


def _train_by_user(model: RankingModel, opt, ut, it, wt, g, c: RankingConfig, callback=None) -> None:
    """Epochs over the users, ``users_per_step`` at a time, each with all of its positive pairs."""
    from tqdm import tqdm

    order = torch.argsort(ut, stable=True)
    su, si = ut[order], it[order]
    sw = torch.ones(len(su)) if wt is None else wt[order]
    indptr = torch.zeros(model.num_users + 1, dtype=torch.long)
    indptr[1:] = torch.cumsum(torch.bincount(su, minlength=model.num_users), 0)
    active = torch.unique(su)  # users with a positive
    for epoch in tqdm(range(1, c.epochs + 1), desc="cmc ranking", disable=not show_progress(c.progress)):
        perm = active[torch.randperm(len(active), generator=g)]
        total, steps = 0.0, 0
        for start in range(0, len(perm), c.users_per_step):
            users = perm[start : start + c.users_per_step]  # (B,)
            starts, lens = indptr[users], indptr[users + 1] - indptr[users]
            rows = torch.repeat_interleave(torch.arange(len(users)), lens)  # (P,)
            pos = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens) + torch.arange(int(lens.sum()))
            out = model.user_loss(users, rows, si[pos], sw[pos], g)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            total, steps = total + float(out["loss"].detach()), steps + 1
        model.history.append(total / max(steps, 1))
        if callback is not None:
            callback(epoch, model)
