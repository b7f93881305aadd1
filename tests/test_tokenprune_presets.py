"""Named speed presets: one call installs pruning + gate + collapse + DeepCache as composed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tokenprune_diffusers import (  # noqa: E402
    PRESETS,
    CollapseGuidance,
    Preset,
    TokenPruneConfig,
    apply_deep_cache,
    apply_speedups,
    apply_token_pruning,
    get_deep_cache,
    get_token_pruning,
    remove_deep_cache,
    remove_speedups,
    remove_token_pruning,
)
from tokenprune_diffusers.deepcache import DeepCacheConfig  # noqa: E402
from tokenprune_diffusers.presets import preset_table  # noqa: E402

PROMPT = "a small red circle on the left, highly detailed"


@pytest.fixture
def pipe(tiny_pipe, one_torch_thread):
    yield tiny_pipe
    remove_speedups(tiny_pipe)


def generate(pipe, steps=10, **kw):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=steps, generator=g, height=32, width=32, output_type="np", **kw).images


def batches_of(pipe):
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a, kw: sizes.append(int((a[0] if a else kw["sample"]).shape[0])),
                                                 with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_equals_the_hand_composition(pipe, name):
    p = PRESETS[name]
    proc = apply_token_pruning(pipe, threshold=p.prune.threshold, warmup=p.prune.warmup, gate=p.prune.gate)
    apply_deep_cache(pipe, interval=p.cache.interval, start=p.cache.start, branch=p.cache.branch)
    by_hand = generate(pipe, callback_on_step_end=CollapseGuidance(proc, pipe))
    remove_deep_cache(pipe)
    remove_token_pruning(pipe)

    speedups = apply_speedups(pipe, name)
    assert get_token_pruning(pipe) is speedups.processor and get_deep_cache(pipe) is speedups.cache
    assert speedups.processor.config == p.prune and speedups.cache.config == p.cache
    sizes, handle = batches_of(pipe)
    out = generate(pipe, **speedups.call_kwargs)
    handle.remove()
    np.testing.assert_array_equal(out, by_hand)
    gate = speedups.processor.schedule.gate_start
    assert 0 < gate < len(sizes) and sizes == [2] * gate + [1] * (len(sizes) - gate)  # guidance collapsed at the gate
    assert speedups.cache.schedule.count(True) > 0  # and deep features were reused


def test_remove_restores_stock_and_apply_twice_replaces(pipe):
    stock = generate(pipe)
    apply_speedups(pipe, "fast")
    second = apply_speedups(pipe, "balanced")
    once = generate(pipe, **second.call_kwargs)
    remove_speedups(pipe)
    np.testing.assert_array_equal(generate(pipe), stock)
    assert get_token_pruning(pipe) is None and get_deep_cache(pipe) is None
    again = apply_speedups(pipe, "balanced")
    np.testing.assert_array_equal(generate(pipe, **again.call_kwargs), once)  # no state left by the first preset
    assert not np.array_equal(once, stock)  # approximate, as documented
    remove_speedups(pipe)
    remove_speedups(pipe)  # a no-op when nothing is installed


def test_custom_preset(pipe):
    mine = Preset(TokenPruneConfig(threshold=0.1, warmup=0.1, gate=0.3), DeepCacheConfig(interval=2, branch=0))
    s = apply_speedups(pipe, mine)
    assert s.cache.branch == 0 and s.processor.config.gate == 0.3
    assert np.isfinite(generate(pipe, **s.call_kwargs)).all()


def test_bad_presets_are_refused(pipe):
    with pytest.raises(ValueError, match="unknown preset 'quick'.*faithful, balanced, fast"):
        apply_speedups(pipe, "quick")
    with pytest.raises(TypeError, match="preset must be a name"):
        apply_speedups(pipe, 3)
    with pytest.raises(ValueError, match="needs a gate"):
        Preset(TokenPruneConfig(threshold=0.1), DeepCacheConfig(interval=3))
    with pytest.raises(TypeError, match="TokenPruneConfig and a DeepCacheConfig"):
        Preset(dict(gate=0.4), DeepCacheConfig(interval=3))
    with pytest.raises(TypeError, match="needs a pipeline with a UNet"):
        apply_speedups(pipe.unet, "balanced")
    assert get_token_pruning(pipe) is None and get_deep_cache(pipe) is None  # nothing left behind


def test_a_pipeline_the_collapse_cannot_halve_is_left_untouched(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "controlnet", object(), raising=False)
    with pytest.raises(ValueError, match="CollapseGuidance supports"):
        apply_speedups(pipe, "balanced")
    assert get_token_pruning(pipe) is None and get_deep_cache(pipe) is None


def test_the_docs_show_every_preset():
    import tokenprune_diffusers.presets as presets

    table = preset_table()
    assert all(f"`{name}`" in table for name in PRESETS) and table in presets.__doc__


def test_every_preset_is_a_measured_row_on_the_frontier():
    """The presets are read off the measured frontier: each is a row of ours there that no other row
    (the peers' included) beats on both speed-up and latent PSNR, and its docs quote that row."""
    import json
    from pathlib import Path

    from tokenprune_diffusers.presets import FRONTIER_RUN

    result = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"{FRONTIER_RUN}.json"
    rows = {r["row"]: r for r in json.loads(result.read_text())["rows"]}

    def dominated(r):
        return any(o is not r and o["speedup"] >= r["speedup"] and o["latent_psnr_db"] >= r["latent_psnr_db"]
                   and (o["speedup"], o["latent_psnr_db"]) != (r["speedup"], r["latent_psnr_db"]) for o in rows.values())

    for name, p in PRESETS.items():
        c = p.cache
        label = (f"ours preset {name}: gate {p.prune.gate:g} + collapse + DeepCache N={c.interval}"  # the --rows presets names
                 + ("" if c.branch is None else f" branch {c.branch}") + (f" from {c.start:g}" if c.start else ""))
        assert (p.prune.threshold, p.prune.warmup) == (0.1, p.prune.gate / 2)  # the benchmark's gated rows
        assert label in rows and not dominated(rows[label]), name
        assert f"{rows[label]['speedup']:.2f}x" in p.measured and f"{rows[label]['latent_psnr_db']:.1f} dB" in p.measured
