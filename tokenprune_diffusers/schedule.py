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

from .config import check_unit

__all__ = ["CallPlan", "Schedule", "NonUniform", "plan_generation", "deep_cache_plan", "deep_cache_full_calls"]


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


@dataclass(frozen=True)
class NonUniform:
    """DeepCache's non-uniform 1:N schedule (Ma et al., Sec. 3.3): as many full calls as the uniform
    schedule of the same interval, placed densest around ``center`` and sparser away from it.

    The full calls are ``floor(c + sign(u) * |u| ** power)`` for ``u`` evenly spaced from
    ``-c ** (1 / power)`` to ``(M - c) ** (1 / power)`` (``M`` calls from ``start`` on, ``c = center * M``):
    ``power`` 1 spaces them evenly, larger powers crowd them around the center. Where two fall on
    the same call the power is lowered by 0.02 until they are distinct (as the paper's code does),
    down to 1.
    """

    center: float = 0.3  # share of the calls (from ``start`` on) where full calls are densest
    power: float = 1.4  # >= 1; 1: evenly spaced

    def __post_init__(self) -> None:
        check_unit("center", self.center)
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or not 1.0 <= self.power < math.inf:
            raise ValueError(f"power must be a finite number >= 1, got {self.power!r}")


def _nonuniform_full(m: int, n: int, spec: NonUniform) -> tuple[int, ...]:
    """``n`` distinct full calls among ``m`` (call 0 first), densest around ``spec.center * m``."""
    if n >= m:
        return tuple(range(m))
    c = spec.center * m
    power = spec.power
    while True:
        lo, hi = -(c ** (1 / power)), (m - c) ** (1 / power)
        points = [lo + (hi - lo) * i / n for i in range(n + 1)]
        calls = sorted({0} | {min(max(math.floor(c + math.copysign(abs(u) ** power, u) + 1e-9), 0), m - 1) for u in points[1:-1]})
        if len(calls) == n or power <= 1.0:
            return tuple(calls)
        power = max(power - 0.02, 1.0)


def deep_cache_full_calls(num_calls: int, interval: int, start: float = 0.0, *,
                          schedule: NonUniform | None = None, calls_per_step: int = 1) -> tuple[int, ...]:
    """The planned full calls of a generation (before any call is forced full): every call before
    ``start`` (call 0 at least); from the last of them, on the ``M`` calls left, ``ceil(M / interval)``
    full calls: every ``interval``-th (``schedule=None``, uniform) or placed by :class:`NonUniform`."""
    if num_calls < 1 or calls_per_step < 1:
        raise ValueError(f"num_calls and calls_per_step must be >= 1, got {num_calls} and {calls_per_step}")
    base = _first_call_of_step(start, num_calls, calls_per_step) - 1  # the last full call before reuse may begin
    m = num_calls - base
    rest = range(0, m, interval) if schedule is None else _nonuniform_full(m, math.ceil(m / interval), schedule)
    return tuple(range(base)) + tuple(base + c for c in rest)


def deep_cache_plan(
    num_calls: int,
    interval: int,
    start: float = 0.0,
    *,
    calls_per_step: int = 1,
    full: frozenset[int] | set[int] = frozenset(),
    schedule: NonUniform | None = None,
) -> tuple[bool, ...]:
    """Per call, True where DeepCache reuses the deep features of the last full call.

    Call 0 and the calls in ``full`` (where the batch changed, e.g. at guidance collapse) are full;
    before ``start`` (a share of the steps) every call is full. From there, uniform
    (``schedule=None``): one full call and ``interval - 1`` cached calls, counted from the last
    full call (a forced full call restarts the count); :class:`NonUniform`: the full calls of
    :func:`deep_cache_full_calls`, plus the forced ones.
    """
    if schedule is not None:
        planned = set(deep_cache_full_calls(num_calls, interval, start, schedule=schedule, calls_per_step=calls_per_step))
        return tuple(c not in planned and c not in full for c in range(num_calls))
    first = _first_call_of_step(start, num_calls, calls_per_step)
    reuse, since_full = [], 0
    for c in range(num_calls):
        cached = c >= first and c not in full and since_full + 1 < interval
        since_full = since_full + 1 if cached else 0
        reuse.append(cached)
    return tuple(reuse)
