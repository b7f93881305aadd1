"""When things happen in a generation: pure functions from options to a per-call plan.

No diffusers, no torch: numbers in, a table out. The processor, :class:`~tokenprune_diffusers.CollapseGuidance`
and :class:`~tokenprune_diffusers.DeepCache` act on these plans, the report prints them, and the
tests assert on them.

A generation is ``num_calls`` denoiser calls, grouped into steps of ``calls_per_step`` calls (the
scheduler's ``order``: 1 for DDIM, Euler or DPM++ 2M; 2 for Heun, whose last step has one call).
Every share (warm-up, gate, DeepCache's start) is a share of the *steps*, and every boundary falls
on the first call of a step, so that the two calls of a Heun step always see the same tokens. With
one call per step, steps and calls are the same.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["CallPlan", "Schedule", "plan_generation", "deep_cache_plan"]


@dataclass(frozen=True)
class CallPlan:
    """What one denoiser call does in every cross-attention layer."""

    call: int  # index of the call in the generation
    step: int  # index of its step
    score: bool = False  # warm-up: every token kept; attention probabilities added to the scores
    prune: bool = False  # the tokens pruned at the end of the warm-up are left out
    decide: bool = False  # first pruned call: the kept tokens are chosen from the scores, once
    fill: bool = False  # last computed call before the gate: each layer keeps its output
    gated: bool = False  # cross-attention is skipped: each layer's kept output is reused
    collapsed: bool = False  # under CollapseGuidance: the call runs the positive (prompt) rows only


@dataclass(frozen=True)
class Schedule:
    """The plan of a whole generation; ``schedule[c]`` is call ``c``'s :class:`CallPlan`."""

    num_calls: int
    calls_per_step: int
    prune_start: int | None  # first pruned call; None: nothing is scored or pruned
    gate_start: int | None  # first gated call; None: never gated
    calls: tuple[CallPlan, ...]

    def __getitem__(self, call: int) -> CallPlan:
        """The plan of ``call``; a call beyond the announced ones computes as stock."""
        if 0 <= call < len(self.calls):
            return self.calls[call]
        return CallPlan(call=call, step=call // self.calls_per_step)

    def __len__(self) -> int:
        return len(self.calls)

    def table(self) -> str:
        """One line per call: ``call step score prune gated collapsed``."""
        lines = ["call  step  score  prune  gated  collapsed"]
        for p in self.calls:
            flags = "  ".join(f"{'yes' if f else '-':>5s}" for f in (p.score, p.prune, p.gated))
            lines.append(f"{p.call:4d}  {p.step:4d}  {flags}  {'yes' if p.collapsed else '-':>9s}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "num_calls": self.num_calls,
            "calls_per_step": self.calls_per_step,
            "prune_start": self.prune_start,
            "gate_start": self.gate_start,
            "calls": [asdict(p) for p in self.calls],
        }


def num_steps(num_calls: int, calls_per_step: int = 1) -> int:
    """Steps of a generation of ``num_calls`` calls (Heun's last step has one call)."""
    return math.ceil(num_calls / calls_per_step)


def _first_call_of_step(share: float, num_calls: int, calls_per_step: int) -> int:
    """First call of step ``ceil(share * steps)``, at least step 1, at most the end of the generation."""
    steps = num_steps(num_calls, calls_per_step)
    step = min(max(math.ceil(share * steps - 1e-9), 1), steps)
    return min(step * calls_per_step, num_calls)


def plan_generation(
    num_calls: int,
    *,
    warmup: float | None = None,
    gate: float | None = None,
    collapse: bool = False,
    calls_per_step: int = 1,
) -> Schedule:
    """The per-call plan of token pruning, gating and guidance collapse.

    Args:
        num_calls: denoiser calls in the generation.
        warmup: share of the steps that keep every token and are scored (at least one step is
            scored); None: no pruning.
        gate: share of the steps after which cross-attention is gated (at least one step is
            computed); None, or a gate at the last step: never gated.
        collapse: whether CollapseGuidance runs the gated calls on the positive rows only.
        calls_per_step: denoiser calls per solver step (the scheduler's ``order``).

    Pruning needs a computed call after the warm-up: when the warm-up reaches the gate (or the end),
    nothing is scored or pruned, and the output is exactly what it would be without pruning.
    """
    if num_calls < 1 or calls_per_step < 1:
        raise ValueError(f"num_calls and calls_per_step must be >= 1, got {num_calls} and {calls_per_step}")
    gate_start = None
    if gate is not None:
        gate_start = _first_call_of_step(gate, num_calls, calls_per_step)
        gate_start = None if gate_start >= num_calls else gate_start
    computed = num_calls if gate_start is None else gate_start  # calls that compute cross-attention
    prune_start = None
    if warmup is not None:
        prune_start = _first_call_of_step(warmup, num_calls, calls_per_step)
        prune_start = None if prune_start >= computed else prune_start
    calls = []
    for c in range(num_calls):
        gated = gate_start is not None and c >= gate_start
        calls.append(
            CallPlan(
                call=c,
                step=c // calls_per_step,
                score=prune_start is not None and c < prune_start,
                prune=prune_start is not None and prune_start <= c < computed,
                decide=c == prune_start,
                fill=gate_start is not None and c == gate_start - 1,
                gated=gated,
                collapsed=collapse and gated,
            )
        )
    return Schedule(num_calls, calls_per_step, prune_start, gate_start, tuple(calls))


def deep_cache_plan(
    num_calls: int,
    interval: int,
    start: float = 0.0,
    *,
    calls_per_step: int = 1,
    full: frozenset[int] | set[int] = frozenset(),
) -> tuple[bool, ...]:
    """Per call, True where DeepCache reuses the deep features of the last full call.

    Call 0 and the calls in ``full`` (where the batch changed, e.g. at guidance collapse) are full;
    before ``start`` (a share of the steps) every call is full; from there, one full call and
    ``interval - 1`` cached calls, counted from the last full call.
    """
    first = _first_call_of_step(start, num_calls, calls_per_step)
    reuse, since_full = [], 0
    for c in range(num_calls):
        cached = c >= first and c not in full and since_full + 1 < interval
        since_full = since_full + 1 if cached else 0
        reuse.append(cached)
    return tuple(reuse)
