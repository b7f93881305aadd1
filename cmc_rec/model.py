"""``ContrastiveMatrixModel``: the blog's InfoNCE matrix model grown into MCCL (arXiv 2506.10658).

Blog (last section of the post): user / item embeddings and ``contrastive_loss(anchor, positive,
temperature)`` -- in-batch InfoNCE where row j's positive is column j.  MCCL adds, over the
user-item graph, a denoising view and an augmented variational view, harmonised by InfoNCE
between the two views' node embeddings, plus a rating head trained with MSE.

Loss (all terms weighted by :class:`LossConfig`)::

    MSE(r_hat, r) + w_view * InfoNCE(z_den, z_aug) + w_pref * InfoNCE(user, liked item)
                  + w_kl * KL(q(z_aug) || N(0, I)) + l2 * ||batch embeddings||^2

Rating head: ``r_hat = mu + b_u + b_i + <z_u, z_i>`` with ``z = (z_den + z_aug) / 2``.
Preference score (used for top-K): cosine of ``P z_u`` and ``P z_i`` (``P`` a linear projection
head, as in SimCLR), the quantity the blog's user->item InfoNCE trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._util import check_number
from .graph import BipartiteGraph, DenoisingView, VariationalView

# tau of every InfoNCE term of this package (ranking model, graph model, the blog's loss): 0.2 was the
# best of 0.15 / 0.2 / 0.25 for the ranking model on a validation carve of ML-100K u1.base (the blog
# used 0.1 and found 0.07 too sharp)
DEFAULT_TEMPERATURE = 0.2


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
             normalize: bool = True) -> torch.Tensor:
    """In-batch InfoNCE (the blog's loss): anchor (B, D), positive (B, D); row j's positive is j.

    ``normalize`` L2-normalises both sides first (cosine similarity, as in SimCLR / MCCL); the
    blog's code uses the raw dot product (``normalize=False``).
    """
    if anchor.shape != positive.shape or anchor.dim() != 2:
        raise ValueError(f"anchor and positive must both be (B, D), got {tuple(anchor.shape)}, "
                         f"{tuple(positive.shape)}")
    check_number("temperature", temperature, low=0.0, low_open=True)
    if normalize:
        anchor, positive = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
    logits = anchor @ positive.T / temperature  # (B, B)
    labels = torch.arange(anchor.shape[0], device=anchor.device)  # (B,)
    return F.cross_entropy(logits, labels)


@dataclass
class LossConfig:
    view: float = 0.05  # InfoNCE between the denoised and the augmented view (MCCL)
    pref: float = 0.1  # blog's user -> liked-item InfoNCE (in-batch negatives), through a projection head
    kl: float = 1e-4  # KL of the variational view to N(0, I)
    l2: float = 0.1  # L2 on the embeddings and biases used in the batch, per rating (tuned on validation)
    temperature: float = DEFAULT_TEMPERATURE  # tau of both InfoNCE terms
    contrast_batch: int = 1024  # at most this many rows per InfoNCE term (logits are (B, B))

    def __post_init__(self) -> None:
        for name in ("view", "pref", "kl", "l2"):
            check_number(f"LossConfig.{name}", getattr(self, name), low=0.0)
        check_number("LossConfig.temperature", self.temperature, low=0.0, low_open=True)
        check_number("LossConfig.contrast_batch", self.contrast_batch, low=1, integer=True)


class ContrastiveMatrixModel(nn.Module):
    """User / item embeddings + the two graph views + rating head.

    Constructed as in the blog: ``ContrastiveMatrixModel(num_users, num_items, embedding_dim=128)``.
    Without :meth:`attach_graph` it is the blog's plain embedding model (views are the identity).
    """

    def __init__(self, num_users: int, num_items: int, embedding_dim: int = 128, *, num_layers: int = 2,
                 attention_dim: int = 16, edge_dropout: float = 0.1, node_dropout: float = 0.0, num_levels: int = 5,
                 global_mean: float = 0.0, init_std: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        if num_users < 1 or num_items < 1 or embedding_dim < 1:
            raise ValueError(f"need positive sizes, got {num_users=}, {num_items=}, {embedding_dim=}")
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if not 0.0 <= node_dropout < 1.0:
            raise ValueError(f"node_dropout must be in [0, 1), got {node_dropout}")
        self.node_dropout = node_dropout
        self.num_users, self.num_items, self.embedding_dim = num_users, num_items, embedding_dim
        g = torch.Generator().manual_seed(seed)
        self.user_emb = nn.Embedding(num_users, embedding_dim)
        self.item_emb = nn.Embedding(num_items, embedding_dim)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items, 1)
        self.denoise = DenoisingView(embedding_dim, num_levels, num_layers, attention_dim)
        self.augment = VariationalView(embedding_dim, num_layers, edge_dropout)
        self.pref_head = nn.Linear(embedding_dim, embedding_dim, bias=False)  # SimCLR-style projection
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))
        with torch.no_grad():  # seeded init, no global RNG
            for emb in (self.user_emb, self.item_emb):
                emb.weight.copy_(torch.randn(emb.weight.shape, generator=g) * init_std)
            for lin in (self.denoise.query, self.denoise.key, self.pref_head):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / embedding_dim**0.5)
            self.denoise.level_emb.copy_(torch.randn(self.denoise.level_emb.shape, generator=g) * 0.01)
            self.user_bias.weight.zero_()
            self.item_bias.weight.zero_()
        self.graph: BipartiteGraph | None = None

    # -- graph --------------------------------------------------------------------------------
    def attach_graph(self, users: np.ndarray, items: np.ndarray, levels: np.ndarray) -> ContrastiveMatrixModel:
        """Attach the training graph (contiguous user / item indices, rating-level indices)."""
        device = self.user_emb.weight.device
        self.graph = BipartiteGraph(users, items, levels, self.num_users, self.num_items,
                                    self.denoise.level_bias.shape[0]).to(device)
        return self

    # -- blog ---------------------------------------------------------------------------------
    def contrastive_loss(self, anchor: torch.Tensor, positive: torch.Tensor,
                         temperature: float = DEFAULT_TEMPERATURE, normalize: bool = True) -> torch.Tensor:
        """The blog's in-batch InfoNCE, as a method (its signature): see :func:`info_nce`."""
        return info_nce(anchor, positive, temperature, normalize)

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, generator: torch.Generator | None = None):
        """Both views' node embeddings: (z_den (N, D), z_aug (N, D), kl, fused z (N, D))."""
        h0 = torch.cat([self.user_emb.weight, self.item_emb.weight])  # (N, D)
        if self.training and self.node_dropout > 0:  # drop whole input nodes (GC-MC's regulariser)
            keep = torch.rand(h0.shape[0], 1, generator=generator, device=h0.device) >= self.node_dropout  # (N, 1)
            h0 = h0 * keep / (1.0 - self.node_dropout)
        if self.graph is None:
            zero = h0.sum() * 0.0
            return h0, h0, zero, h0
        z_den, _ = self.denoise(h0, self.graph)  # (N, D)
        z_aug, _, kl = self.augment(h0, self.graph, generator)  # (N, D)
        return z_den, z_aug, kl, 0.5 * (z_den + z_aug)

    def rating(self, z: torch.Tensor, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Rating head: (B,) predictions for user / item indices (B,) from fused z (N, D)."""
        zu, zi = z[users], z[items + self.num_users]  # (B, D)
        return (self.global_mean + self.user_bias(users).squeeze(1) + self.item_bias(items).squeeze(1)
                + (zu * zi).sum(1))

    def forward(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, weights: LossConfig,
                view_nodes: torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict:
        """Loss terms for a batch of ratings (B,) (``view_nodes``: (M,) node ids for the view InfoNCE)."""
        z_den, z_aug, kl, z = self.encode(generator)
        pred = self.rating(z, users, items)  # (B,)
        mse = F.mse_loss(pred, ratings)
        zero = mse * 0.0
        view = zero
        if weights.view > 0 and view_nodes is not None and len(view_nodes) > 1:
            view = 0.5 * (self.contrastive_loss(z_den[view_nodes], z_aug[view_nodes], weights.temperature)
                          + self.contrastive_loss(z_aug[view_nodes], z_den[view_nodes], weights.temperature))
        pref = zero
        liked = ratings >= self.global_mean
        if weights.pref > 0 and int(liked.sum()) > 1:
            lu, li = users[liked][: weights.contrast_batch], items[liked][: weights.contrast_batch]
            pref = self.contrastive_loss(self.pref_head(z[lu]), self.pref_head(z[li + self.num_users]),
                                         weights.temperature)
        l2 = (self.user_emb(users).pow(2).sum() + self.item_emb(items).pow(2).sum()
              + self.user_bias(users).pow(2).sum() + self.item_bias(items).pow(2).sum()) / len(users)
        total = mse + weights.view * view + weights.pref * pref + weights.kl * kl + weights.l2 * l2
        return {"loss": total, "mse": mse.detach(), "view": view.detach(), "pref": pref.detach(),
                "kl": kl.detach(), "l2": l2.detach()}

    @torch.no_grad()
    def embeddings(self) -> torch.Tensor:
        """Fused node embeddings for inference (eval mode: the variational view returns its mean)."""
        was = self.training
        self.eval()
        z = self.encode()[3]
        self.train(was)
        return z
