"""What the token-pruning processor keeps for one generation: token roles, accumulated scores, the
kept tokens once decided, and the per-layer caches. Tensors and bookkeeping; no diffusers."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .clock import CallInfo
from .config import TokenPruneConfig
from .report import PruneReport, StepRecord
from .schedule import CallPlan, Schedule, plan_generation
from .scoring import (
    PADDING,
    SPECIAL,
    attention_mass,
    kept_index,
    normalise_scores,
    select_tokens,
    token_roles,
    unknown_roles,
)

__all__ = ["GenerationState", "GenerationFollower", "text_signature"]


@dataclass
class GenerationState:
    """One generation, as the processor follows it."""

    info: CallInfo  # the running call
    schedule: Schedule | None  # None when the number of calls is unknown: compute as stock
    report: PruneReport
    batch: int  # rows of the generation's first call
    plan: CallPlan  # the running call's plan
    stopped: bool = False  # the pipeline did something unforeseen: compute as stock from here on
    index: torch.Tensor | None = None  # (B, K) kept positions after the decision, or None: keep all
    valid: torch.Tensor | None = None  # (B, K) False on padded slots, or None
    uniform_rows: torch.Tensor | None = None  # (B,) rows whose tokens are all identical (SDXL's zero negative prompt)
    text_sig: tuple | None = None  # identity of the running call's prompt tensor (for K/V reuse)
    kv: dict = field(default_factory=dict)  # layer id -> (text, signature, index, key, value)
    out: dict = field(default_factory=dict)  # layer id -> cross-attention output kept for the gated calls
    layers: dict = field(default_factory=dict)  # layer id -> (dims, queries, tokens): the layers seen
    ran: set = field(default_factory=set)  # layers run on the running call

    @classmethod
    def start(cls, info: CallInfo, config: TokenPruneConfig) -> GenerationState:
        """A new generation: its schedule (None when the number of calls is unknown) and an empty report."""
        schedule = None
        if info.num_calls is not None:
            schedule = plan_generation(info.num_calls, warmup=config.warmup, gate=config.gate, calls_per_step=info.calls_per_step)
        report = PruneReport(num_calls=info.num_calls, schedule=schedule)
        return cls(info=info, schedule=schedule, report=report, batch=info.batch, plan=CallPlan(0, 0))

    def begin_call(self, info: CallInfo, config: TokenPruneConfig) -> str | None:
        """A denoiser call of this generation starts: take its plan, decide at the end of the warm-up,
        open its record. Returns why the generation stops here (computed as stock from now on), or None."""
        why = None
        if not self.stopped and info.call > 0:
            collapsed = self.schedule is not None and self.schedule[info.call].gated and 2 * info.batch == self.batch
            if info.num_calls is not None and info.call >= info.num_calls:
                why = f"the denoiser was called more than the {info.num_calls} times the pipeline announced"
            elif info.batch != self.batch and not collapsed:
                why = f"the batch changed from {self.batch} to {info.batch} rows in the middle of a generation"
            self.stopped = why is not None
        self.info, self.text_sig, self.ran = info, None, set()
        self.plan = CallPlan(info.call, info.call) if self.stopped or self.schedule is None else self.schedule[info.call]
        if self.plan.decide and self.report.roles is not None and self.report.keep is None:  # not decided early
            self.decide(config)
        counts = self.report.keep.sum(1).tolist() if self.plan.prune and self.index is not None else None
        self.report.steps.append(
            StepRecord(call=info.call, pruned=counts is not None, scored=self.plan.score, gated=self.plan.gated,
                       collapsed=info.batch < self.batch, kept_counts=counts)
        )
        return why

    def stop(self) -> None:
        """The pipeline did something unforeseen: the running call and the rest compute as stock."""
        self.stopped = True
        self.plan = CallPlan(self.info.call, self.info.call)
        if self.report.steps and self.report.steps[-1].call == self.info.call:
            self.report.steps[-1] = replace(self.report.steps[-1], pruned=False, scored=False, gated=False, kept_counts=None)

    @property
    def last_call(self) -> bool:
        return self.info.num_calls is not None and self.info.call >= self.info.num_calls - 1

    def bind_text(self, text: torch.Tensor, tokenizer: Any, zero_tail: bool = False) -> bool:
        """First layer of the generation that sees the text: token roles and the rows' identities.

        ``zero_tail``: the positions after the known ids are padding the pipeline added as zeros
        (SD3's T5 slot without T5). Returns False when the token ids are unknown (only position 0
        is then protected)."""
        rep, ids = self.report, self.info.token_ids
        B, L = text.shape[:2]
        known = ids is not None and ids.shape[0] == B and (ids.shape[1] == L or (zero_tail and ids.shape[1] < L))
        if known:
            bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
            roles = token_roles(ids.to(text.device), bos, eos)
            tail = L - ids.shape[1]
            rep.roles = torch.cat([roles, torch.full((B, tail), PADDING, dtype=roles.dtype, device=roles.device)], dim=1)
            rep.token_ids, rep.prompts = ids, self.info.prompts
            if tokenizer is not None:
                rep.tokens = [tokenizer.convert_ids_to_tokens(row) + ["<zero>"] * tail for row in ids.tolist()]
        else:
            rep.roles = unknown_roles(B, L, text.device)
        rep.mass = torch.zeros(B, L, dtype=torch.float32, device=text.device)
        self.uniform_rows = (text == text[:, :1]).flatten(1).all(dim=1)  # (B,)
        return known

    def decide(self, config: TokenPruneConfig) -> None:
        """The warm-up is over: choose the kept tokens once for the rest of the generation."""
        rep, cfg = self.report, config
        rep.scores = normalise_scores(rep.mass, rep.roles)  # (B, L)
        rep.keep = select_tokens(rep.scores, rep.roles, rule=cfg.rule, value=cfg.rule_value, min_tokens=cfg.min_tokens, padding=cfg.padding)
        # a row of identical tokens (SDXL's all-zero negative prompt) gives the same output from any
        # subset of them: keeping only its special tokens is exact
        rep.keep[self.uniform_rows] = rep.roles[self.uniform_rows] == SPECIAL
        if not bool(rep.keep.all()):
            self.index, self.valid = kept_index(rep.keep)

    def kept(self, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(index, valid) of the running call's ``batch`` rows; (None, None): every token."""
        if self.index is None or not (self.plan.prune or self.plan.gated):
            return None, None
        if self.index.shape[0] == batch:
            return self.index, self.valid  # the same objects on every call: K/V reuse hits
        # after guidance collapse only the last (positive) rows remain
        return self.index[-batch:], None if self.valid is None else self.valid[-batch:]

    def accumulate(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, config: TokenPruneConfig,
                   scale: float | None = None, text_from: int = 0, text_to: int | None = None,
                   spread: Any = None, lse: torch.Tensor | None = None) -> None:
        """Add one layer's attention mass (and per-position maps) to the scores; only the keys
        ``text_from:text_to`` are text (the others are the image keys of joint attention).
        ``spread`` maps per-key masses (..., K) of a gathered text stream back to its L positions;
        ``lse`` is the queries' log-sum-exp over every key, where the attention kernel returned it."""
        rep = self.report
        hw = _map_shape(query.shape[2], self.info.latent_hw) if config.record_maps else None
        mass, per_pos = attention_mass(query, key, mask, config.score_chunk, with_positions=hw is not None, scale=scale,
                                       keys_from=text_from, keys_to=text_to, lse=lse)
        rep.mass += spread(mass) if spread is not None else mass
        rep.scored_layers += 1
        if per_pos is None:
            return
        if rep.maps and spread != rep.map_scatter:  # the text stream changed: the sums so far to the L positions
            rep.spread_maps()
        if not rep.maps:
            rep.map_scatter = spread  # the maps are summed in the stream's K slots, spread when read (a K/L of the memory)
        elif rep.map_scatter is None and spread is not None:
            per_pos = spread(per_pos)
        m = per_pos.view(per_pos.shape[0], hw[0], hw[1], -1).permute(0, 3, 1, 2)  # (B, K or L, h, w)
        if hw in rep.maps:
            rep.maps[hw].add_(m)
        else:
            rep.maps[hw] = m.clone(memory_format=torch.contiguous_format)
        rep.map_counts[hw] = rep.map_counts.get(hw, 0) + query.shape[1]


class GenerationFollower:
    """Shared machinery of what follows a denoiser's clock to prune tokens (the UNet processor, the
    MM-DiT text-stream pruner): the running generation's state, plan, report and warnings."""

    config: TokenPruneConfig

    def __init__(self, config: TokenPruneConfig) -> None:
        self.config = config
        self.tokenizer = None  # the clock's, or set by hand for hand-written loops
        self.report: PruneReport | None = None  # the running or last generation
        self._gen: GenerationState | None = None
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        c = self.config
        merge = "" if c.merge_padding is None else f", merge_padding={c.merge_padding!r}"
        return (f"{type(self).__name__}({c.rule}={c.rule_value!r}, warmup={c.warmup!r}, min_tokens={c.min_tokens}, "
                f"padding={c.padding!r}{merge})")

    @property
    def schedule(self) -> Schedule | None:
        """The running (or last) generation's plan."""
        return self._gen.schedule if self._gen is not None else None

    @property
    def current_plan(self) -> CallPlan | None:
        """The running (or last) call's plan."""
        return self._gen.plan if self._gen is not None else None

    def _follow(self, info: CallInfo) -> GenerationState:
        """A denoiser call starts: a new generation's state, or the running one advanced."""
        if self._gen is None or info.generation != self._gen.info.generation:
            if info.tokenizer is not None:
                self.tokenizer = info.tokenizer
            self._gen = GenerationState.start(info, self.config)
            self.report = self._gen.report
        stop = self._gen.begin_call(info, self.config)
        if stop is not None:
            self._warn_once("stopped", f"token pruning stops pruning and gating for this generation: {stop}.")
        return self._gen

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)


def text_signature(t: torch.Tensor) -> tuple:
    """Identity of a prompt tensor's contents: storage, shape and in-place version counter (inference
    tensors keep no counter: a checksum of their values instead)."""
    changes = float(t.float().sum()) if t.is_inference() else t._version
    return (t.data_ptr(), tuple(t.shape), changes)


def _map_shape(n: int, latent_hw: tuple[int, int] | None) -> tuple[int, int] | None:
    """(h, w) of a layer with n image positions: a downsampling of the latent, or a square."""
    if latent_hw is not None:
        h, w = latent_hw
        for _ in range(8):
            if h * w == n:
                return (h, w)
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    side = math.isqrt(n)
    return (side, side) if side * side == n else None
