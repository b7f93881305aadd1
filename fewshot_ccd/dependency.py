"""Conditional class dependencies: attention across the class prototypes of an episode.

Each class prototype is refined by attending to the prototypes of the other classes present in the
same episode ("how does this class relate to the others?").  The closest published anchor is FEAT
(Ye et al., "Few-Shot Learning via Embedding Adaptation with Set-to-Set Functions", CVPR 2020):
one-head set-to-set attention over the prototypes with a residual connection and LayerNorm.

This module adds, as the blog post describes, a *task-adaptive scaling*: the dependency update is
multiplied by a learned, episode-dependent scale

    gamma(episode) = alpha * 2 * sigmoid(w . context(episode) + b),   alpha = scale_init, w = 0, b = 0 at init,

where ``context`` is the masked mean of the normalised prototypes and ``alpha`` a learned scalar
(linear, not log-parametrised, so that Adam can grow it from 0.01 to O(1) within a few hundred steps).  With the default pre-norm layout
``out = x + gamma * Attn(LN(x))`` the module starts within ``scale_init`` of the identity, so it can
be dropped on top of a pretrained ProtoNet without wrecking it.

The blog's single-head q/k/v snippet (``softmax(q k^T / sqrt(D)) v``, no residual, no norm) is the
same code with a different configuration: :meth:`ClassDependencyModule.blog_qkv`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import finite

__all__ = ["DependencyConfig", "ClassDependencyModule"]

_NORMS = ("pre", "post", "none")


@dataclass
class DependencyConfig:
    """Hyper-parameters of :class:`ClassDependencyModule`."""

    dim: int  # prototype feature dimension D
    num_heads: int = 8  # attention heads; dim must be divisible by it (FEAT uses 1)
    norm: str = "pre"  # "pre": x + g*Attn(LN(x)) (identity at g=0); "post": LN(x + g*Attn(x)) as FEAT; "none"
    residual: bool = True  # add the update to the input prototypes (False: return the update itself)
    out_proj: bool = True  # output projection after the heads (the blog's q/k/v snippet has none)
    adaptive_scale: bool = True  # task-adaptive, episode-dependent scale on the update
    scale_init: float = 1e-2  # value of the adaptive scale at initialisation (near identity)
    dropout: float = 0.0  # dropout on the attention weights
    bias: bool = True  # biases in the q/k/v/out projections

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.num_heads < 1 or self.dim % self.num_heads != 0:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads} (>= 1)")
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.adaptive_scale:
            finite("scale_init", self.scale_init, low=0.0, low_open=True)


class ClassDependencyModule(nn.Module):
    """Refines class prototypes by multi-head attention across the classes of an episode.

    Args:
        config: a :class:`DependencyConfig`; or pass ``dim`` (and any other field) as keywords.

    Shapes:
        prototypes: ``(N, D)`` for one episode or ``(B, N, D)`` for a batch of episodes.
        mask: optional bool ``(B, N)`` (or ``(N,)``), True for real classes; padded classes
            (False) neither attend nor are attended to, and are returned unchanged.
        returns: refined prototypes, same shape as ``prototypes``.

    The module is permutation-equivariant over classes (no positional information) and works for
    N = 1 (a class then attends only to itself).
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        config: DependencyConfig | None = None,
        num_heads: int = 8,
        norm: str = "pre",
        residual: bool = True,
        out_proj: bool = True,
        adaptive_scale: bool = True,
        scale_init: float = 1e-2,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if config is None:
            if dim is None:
                raise ValueError("give either dim or config")
            config = DependencyConfig(
                dim=dim, num_heads=num_heads, norm=norm, residual=residual, out_proj=out_proj,
                adaptive_scale=adaptive_scale, scale_init=scale_init, dropout=dropout, bias=bias,
            )
        elif dim is not None and dim != config.dim:
            raise ValueError(f"dim={dim} disagrees with config.dim={config.dim}")
        self.config = config
        d = config.dim
        self.head_dim = d // config.num_heads
        self.q_map = nn.Linear(d, d, bias=config.bias)
        self.k_map = nn.Linear(d, d, bias=config.bias)
        self.v_map = nn.Linear(d, d, bias=config.bias)
        self.out_map = nn.Linear(d, d, bias=config.bias) if config.out_proj else nn.Identity()
        self.norm = nn.LayerNorm(d) if config.norm != "none" else nn.Identity()
        self.attn_dropout = nn.Dropout(config.dropout)
        if config.adaptive_scale:
            # gamma = alpha * 2 * sigmoid(gate(context)); gate starts at 0 -> gamma = scale_init
            self.alpha = nn.Parameter(torch.tensor(float(config.scale_init)))
            self.gate = nn.Linear(d, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    @classmethod
    def blog_qkv(cls, dim: int) -> ClassDependencyModule:
        """The blog's single-head variant: ``softmax(q k^T / sqrt(D)) v`` with no residual or norm."""
        return cls(config=DependencyConfig(
            dim=dim, num_heads=1, norm="none", residual=False, out_proj=False, adaptive_scale=False,
        ))

    def forward(self, prototypes: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if prototypes.dim() not in (2, 3):
            raise ValueError(f"prototypes must be (N, D) or (B, N, D), got shape {tuple(prototypes.shape)}")
        if prototypes.shape[-1] != self.config.dim:
            raise ValueError(f"prototypes have D={prototypes.shape[-1]}, module expects {self.config.dim}")
        single = prototypes.dim() == 2
        x = prototypes.unsqueeze(0) if single else prototypes  # (B, N, D)
        b, n, _ = x.shape
        if n < 1:
            raise ValueError("prototypes must hold at least one class (N >= 1)")
        if mask is not None:
            mask = mask.to(device=x.device, dtype=torch.bool)
            if mask.dim() == 1:
                mask = mask.unsqueeze(0)
            if mask.shape != (b, n):
                raise ValueError(f"mask must have shape {(b, n)}, got {tuple(mask.shape)}")

        cfg = self.config
        x_in = x
        if mask is not None:  # padded classes enter as zeros: a NaN / inf there cannot reach the real ones
            x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        h = self.norm(x) if cfg.norm == "pre" else x  # (B, N, D)
        update = self._attend(h, mask)  # (B, N, D)
        if cfg.adaptive_scale:
            update = update * self.scale(h, mask)  # (B, N, D) * (B, 1, 1)
        out = x + update if cfg.residual else update  # (B, N, D)
        if cfg.norm == "post":
            out = self.norm(out)
        if mask is not None:
            out = torch.where(mask.unsqueeze(-1), out, x_in)  # padded classes pass through unchanged
        return out.squeeze(0) if single else out

    def scale(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Task-adaptive scale gamma, one per episode: ``(B, N, D) -> (B, 1, 1)``."""
        if mask is None:
            context = h.mean(dim=1)  # (B, D)
        else:
            w = mask.unsqueeze(-1).to(h.dtype)  # (B, N, 1)
            context = (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (B, D)
        gate = 2.0 * torch.sigmoid(self.gate(context))  # (B, 1)
        return (self.alpha * gate).unsqueeze(-1)  # (B, 1, 1)

    def _attend(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = h.shape
        heads, hd = self.config.num_heads, self.head_dim
        q = self.q_map(h).view(b, n, heads, hd).transpose(1, 2)  # (B, H, N, hd)
        k = self.k_map(h).view(b, n, heads, hd).transpose(1, 2)  # (B, H, N, hd)
        v = self.v_map(h).view(b, n, heads, hd).transpose(1, 2)  # (B, H, N, hd)
        # The blog's snippet scales by 1/sqrt(D) with one head; with H heads this is 1/sqrt(D/H).
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # (B, H, N, N)
        if mask is not None:
            keep = mask[:, None, None, :] | torch.eye(n, dtype=torch.bool, device=h.device)  # (B, 1, N, N)
            scores = scores.masked_fill(~keep, float("-inf"))  # a padded row still sees itself: no NaN
        attn = self.attn_dropout(torch.softmax(scores, dim=-1))  # (B, H, N, N)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.out_map(out)  # (B, N, D)
