"""Merging text positions of an MM-DiT's text stream: tensors in, tensors out.

Shapes: B prompts (batch rows), L text positions as the pipeline built them, K positions the
transformer runs, D text width.

Attention over m identical keys (and values) equals attention over one of them with ``log(m)``
added to its logit, and identical text positions stay identical through every joint block of an
MM-DiT whose text stream has no positional encoding (SD3; Flux's text positions share one rotary
position). So a group of positions can run as one: its **representative** slot holds the mean of
the group's inputs and its key gets ``+ log(m)``. For identical positions (SD3's zero T5 slot
without T5) that is exact; for near-identical ones (CLIP's padding after end-of-text, which the
causal encoder makes a few clusters of almost equal vectors) it is approximate, and how close is
what :func:`similar_groups`'s threshold trades.

A grouping is written as ``rep`` (B, L) long: the position that stands for each position's group
(its first member; a position alone stands for itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .scoring import gather_rows, kept_index

__all__ = ["TextStream", "text_stream", "identical_groups", "similar_groups", "kept_groups"]


@dataclass(frozen=True)
class TextStream:
    """The text positions a joint-attention call runs on, as gathered from the pipeline's L positions.

    ``index`` (B, K): the gathered positions (a group's representative stands for the group);
    ``bias`` (B, K) additive logit bias of each text key (0; ``-inf`` on the padded slots of shorter
    rows; ``log(m)`` on a slot that stands for m positions), or None when every bias is 0; ``slot``
    (B, L): the gathered slot each original position is computed in (-1: left out); ``share``
    (B, K): the part of a slot's attention mass that each original position in it receives (1, or
    1/m for a merged slot); ``merged``: whether any slot stands for more than one position.
    """

    index: torch.Tensor
    bias: torch.Tensor | None
    slot: torch.Tensor
    share: torch.Tensor
    merged: bool = False

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) inputs -> (B, K, D): each slot's position, a merged slot the mean of its group."""
        out = gather_rows(x, self.index)  # (B, K, D)
        if not self.merged:
            return out
        member = self.slot >= 0  # (B, L)
        sums = torch.zeros_like(out).scatter_add_(
            1, self.slot.clamp_min(0)[..., None].expand(-1, -1, x.shape[-1]), x * member[..., None].to(x.dtype))
        share = self.share[..., None].to(x.dtype)  # (B, K, 1) = 1 / m
        return torch.where(share < 1, sums * share, out)

    def scatter(self, mass: torch.Tensor) -> torch.Tensor:
        """(B, ..., K) per-slot attention mass -> (B, ..., L) per original position (exact for
        identical positions: m identical keys each receive 1/m of what the one key with log(m)
        added to its logit receives)."""
        slot = self.slot.clamp_min(0)  # (B, L)
        per = (self.share.gather(1, slot) * (self.slot >= 0)).to(mass.dtype)  # (B, L)
        lead = mass.shape[1:-1]
        idx = slot.view(slot.shape[0], *([1] * len(lead)), -1).expand(*mass.shape[:-1], slot.shape[1])
        return mass.gather(-1, idx) * per.view(per.shape[0], *([1] * len(lead)), -1)


def identical_groups(identical: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, the positions of each row whose inputs are identical -> ``rep`` (B, L): all of
    them stand with the row's first one (:func:`kept_groups` restricts it to kept positions)."""
    B, L = identical.shape
    first = identical.int().argmax(1, keepdim=True)  # (B, 1)
    own = torch.arange(L, device=identical.device).expand(B, L)
    return torch.where(identical, first.expand(B, L), own)


def similar_groups(x: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy clustering of each row's candidate positions by cosine similarity -> ``rep`` (B, L).

    In position order, a candidate joins the group whose mean input is the most similar to it
    when that cosine similarity is >= ``threshold``, else starts a group; other positions stand
    alone. ``threshold`` 1.0 groups only (numerically) parallel vectors.

    Args:
        x: (B, L, D) inputs (the text stream before the first block).
        candidates: (B, L) bool, the positions that may merge (a zero vector never merges here).
        threshold: in (0, 1].
    """
    B, L, _ = x.shape
    rep = torch.arange(L, device=x.device).expand(B, L).clone()  # (B, L)
    cand = candidates & (x.abs().amax(-1) > 0)  # (B, L)
    if not bool(cand.any()):
        return rep
    v = F.normalize(x.float(), dim=-1)  # (B, L, D)
    sums = torch.zeros_like(v)  # (B, L, D): a group's summed unit inputs, at its representative
    live = torch.zeros(B, L, dtype=torch.bool, device=x.device)  # (B, L) representatives so far
    rows = torch.arange(B, device=x.device)
    for i in cand.any(0).nonzero().flatten().tolist():
        sim = torch.einsum("bld,bd->bl", F.normalize(sums, dim=-1), v[:, i])  # (B, L)
        sim = sim.masked_fill(~live, -math.inf)
        best, j = sim.max(1)  # (B,)
        join = cand[:, i] & (best >= threshold)  # (B,)
        new = cand[:, i] & ~join
        target = torch.where(join, j, torch.full_like(j, i))  # (B,)
        rep[cand[:, i], i] = target[cand[:, i]]
        sums[rows[cand[:, i]], target[cand[:, i]]] += v[cand[:, i], i]
        live[new, i] = True
    return rep


def kept_groups(rep: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``rep`` (B, L) restricted to the kept positions (B, L) bool: a group's kept members stay one
    group, the first of them standing for it; a left-out position stands alone. So keeping fewer
    positions never splits a group (never runs more slots than the grouping of all of them)."""
    B, L = rep.shape
    own = torch.arange(L, device=rep.device).expand(B, L)
    none = torch.full((B, L), L, dtype=rep.dtype, device=rep.device)
    first = none.scatter_reduce(1, rep, torch.where(keep, own, none), reduce="amin")  # (B, L) at a rep: its first kept member
    return torch.where(keep, first.gather(1, rep), own)


def text_stream(rep: torch.Tensor, keep: torch.Tensor | None = None) -> TextStream:
    """The positions to run: the kept ones, each group of ``rep`` as one slot.

    Args:
        rep: (B, L) long, the position standing for each position's group (itself when alone); a
            representative must be kept when any of its group is (:func:`kept_groups` makes it so).
        keep: (B, L) bool, the positions kept (None: all).

    Returns:
        A :class:`TextStream`; rows of different lengths are padded (``-inf`` bias on the slots).
    """
    B, L = rep.shape
    keep = torch.ones(B, L, dtype=torch.bool, device=rep.device) if keep is None else keep.to(rep.device)
    own = torch.arange(L, device=rep.device).expand(B, L)
    rep = torch.where(keep, rep, own)
    lead = keep & (rep == own)  # (B, L) the slots: kept representatives
    size = torch.zeros(B, L, device=rep.device).scatter_add_(1, rep, keep.float())  # (B, L) members, at the representative
    index, valid = kept_index(lead)  # (B, K)
    K = index.shape[1]
    valid = torch.ones(B, K, dtype=torch.bool, device=rep.device) if valid is None else valid
    m = size.gather(1, index).clamp_min(1)  # (B, K)
    merged = (m > 1) & valid
    bias = torch.where(merged, torch.log(m), torch.zeros(())).masked_fill(~valid, -math.inf)
    share = valid.float() / m  # (B, K)
    slot = torch.full((B, L), -1, dtype=torch.long, device=rep.device)
    rows = torch.arange(B, device=rep.device)[:, None].expand(B, K)
    slot[rows[valid], index[valid]] = torch.arange(K, device=rep.device).expand(B, K)[valid]
    slot = torch.where(keep, slot.gather(1, rep), slot.new_full((), -1))
    has_bias = bool(merged.any()) or not bool(valid.all())
    return TextStream(index=index, bias=bias if has_bias else None, slot=slot, share=share, merged=bool(merged.any()))
