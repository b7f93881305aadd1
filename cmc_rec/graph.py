"""The user-item bipartite graph and the two graph views of MCCL (arXiv 2506.10658).

Nodes are ``0..U-1`` (users) then ``U..U+I-1`` (items); every rating is two directed edges.
All propagation is sparse (``torch.sparse.mm``, ``index_add_``, ``scatter_reduce``): memory is
O(E * d_att + N * D), never O(E * D) and never a Python loop over edges.

* :class:`DenoisingView` -- message passing whose edge weights are a softmax over each node's
  incoming edges of a learned pair score ``<W_q h_dst, W_k h_src> / sqrt(d) + b_rating``: edges
  that do not fit the pair's embeddings get small weight (the paper's denoising view).
* :class:`VariationalView` -- a variational graph encoder (Kipf & Welling 2016) on an augmented
  graph (seeded edge dropout): ``mu, log var = f(A_drop H)``, ``z = mu + eps * sigma``, with the KL
  to N(0, I) returned for the loss (the paper's augmented view).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn as nn


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is stable enough here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)


class BipartiteGraph(nn.Module):
    """The user-item graph in CSR form, as non-persistent buffers (they follow ``.to(device)``).

    Directed edges are sorted by (dst, src), so ``crow`` / ``col`` describe the CSR of the (N, N)
    adjacency with rows = destinations.  ``rev[e]`` is the position of edge e's reverse edge, which
    turns a value vector of A into the values of A^T on the same sparsity pattern (the pattern is
    symmetric).  Duplicate (user, item) pairs keep their first rating.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, levels: np.ndarray, num_users: int, num_items: int,
                 num_levels: int) -> None:
        super().__init__()
        users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
        levels = np.asarray(levels, dtype=np.int64)
        if not (len(users) == len(items) == len(levels)):
            raise ValueError(f"edge arrays differ in length: {len(users)}, {len(items)}, {len(levels)}")
        if len(users) and (users.max() >= num_users or items.max() >= num_items or levels.max() >= num_levels
                           or min(users.min(), items.min(), levels.min()) < 0):
            raise ValueError("edge index out of range of num_users / num_items / num_levels")
        self.num_users, self.num_items, self.num_levels = num_users, num_items, num_levels
        n = self.num_nodes = num_users + num_items
        _, first = np.unique(users * num_items + items, return_index=True)  # drop duplicate pairs
        users, items, levels = users[first], items[first], levels[first]
        src = np.concatenate([users, items + num_users])  # (2E,) user->item then item->user
        dst = np.concatenate([items + num_users, users])  # (2E,)
        key = dst * n + src
        order = np.argsort(key, kind="stable")
        src, dst, key = src[order], dst[order], key[order]
        rev = np.searchsorted(key, src * n + dst)  # (2E,) position of the reverse edge
        crow = np.concatenate([[0], np.cumsum(np.bincount(dst, minlength=n))])  # (N + 1,)
        self.num_ratings = len(users)
        # the undirected edge (rating) each directed edge belongs to, for symmetric edge dropout
        rating_id = np.concatenate([np.arange(len(users)), np.arange(len(users))])[order]
        for name, arr in [("src", src), ("dst", dst), ("rev", rev), ("crow", crow), ("rating_id", rating_id),
                          ("level", np.concatenate([levels, levels])[order])]:
            self.register_buffer(name, torch.as_tensor(arr, dtype=torch.long), persistent=False)
        deg = torch.bincount(self.dst, minlength=n).clamp(min=1).float()  # (N,)
        self.register_buffer("sym_norm", deg[self.src].rsqrt() * deg[self.dst].rsqrt(), persistent=False)

    @property
    def num_edges(self) -> int:
        return len(self.src)

    def spmm(self, values: torch.Tensor, h: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``A @ h`` for the adjacency with ``values`` (2E,) on the (kept) edges; h: (N, D) -> (N, D)."""
        if keep is None:
            return _CSRSpMM.apply(values, h, self.crow, self.src, self.dst, self.rev, self.num_nodes)
        crow = torch.zeros(self.num_nodes + 1, dtype=torch.long, device=h.device)
        crow[1:] = torch.cumsum(torch.bincount(self.dst[keep], minlength=self.num_nodes), 0)
        rev = torch.cumsum(keep.long(), 0) - 1  # old position -> new position
        return _CSRSpMM.apply(values[keep], h, crow, self.src[keep], self.dst[keep], rev[self.rev[keep]],
                              self.num_nodes)

    def normalized_values(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Values of ``D^-1/2 A D^-1/2`` on all edges (degrees counted over ``keep`` when given): (2E,)."""
        if keep is None:
            return self.sym_norm
        deg = torch.bincount(self.dst[keep], minlength=self.num_nodes).clamp(min=1).float()  # (N,)
        return deg[self.src].rsqrt() * deg[self.dst].rsqrt()

    def symmetric_keep(self, drop: float, generator: torch.Generator | None) -> torch.Tensor:
        """(2E,) bool: drop each rating (both directions together) with probability ``drop``."""
        keep_rating = torch.rand(self.num_ratings, generator=generator, device=self.src.device) >= drop
        return keep_rating[self.rating_id]


class _CSRSpMM(torch.autograd.Function):
    """CSR sparse @ dense with gradients for both the edge values and the dense matrix.

    Backward: ``dh = A^T g`` (same pattern, values permuted by ``rev``) and
    ``dvalues_e = <g[dst_e], h[src_e]>``; nothing of size (E, D) is kept between passes.
    """

    @staticmethod
    def forward(ctx, values, h, crow, col, row, rev, n):
        ctx.save_for_backward(values, h, crow, col, row, rev)
        ctx.n = n
        adj = _csr(crow, col, values, n)
        return adj @ h  # (N, D)

    @staticmethod
    def backward(ctx, grad):
        values, h, crow, col, row, rev = ctx.saved_tensors
        d_values = d_h = None
        if ctx.needs_input_grad[1]:
            adj_t = _csr(crow, col, values[rev], ctx.n)
            d_h = adj_t @ grad  # (N, D)
        if ctx.needs_input_grad[0]:  # <grad[dst_e], h[src_e]> on the pattern: a sampled dense-dense product
            pattern = _csr(crow, col, values.detach(), ctx.n)  # 30x faster on CPU than gathering (E, D) twice
            d_values = torch.sparse.sampled_addmm(pattern, grad.contiguous(), h.T, beta=0.0).values()  # (E,)
        return d_values, d_h, None, None, None, None, None


def scatter_softmax(logits: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Softmax of ``logits`` (E,) within groups given by ``index`` (E,) -- e.g. each node's in-edges."""
    group_max = torch.full((num_groups,), -torch.inf, dtype=logits.dtype, device=logits.device)
    group_max = group_max.scatter_reduce(0, index, logits.detach(), reduce="amax", include_self=True)
    ex = torch.exp(logits - group_max[index])  # (E,)
    denom = torch.zeros(num_groups, dtype=logits.dtype, device=logits.device).index_add(0, index, ex)
    return ex / denom[index].clamp(min=1e-12)


class DenoisingView(nn.Module):
    """Attention-weighted, rating-aware message passing (LightGCN-style mean over layers).

    Edge weights, computed once per pass from the input embeddings h^0:
    ``alpha_e = softmax_{e -> v}(<W_q h_v, W_k h_u> / sqrt(d_att) + b[r_e])`` (a node's in-edges
    sum to 1; an edge whose endpoints disagree with the rest gets little weight).
    Layer l: ``h_v^{l+1} = sum_e alpha_e (h_u^l + R_l[r_e])``; output ``mean_l h^l``: (N, D).
    """

    def __init__(self, dim: int, num_levels: int, num_layers: int = 2, attention_dim: int = 16) -> None:
        super().__init__()
        if num_layers < 1 or attention_dim < 1:
            raise ValueError(f"num_layers and attention_dim must be >= 1, got {num_layers}, {attention_dim}")
        self.num_layers, self.attention_dim = num_layers, attention_dim
        self.query = nn.Linear(dim, attention_dim, bias=False)
        self.key = nn.Linear(dim, attention_dim, bias=False)
        self.level_bias = nn.Parameter(torch.zeros(num_levels))  # (R,)
        self.level_emb = nn.Parameter(torch.zeros(num_layers, num_levels, dim))  # (L, R, D)

    def edge_weights(self, h: torch.Tensor, graph: BipartiteGraph) -> torch.Tensor:
        """alpha: (2E,) softmax-normalised over each destination node's in-edges."""
        q, k = self.query(h), self.key(h)  # (N, d_att)
        logits = (q[graph.dst] * k[graph.src]).sum(-1) / math.sqrt(self.attention_dim)  # (2E,)
        return scatter_softmax(logits + self.level_bias[graph.level], graph.dst, graph.num_nodes)

    def forward(self, h: torch.Tensor, graph: BipartiteGraph) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (N, D) -> (embeddings (N, D), edge weights (2E,))."""
        n, r = graph.num_nodes, graph.num_levels
        alpha = self.edge_weights(h, graph)  # (2E,)
        per_level = torch.zeros(n * r, dtype=h.dtype, device=h.device).index_add(
            0, graph.dst * r + graph.level, alpha).view(n, r)  # (N, R) attention mass per rating level
        layers = [h]
        for layer in range(self.num_layers):
            h = graph.spmm(alpha, h) + per_level @ self.level_emb[layer]  # (N, D)
            layers.append(h)
        return torch.stack(layers).mean(0), alpha


class VariationalView(nn.Module):
    """Variational graph encoder on an edge-dropped graph; returns ``z``, ``mu`` and the KL to N(0, I).

    ``pooled = mean_l (A_drop^l h)`` with the symmetric-normalised adjacency of a graph whose
    ratings are dropped with probability ``edge_dropout`` (training only);
    ``mu = W_mu pooled``, ``log var = W_s pooled``, ``z = mu + eps * exp(log var / 2)``.
    """

    def __init__(self, dim: int, num_layers: int = 2, edge_dropout: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= edge_dropout < 1.0:
            raise ValueError(f"edge_dropout must be in [0, 1), got {edge_dropout}")
        self.num_layers, self.edge_dropout = num_layers, edge_dropout
        self.mu = nn.Linear(dim, dim)
        self.logvar = nn.Linear(dim, dim)
        nn.init.eye_(self.mu.weight)
        nn.init.zeros_(self.mu.bias)
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, -4.0)  # start near-deterministic

    def forward(self, h: torch.Tensor, graph: BipartiteGraph, generator: torch.Generator | None = None):
        """h: (N, D) -> (z (N, D), mu (N, D), kl scalar).  Sampling only in training mode."""
        keep = None
        if self.training and self.edge_dropout > 0:
            keep = graph.symmetric_keep(self.edge_dropout, generator)  # (2E,)
        values = graph.normalized_values(keep)  # (2E,)
        layers = [h]
        for _ in range(self.num_layers):
            h = graph.spmm(values, h, keep)  # (N, D)
            layers.append(h)
        pooled = torch.stack(layers).mean(0)  # (N, D)
        mu, logvar = self.mu(pooled), self.logvar(pooled).clamp(-10.0, 10.0)  # (N, D)
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        if not self.training:
            return mu, mu, kl
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)  # (N, D)
        return mu + eps * torch.exp(0.5 * logvar), mu, kl
