"""The schedule is pure: options and numbers of calls in, a per-call plan out."""

from __future__ import annotations

import pytest

from tokenprune_diffusers.schedule import NonUniform, deep_cache_full_calls, deep_cache_plan, plan_generation


def flags(schedule, name):
    return [getattr(p, name) for p in schedule.calls]


@pytest.mark.parametrize(
    "warmup, n, start", [(0.2, 10, 2), (0.2, 11, 3), (0.0, 10, 1), (1.0, 10, None), (0.5, 3, 2), (0.2, 1, None), (0.99, 10, None)]
)
def test_pruning_starts_at_the_first_call_after_the_warmup_share(warmup, n, start):
    s = plan_generation(n, warmup=warmup)
    assert s.prune_start == start
    assert flags(s, "score") == [start is not None and c < start for c in range(n)]
    assert flags(s, "prune") == [start is not None and c >= start for c in range(n)]
    assert flags(s, "decide") == [c == start for c in range(n)]


def test_warmup_one_never_scores_and_never_prunes():
    s = plan_generation(25, warmup=1.0)
    assert s.prune_start is None and not any(flags(s, "score") + flags(s, "prune"))


def test_no_warmup_option_means_no_pruning_at_all():
    s = plan_generation(10, warmup=None, gate=0.5)
    assert not any(flags(s, "score")) and flags(s, "gated") == [c >= 5 for c in range(10)]


def test_gate_fills_on_the_last_computed_call_and_collapse_follows_it():
    s = plan_generation(10, warmup=0.2, gate=0.4, collapse=True)
    assert (s.prune_start, s.gate_start) == (2, 4)
    assert flags(s, "fill") == [c == 3 for c in range(10)]
    assert flags(s, "gated") == flags(s, "collapsed") == [c >= 4 for c in range(10)]
    assert flags(s, "prune") == [2 <= c < 4 for c in range(10)]  # gated calls compute nothing to prune
    assert not any(flags(plan_generation(10, warmup=0.2, gate=0.4), "collapsed"))


@pytest.mark.parametrize("gate, start", [(1.0, None), (0.0, 1), (0.95, None), (0.9, 9)])
def test_at_least_one_call_is_computed_and_a_gate_at_the_end_never_gates(gate, start):
    assert plan_generation(10, gate=gate).gate_start == start


def test_a_warmup_that_reaches_the_gate_scores_nothing():
    s = plan_generation(10, warmup=0.5, gate=0.5)
    assert s.prune_start is None and not any(flags(s, "score")) and s.gate_start == 5


def test_heun_boundaries_fall_on_whole_steps():
    """Heun: 4 steps are 7 calls (the last step has one); the warm-up is a share of the steps."""
    s = plan_generation(7, warmup=0.3, gate=0.75, calls_per_step=2)
    assert flags(s, "step") == [0, 0, 1, 1, 2, 2, 3]
    assert (s.prune_start, s.gate_start) == (4, 6)  # step 2 = ceil(0.3 * 4), step 3 = ceil(0.75 * 4)
    assert s.table().splitlines() == [
        "call  step  score  prune  gated  collapsed",
        "   0     0    yes      -      -          -",
        "   1     0    yes      -      -          -",
        "   2     1    yes      -      -          -",
        "   3     1    yes      -      -          -",
        "   4     2      -    yes      -          -",
        "   5     2      -    yes      -          -",
        "   6     3      -      -    yes          -",
    ]


def test_a_call_beyond_the_announced_ones_is_planned_as_stock():
    s = plan_generation(3, warmup=0.0)
    extra = s[5]
    assert (extra.call, extra.score, extra.prune, extra.gated) == (5, False, False, False)
    assert s.to_dict()["calls"][1]["decide"] and len(s) == 3


def test_bad_numbers_are_refused():
    with pytest.raises(ValueError, match="num_calls"):
        plan_generation(0, warmup=0.2)


def test_deep_cache_plan_one_full_then_interval_minus_one_cached():
    assert deep_cache_plan(8, 3) == (False, True, True, False, True, True, False, True)
    assert deep_cache_plan(5, 1) == (False,) * 5
    assert deep_cache_plan(6, 2, start=0.5) == (False, False, False, True, False, True)


def test_deep_cache_plan_restarts_at_a_forced_full_call():
    assert deep_cache_plan(8, 3, full={4}) == (False, True, True, False, False, True, True, False)
    assert deep_cache_plan(7, 2, calls_per_step=2, start=0.5) == (False, False, False, False, True, False, True)


def test_non_uniform_full_calls_crowd_around_the_center():
    """50 calls, interval 5: the same 10 full calls as uniform, gaps smallest around call 15
    (hand-computed: u from -15**(1/1.4) to 35**(1/1.4) in 10 steps, floor(15 + sign(u)|u|**1.4))."""
    full = deep_cache_full_calls(50, 5, schedule=NonUniform(center=0.3, power=1.4))
    assert full == (0, 5, 10, 13, 15, 19, 24, 29, 35, 42)
    assert len(full) == len(deep_cache_full_calls(50, 5)) == 10
    gaps = [b - a for a, b in zip(full, full[1:])]
    assert min(gaps) == gaps[3] == 2 and gaps[-1] == 7  # densest at the center, sparsest at the end
    plan = deep_cache_plan(50, 5, schedule=NonUniform(center=0.3, power=1.4))
    assert [c for c in range(50) if not plan[c]] == list(full)


def test_non_uniform_power_one_spaces_evenly_and_a_late_center_crowds_the_end():
    assert deep_cache_full_calls(10, 3, schedule=NonUniform(center=0.0, power=1.0)) == (0, 2, 5, 7)
    assert deep_cache_full_calls(10, 3, schedule=NonUniform(center=1.0, power=2.0)) == (0, 4, 7, 9)


def test_non_uniform_after_start_and_with_forced_full_calls():
    """Before start (20% of 20 calls) every call is full; the non-uniform calls follow from call 3."""
    spec = NonUniform()
    assert deep_cache_full_calls(20, 3, 0.2, schedule=spec) == (0, 1, 2, 3, 6, 8, 9, 12, 15)
    plan = deep_cache_plan(20, 3, 0.2, schedule=spec, full={4})
    assert [c for c in range(20) if not plan[c]] == [0, 1, 2, 3, 4, 6, 8, 9, 12, 15]


def test_non_uniform_lowers_the_power_until_the_full_calls_are_distinct():
    """Power 3 around call 15 of 50 would put several full calls on one; it is lowered until 5 are distinct."""
    full = deep_cache_full_calls(50, 10, schedule=NonUniform(center=0.3, power=3.0))
    assert full == (0, 12, 14, 15, 24) and len(set(full)) == 5


def test_full_calls_of_the_uniform_schedule_are_its_plan():
    for n, interval, start, cps in [(8, 3, 0.0, 1), (6, 2, 0.5, 1), (7, 2, 0.5, 2), (1, 4, 0.0, 1), (9, 1, 0.3, 1)]:
        full = set(deep_cache_full_calls(n, interval, start, calls_per_step=cps))
        assert deep_cache_plan(n, interval, start, calls_per_step=cps) == tuple(c not in full for c in range(n))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(center=1.5), r"center must be a number in \[0, 1\], got 1.5"),
        (dict(center=float("nan")), r"center must be a number in \[0, 1\], got nan"),
        (dict(power=0.5), "power must be a finite number >= 1, got 0.5"),
        (dict(power=float("inf")), "power must be a finite number >= 1, got inf"),
        (dict(power=True), "power must be a finite number >= 1, got True"),
    ],
)
def test_bad_non_uniform_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonUniform(**kwargs)
