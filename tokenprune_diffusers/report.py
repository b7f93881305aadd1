"""What a generation did: per denoiser call, which tokens were kept, and what it cost against stock."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .schedule import Schedule
from .scoring import PADDING, SPECIAL

__all__ = ["StepRecord", "PruneReport", "SAVINGS", "cross_attention_flops", "add_cross_attention_flops", "JointDims",
           "joint_transformer_flops", "add_text_stream_flops"]

_LABELS = {"merge": "merges", "pruning": "pruning", "kv_reuse": "K/V reuse", "gating": "gating", "collapse": "guidance collapse",
           "deep_cache": "DeepCache", "scoring": "scoring"}


def cross_attention_flops(batch: int, queries: int, tokens: int, query_dim: int, cross_dim: int, inner: int, out_dim: int) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one cross-attention call, split into its parts."""
    return {
        "q_proj": 2.0 * batch * queries * query_dim * inner,
        "kv_proj": 2.0 * 2 * batch * tokens * cross_dim * inner,
        "scores": 2.0 * batch * queries * tokens * inner,
        "weighting": 2.0 * batch * queries * tokens * inner,
        "out_proj": 2.0 * batch * queries * inner * out_dim,
    }


SAVINGS = ("merge", "pruning", "kv_reuse", "gating", "collapse", "deep_cache")  # causes of FLOPs removed, in this order


@dataclass(frozen=True)
class JointDims:
    """What the FLOPs of an MM-DiT transformer call depend on (read from its config by the wiring)."""

    width: int  # D: heads x head dim, the width of both streams
    text_in: int  # the text encoder's width, the context embedder's input
    double: int  # joint (double-stream) blocks: each stream its own projections and MLP
    single: int = 0  # single-stream blocks (Flux): one projection set and MLP over image + text
    pre_only_last: bool = False  # the last joint block projects the text to K/V only (SD3)
    dual: int = 0  # joint blocks with a second, image-only attention (SD3.5)
    image_in: int = 0  # features of one image token entering the patch embedding (p * p * C)
    image_out: int = 0  # features of one image token leaving the output projection
    cond_in: int = 0  # inputs of the conditioning MLPs per row (timestep, pooled text, guidance)
    cond_mlps: int = 2  # conditioning MLPs (each: its input -> D -> D)
    mlp_ratio: int = 4


def joint_transformer_flops(dims: JointDims, batch: int, image: int, text: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one MM-DiT transformer call: ``batch`` rows of ``image``
    image and ``text`` text tokens. Linear layers and attention matmuls (QK^T and the weighting);
    norms, activations and the rotary embedding are left out."""
    D, m, S = dims.width, dims.mlp_ratio, image + text
    per_token = (3 + 1 + 2 * m) * D * D  # q, k, v, out projections and the MLP, MACs per token and stream
    attention = 2 * S * S * D  # QK^T and the weighting over the joint sequence
    text_pre = 3 * D * D  # the last SD3 block: the text stream's K/V/Q projections only
    double = dims.double * (image * per_token + attention) + (dims.double - dims.pre_only_last) * text * per_token
    double += dims.pre_only_last * text * text_pre + dims.dual * (image * 4 * D * D + 2 * image * image * D)
    single = dims.single * (S * per_token + attention)
    modulation = (dims.double * 12 + dims.single * 3 + 2) * D * D  # adaLN linears, per row
    embed = text * dims.text_in * D + image * (dims.image_in + dims.image_out) * D + dims.cond_in * D + dims.cond_mlps * D * D
    return 2.0 * batch * (double + single + modulation + embed)


@dataclass
class StepRecord:
    """One denoiser call of a generation.

    FLOPs are those of the cross-attention layers (UNet), or of the whole transformer call (MM-DiT:
    :func:`joint_transformer_flops`), measured against stock: ``flops_stock`` is what
    the stock processors compute on this call (every layer, every row of the generation's batch,
    every token); ``saved[cause]`` what each mechanism removed from it, attributed in the order of
    :data:`SAVINGS` (on a gated call everything goes to gating, none to pruning); ``flops_scoring``
    what the warm-up's scoring added. ``flops_done = flops_stock - sum(saved) + flops_scoring``.
    """

    call: int  # index of the call in the generation
    pruned: bool  # were tokens removed on this call
    scored: bool  # were attention probabilities computed on this call
    gated: bool = False  # was cross-attention skipped (outputs of an earlier call reused)
    collapsed: bool = False  # did the call run the positive rows only (guidance collapse)
    kept_counts: list[int] | None = None  # kept tokens per batch row (None: all kept)
    text_positions: int | None = None  # MM-DiT: text positions the transformer ran on this call
    flops_stock: float = 0.0
    flops_done: float = 0.0
    flops_scoring: float = 0.0
    saved: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SAVINGS, 0.0))
    layers: int = 0  # cross-attention layers run


def add_cross_attention_flops(
    step: StepRecord, dims: dict, stock_batch: int, batch: int, queries: int, full_len: int, kept_len: int,
    *, scored: bool = False, kv_reused: bool = False, gated: bool = False, skipped: bool = False,
) -> None:
    """Add one layer's cross-attention FLOPs on one call to ``step``, against stock, by cause.

    Stock computes ``stock_batch`` rows and ``full_len`` tokens; this call ran ``batch`` rows (fewer
    after guidance collapse) and ``kept_len`` tokens (after pruning, padded to the longest row). A
    ``gated`` layer reused its kept output; a ``skipped`` one did not run at all (DeepCache).
    """
    stock = sum(cross_attention_flops(stock_batch, queries, full_len, **dims).values())  # every row, every token
    rows = cross_attention_flops(batch, queries, full_len, **dims)  # the rows this call runs
    kept = cross_attention_flops(batch, queries, kept_len, **dims)
    saved = dict.fromkeys(SAVINGS, 0.0)
    saved["collapse"] = stock - sum(rows.values())
    if skipped or gated:
        saved["deep_cache" if skipped else "gating"] = sum(rows.values())
    else:
        saved["pruning"] = sum(rows.values()) - sum(kept.values())
        saved["kv_reuse"] = kept["kv_proj"] if kv_reused else 0.0
    scoring = rows["scores"] if scored else 0.0
    step.flops_stock += stock
    step.flops_scoring += scoring
    step.flops_done += stock - sum(saved.values()) + scoring
    for cause, flops in saved.items():
        step.saved[cause] += flops
    step.layers += 0 if skipped else 1


def add_text_stream_flops(step: StepRecord, dims: JointDims, batch: int, image: int, full_len: int, merged_len: int,
                          run_len: int, *, scored_blocks: int = 0) -> None:
    """Record one MM-DiT transformer call in ``step``, against stock (``full_len`` text positions):
    the merges alone (SD3's zero positions, ``merge_padding``'s groups) would run ``merged_len``
    positions, the call ran ``run_len`` (rows padded to the longest); ``scored_blocks`` blocks
    computed the warm-up's scores (the image queries against every key once more)."""
    stock = joint_transformer_flops(dims, batch, image, full_len)
    merged = joint_transformer_flops(dims, batch, image, merged_len)
    done = joint_transformer_flops(dims, batch, image, run_len)
    scoring = 2.0 * batch * image * (image + run_len) * dims.width * scored_blocks
    step.text_positions = run_len
    step.flops_stock += stock
    step.saved["merge"] += stock - merged
    step.saved["pruning"] += merged - done
    step.flops_scoring += scoring
    step.flops_done += done + scoring


@dataclass
class PruneReport:
    """The record of one generation, filled by the processor as the generation runs.

    Rows are denoiser batch rows: under classifier-free guidance the negative prompts come first.
    """

    num_calls: int | None  # denoiser calls of the generation (None when unknown)
    schedule: Schedule | None = None  # the plan the generation followed (None when the calls are unknown)
    prompts: list[str] | None = None  # text of each row, when known (as the tokenizer reads it)
    token_ids: torch.Tensor | None = None  # (B, L) ids, when known
    tokens: list[list[str]] | None = None  # (B, L) token strings, when a tokenizer is known
    roles: torch.Tensor | None = None  # (B, L) roles (scoring.SPECIAL / WORD / PADDING)
    mass: torch.Tensor | None = None  # (B, L) raw mass accumulated over the scored calls (sum)
    scored_layers: int = 0  # layer calls summed into mass
    scores: torch.Tensor | None = None  # (B, L) normalised scores at the pruning decision
    keep: torch.Tensor | None = None  # (B, L) bool: tokens kept after the warm-up
    steps: list[StepRecord] = field(default_factory=list)
    flops_scope: str = "cross-attention"  # what the FLOPs count: "cross-attention" (UNet) or "transformer" (MM-DiT)
    maps: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (h, w) -> (B, L, h, w) sums, or
    # (B, K, h, w) over the K slots of a gathered text stream (MM-DiT) while `map_scatter` is set: read token_maps
    map_scatter: Callable[[torch.Tensor], torch.Tensor] | None = None  # (..., K) -> (..., L), or None
    map_counts: dict[tuple[int, int], int] = field(default_factory=dict)

    @property
    def attention(self) -> str:
        """The attention the scores come from: "cross-attention" (UNet) or "joint attention" (MM-DiT)."""
        return "joint attention" if self.flops_scope == "transformer" else "cross-attention"

    @property
    def prune_start(self) -> int | None:
        """First pruned call (None: nothing pruned)."""
        return self.schedule.prune_start if self.schedule is not None else None

    # ----- what people ask -----
    @property
    def flops_saved(self) -> float:
        """Share of stock FLOPs (:attr:`flops_scope`) saved over the generation, all causes, scoring counted."""
        stock = sum(s.flops_stock for s in self.steps)
        return 0.0 if stock == 0 else 1.0 - sum(s.flops_done for s in self.steps) / stock

    def savings(self) -> dict[str, float]:
        """Share of stock FLOPs (:attr:`flops_scope`) removed by each cause (:data:`SAVINGS`), and
        ``"scoring"``: the share added by scoring, negative. They sum to :attr:`flops_saved`."""
        stock = sum(s.flops_stock for s in self.steps)
        out = {cause: sum(s.saved[cause] for s in self.steps) / stock if stock else 0.0 for cause in SAVINGS}
        out["scoring"] = -sum(s.flops_scoring for s in self.steps) / stock if stock else 0.0
        return out

    @property
    def batch_size(self) -> int | None:
        """Denoiser batch rows of the generation (None before any call was recorded)."""
        for t in (self.roles, self.mass, self.keep, self.token_ids, *self.maps.values()):
            if t is not None:
                return int(t.shape[0])
        return len(self.tokens) if self.tokens is not None else None

    def row_index(self, row: int) -> int:
        """``row`` as an index in ``[0, B)``; negative rows count from the end. Raises IndexError
        naming the row and the batch size when it is out of range (never wraps around)."""
        B = self.batch_size
        try:
            if isinstance(row, bool):
                raise TypeError
            row = operator.index(row)
        except TypeError:
            raise TypeError(f"row must be an integer, got {row!r}") from None
        if B is None:
            raise IndexError(f"row {row}: the report holds no rows yet (no generation recorded)")
        if not -B <= row < B:
            raise IndexError(f"row must be in [-{B}, {B}) for this report's batch of {B} rows, got {row}")
        return row % B

    def kept_positions(self, row: int) -> list[int]:
        """Positions kept after the warm-up for one batch row (all when nothing was pruned)."""
        row = self.row_index(row)
        if self.keep is None:
            n = self.roles.shape[1] if self.roles is not None else 0
            return list(range(n))
        return self.keep[row].nonzero().flatten().tolist()

    def pruned_positions(self, row: int) -> list[int]:
        row = self.row_index(row)
        if self.keep is None:
            return []
        return (~self.keep[row]).nonzero().flatten().tolist()

    def words(self, row: int, positions: list[int] | None = None, padding: bool = False) -> list[str]:
        """Token strings of a row (``</w>`` stripped), optionally only at ``positions``."""
        if self.tokens is None:
            return []
        toks = self.tokens[self.row_index(row)]
        positions = range(len(toks)) if positions is None else positions
        roles = self.roles[row] if self.roles is not None else None
        return [
            toks[p].replace("</w>", "")
            for p in positions
            if padding or roles is None or int(roles[p]) != PADDING
        ]

    def kept_words(self, row: int) -> list[str]:
        return self.words(row, self.kept_positions(row))

    def pruned_words(self, row: int) -> list[str]:
        return self.words(row, self.pruned_positions(row))

    def spread_maps(self) -> None:
        """Turn maps summed over a gathered text stream's K slots into maps of the L positions (in place)."""
        if self.map_scatter is not None:
            self.maps = {hw: self._spread(acc) for hw, acc in self.maps.items()}
            self.map_scatter = None

    def _spread(self, acc: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) slot sums -> (B, L, h, w) per position (identity without ``map_scatter``)."""
        if self.map_scatter is None:
            return acc
        return self.map_scatter(acc.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def token_maps(self, row: int, size: tuple[int, int] | None = None) -> torch.Tensor | None:
        """(L, h, w) mean attention map of each token over the scored calls and layers."""
        if not self.maps:
            return None
        size = size or max(self.maps, key=lambda hw: hw[0] * hw[1])
        row = self.row_index(row)
        total = None
        for hw, acc in self.maps.items():
            m = self._spread(acc)[row : row + 1] / self.map_counts[hw]  # (1, L, h, w)
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False) if hw != size else m
            total = m if total is None else total + m
        return (total / len(self.maps))[0]  # (L, h, w)

    def summary(self, max_rows: int = 4) -> str:
        """A readable account: schedule, per-row kept / pruned words with scores, FLOPs saved."""
        lines = []
        n = self.num_calls if self.num_calls is not None else "?"
        start = self.prune_start if self.prune_start is not None else "never"
        scored = f"0..{self.prune_start - 1}" if self.prune_start else "none"
        gate = self.schedule.gate_start if self.schedule is not None else None
        gated = f"; gated from call: {gate}" if gate is not None else ""
        lines.append(f"denoiser calls: {n}; scored calls: {scored}; pruned from call: {start}{gated}")
        if self.keep is not None and self.scores is not None:
            rows = self.keep.shape[0]
            for r in range(min(rows, max_rows)):
                label = f"row {r}" + (f" ({self.prompts[r]!r})" if self.prompts else "")
                lines.append(label)
                for p in range(self.keep.shape[1]):
                    role = int(self.roles[r, p]) if self.roles is not None else -1
                    if role == PADDING:
                        continue
                    tok = self.tokens[r][p].replace("</w>", "") if self.tokens else f"#{p}"
                    state = "kept (special)" if role == SPECIAL else ("kept" if bool(self.keep[r, p]) else "PRUNED")
                    lines.append(f"    {p:3d} {tok:<18s} score {float(self.scores[r, p]):7.3f}  {state}")
                if self.roles is not None:
                    pad = self.roles[r] == PADDING
                    if bool(pad.any()):
                        kept_pad = int((self.keep[r] & pad).sum())
                        lines.append(f"    padding: {kept_pad}/{int(pad.sum())} positions kept")
            if rows > max_rows:
                lines.append(f"    ... {rows - max_rows} more rows")
        text = any(s.text_positions is not None for s in self.steps)
        lines.append("call  scored  pruned   gated  collapsed  kept tokens per row" + ("  text positions run" if text else ""))
        for s in self.steps:
            kept = "-" if s.gated else "all" if s.kept_counts is None else ",".join(map(str, s.kept_counts))
            flags = "  ".join(f"{'yes' if f else 'no':>6s}" for f in (s.scored, s.pruned, s.gated))
            flags += f"  {'yes' if s.collapsed else 'no':>9s}"
            run = f"  {s.text_positions}" if s.text_positions is not None else ""
            lines.append(f"{s.call:4d}  {flags}  {kept:<19s}{run}" if text else f"{s.call:4d}  {flags}  {kept}")
        if any(s.flops_stock for s in self.steps):
            parts = ", ".join(f"{_LABELS[k]} {100 * v:+.1f}%" for k, v in self.savings().items() if v or k in ("pruning", "scoring"))
            lines.append(f"{self.flops_scope} FLOPs saved against stock: {100 * self.flops_saved:.1f}% ({parts})")
        else:
            lines.append("FLOPs: not counted (no denoiser call was recorded)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable view."""
        return {
            "num_calls": self.num_calls,
            "prune_start": self.prune_start,
            "schedule": self.schedule.to_dict() if self.schedule is not None else None,
            "prompts": self.prompts,
            "flops_scope": self.flops_scope,
            "flops_saved": self.flops_saved,
            "flops_saved_by": self.savings(),
            "rows": [
                {
                    "kept_positions": self.kept_positions(r),
                    "kept_words": self.kept_words(r),
                    "pruned_words": self.pruned_words(r),
                    "scores": None if self.scores is None else [round(float(x), 5) for x in self.scores[r]],
                }
                for r in range(self.keep.shape[0] if self.keep is not None else 0)
            ],
            "steps": [s.__dict__ for s in self.steps],
        }
