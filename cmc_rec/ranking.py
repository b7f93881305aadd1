"""The ranking side of CMC: graph embeddings trained by InfoNCE over all items (a full softmax).

The blog's loss, ``InfoNCE(user, liked item)``, is a sampled softmax over items; with in-batch
negatives and no popularity (logQ) correction it pushes popular items down, and ranking collapses.
By default every item of the catalog is a negative (``softmax over I`` of ``cos(z_u, z_j) / tau``),
exact and cheap at ML-100K's size ((B, I) logits per step).  For large catalogs, ``negatives=K``
samples K items per step from the item popularity ``q`` and corrects every logit by ``- log q_j``
(the logQ correction of Yi et al., RecSys 2019), so the sampled softmax estimates the full one:
(B, K) logits per step.  Embeddings are propagated over the
user-item graph with sparse ops (LightGCN: ``z = mean_l (D^-1/2 A D^-1/2)^l h0``, ``num_layers``
hops).  Regulariser: MCCL's augmented view -- the same propagation on a graph with ratings dropped
(``edge_dropout``), pulled toward the clean view by a node-level InfoNCE (``view_weight``; SGL).

Memory: O(E + N * D) for the graph and embeddings plus (batch_size, I) logits; nothing is O(U * I).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._util import check_number, show_progress
from .graph import BipartiteGraph
from .model import DEFAULT_TEMPERATURE, info_nce

__all__ = ["RankingConfig", "RankingModel", "train_ranking"]


@dataclass
class RankingConfig:
    embedding_dim: int = 64  # D
    num_layers: int = 2  # propagation hops
    temperature: float = DEFAULT_TEMPERATURE  # tau of the softmax over items (the model module's default)
    epochs: int = 10  # passes over the positive pairs (10 > 5 or 15 on the validation carve of u1.base)
    batch_size: int = 2048  # positive (user, item) pairs per optimiser step
    lr: float = 0.01  # Adam
    l2: float = 0.0  # L2 on the input embeddings of the batch's users and items, per pair
    min_rating: float | None = None  # positives: ratings >= min_rating (None: every rating)
    view_weight: float = 0.0  # weight of the augmented-view InfoNCE (0: off)
    edge_dropout: float = 0.1  # share of ratings dropped in the augmented view
    view_nodes: int = 1024  # nodes per step in the view InfoNCE
    negatives: int = 0  # 0: softmax over every item; K > 0: K popularity-sampled negatives per step, logQ-corrected
    init_std: float = 0.1  # h0 ~ N(0, init_std^2)
    seed: int = 0  # init, shuffling, edge dropout
    progress: bool | None = None  # tqdm bar over epochs; None: when stderr is a terminal

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "num_layers", "batch_size", "view_nodes"):
            check_number(f"RankingConfig.{name}", getattr(self, name), low=1, integer=True)
        for name in ("epochs", "negatives"):
            check_number(f"RankingConfig.{name}", getattr(self, name), low=0, integer=True)
        check_number("RankingConfig.seed", self.seed, integer=True)
        for name in ("temperature", "lr", "init_std"):
            check_number(f"RankingConfig.{name}", getattr(self, name), low=0.0, low_open=True)
        for name in ("l2", "view_weight"):
            check_number(f"RankingConfig.{name}", getattr(self, name), low=0.0)
        check_number("RankingConfig.edge_dropout", self.edge_dropout, low=0.0, high=1.0, high_open=True)
        if self.min_rating is not None:
            check_number("RankingConfig.min_rating", self.min_rating)


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

    def propagate(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) mean over hops 0..L of ``A_norm^l h0`` (on the kept edges when ``keep`` is given)."""
        values = self.graph.normalized_values(keep)
        h, layers = self.h0, [self.h0]
        for _ in range(self.config.num_layers):
            h = self.graph.spmm(values, h, keep)
            layers.append(h)
        return torch.stack(layers).mean(0)

    def loss(self, users: torch.Tensor, items: torch.Tensor, generator: torch.Generator) -> dict:
        """Full-softmax InfoNCE of the batch's (user, item) pairs (B,), plus the view and L2 terms."""
        c = self.config
        z = self.propagate()  # (N, D)
        zu = F.normalize(z[users], dim=1)  # (B, D)
        if c.negatives == 0:
            zi = F.normalize(z[self.num_users :], dim=1)  # (I, D)
            rank = F.cross_entropy(zu @ zi.T / c.temperature, items)  # softmax over every item
        else:  # sampled softmax with the logQ correction
            neg = torch.multinomial(self.item_q, c.negatives, replacement=True, generator=generator)  # (K,)
            log_q = self.item_q.log()
            pos = (zu * F.normalize(z[items + self.num_users], dim=1)).sum(1) / c.temperature - log_q[items]  # (B,)
            logits = zu @ F.normalize(z[neg + self.num_users], dim=1).T / c.temperature - log_q[neg]  # (B, K)
            logits = logits.masked_fill(neg[None, :] == items[:, None], -torch.inf)  # a sample of the positive
            rank = F.cross_entropy(torch.cat([pos[:, None], logits], 1), torch.zeros_like(items))
        total, view = rank, rank * 0.0
        if c.view_weight > 0:
            keep = self.graph.symmetric_keep(c.edge_dropout, generator)  # (2E,)
            z_aug = self.propagate(keep)  # (N, D)
            nodes = torch.randperm(self.graph.num_nodes, generator=generator)[: c.view_nodes]
            view = info_nce(z[nodes], z_aug[nodes], c.temperature)
            total = total + c.view_weight * view
        if c.l2 > 0:
            total = total + c.l2 * (self.h0[users].pow(2).sum() + self.h0[items + self.num_users].pow(2).sum()) / len(users)
        return {"loss": total, "rank": rank.detach(), "view": view.detach()}

    @torch.no_grad()
    def normalized_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm user (U, D) and item (I, D) embeddings: ``score = <user, item> / tau``."""
        z = F.normalize(self.propagate(), dim=1)
        return z[: self.num_users].clone(), z[self.num_users :].clone()


def train_ranking(u: np.ndarray, i: np.ndarray, r: np.ndarray, num_users: int, num_items: int,
                  config: RankingConfig) -> RankingModel:
    """Fit a :class:`RankingModel` on contiguous user / item indices and ratings (n,) each."""
    from tqdm import tqdm  # plain tqdm: tqdm.auto probes for IPython / widgets, seconds of imports

    c = config
    keep = np.ones(len(r), bool) if c.min_rating is None else r >= c.min_rating
    if not keep.any():
        raise ValueError(f"no rating >= min_rating={c.min_rating}: nothing to rank from")
    u, i = u[keep], i[keep]
    graph = BipartiteGraph(u, i, np.zeros(len(u), dtype=np.int64), num_users, num_items, 1)
    model = RankingModel(graph, c)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    g = torch.Generator().manual_seed(c.seed + 1)
    ut, it = torch.as_tensor(u, dtype=torch.long), torch.as_tensor(i, dtype=torch.long)
    model.history = []
    for _ in tqdm(range(c.epochs), desc="cmc ranking", disable=not show_progress(c.progress)):
        perm = torch.randperm(len(ut), generator=g)
        total, steps = 0.0, 0
        for start in range(0, len(perm), c.batch_size):
            b = perm[start : start + c.batch_size]
            out = model.loss(ut[b], it[b], g)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            total, steps = total + float(out["loss"].detach()), steps + 1
        model.history.append(total / max(steps, 1))
    model.eval()
    return model
