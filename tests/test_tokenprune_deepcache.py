"""Deep-feature reuse (DeepCache) as diffusers hooks, alone and with pruning, gating and collapse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tokenprune_diffusers import (  # noqa: E402
    CollapseGuidance,
    apply_deep_cache,
    apply_token_pruning,
    get_deep_cache,
    remove_deep_cache,
    remove_token_pruning,
)

PROMPT = "a small red circle on the left, highly detailed"


@pytest.fixture
def pipe(tiny_pipe):
    yield tiny_pipe
    remove_deep_cache(tiny_pipe)
    remove_token_pruning(tiny_pipe)


def generate(pipe, steps=6, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=steps, generator=g, height=32, width=32, output_type="np", **kw).images


def deep_work(pipe):
    """Calls of a resnet inside a reused block (down_blocks[1]): counts the deep work really done."""
    calls = []
    handle = pipe.unet.down_blocks[1].resnets[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def test_interval_one_is_identical_to_stock(pipe):
    stock = generate(pipe)
    apply_deep_cache(pipe, interval=1)
    np.testing.assert_array_equal(generate(pipe), stock)


def test_cached_calls_skip_the_deep_blocks_on_schedule(pipe):
    cache = apply_deep_cache(pipe, interval=3, start=0.3)
    calls, handle = deep_work(pipe)
    stock_like = generate(pipe, steps=8)
    handle.remove()
    n = len(cache.schedule)  # UNet calls of the generation (PNDM makes 9 of 8 steps)
    start = int(np.ceil(0.3 * n))  # calls before it are full; then one full call, two cached, repeating
    assert cache.schedule == [c >= start and (c - start) % 3 != 2 for c in range(n)]
    assert len(calls) == n - cache.schedule.count(True)
    assert np.isfinite(stock_like).all()


def test_a_cached_call_equals_the_unet_with_the_deep_feature_of_the_last_full_call(pipe):
    """Reference built independently: a plain forward hook replaces up_blocks[0]'s output."""
    unet = pipe.unet
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    kept = {}
    grab = unet.up_blocks[0].register_forward_hook(lambda m, a, out: kept.setdefault("deep", out))
    with torch.no_grad():
        unet(x0, 900, text)
    grab.remove()
    inject = unet.up_blocks[0].register_forward_hook(lambda m, a, out: kept["deep"])
    with torch.no_grad():
        reference = unet(x1, 800, text).sample
    inject.remove()

    cache = apply_deep_cache(unet, interval=2, num_steps=2)
    with torch.no_grad():
        first = unet(x0, 900, text).sample
        second = unet(x1, 800, text).sample
        stock_first = None
    remove_deep_cache(unet)
    with torch.no_grad():
        stock_first = unet(x0, 900, text).sample
    assert cache.schedule == [False, True]
    torch.testing.assert_close(first, stock_first, rtol=0, atol=0)
    torch.testing.assert_close(second, reference, rtol=0, atol=0)


def test_apply_twice_keeps_one_cache_and_remove_restores_the_forwards(pipe):
    unet = pipe.unet
    forwards = [m.forward for m in (unet, unet.down_blocks[1], unet.mid_block, unet.up_blocks[0])]
    stock = generate(pipe)
    apply_deep_cache(pipe, interval=2)
    second = apply_deep_cache(pipe, interval=4)
    assert get_deep_cache(pipe) is second and get_deep_cache(unet) is second
    assert len(unet._diffusers_hook.hooks) == 1 and len(unet.mid_block._diffusers_hook.hooks) == 1
    calls, handle = deep_work(pipe)
    generate(pipe, steps=8)
    handle.remove()
    n = len(second.schedule)
    assert second.schedule == [c % 4 != 0 for c in range(n)] and len(calls) == len(range(0, n, 4))
    remove_deep_cache(pipe)
    remove_deep_cache(pipe)  # a no-op
    assert get_deep_cache(pipe) is None
    assert [m.forward for m in (unet, unet.down_blocks[1], unet.mid_block, unet.up_blocks[0])] == forwards
    np.testing.assert_array_equal(generate(pipe), stock)


def test_each_generation_starts_a_new_cache(pipe):
    cache = apply_deep_cache(pipe, interval=2)
    a = generate(pipe, seed=3)
    b = generate(pipe, seed=3)
    np.testing.assert_array_equal(a, b)
    assert cache.schedule == [c % 2 == 1 for c in range(len(cache.schedule))]


def test_composes_with_pruning_gating_and_guidance_collapse(pipe):
    """After the collapse the batch halves: that call is full, later ones are cached again, and the
    gated cross-attention layers that DeepCache skipped when the gate filled are kept later."""
    proc = apply_token_pruning(pipe, top_k=2, warmup=0.2, gate=0.5)
    cache = apply_deep_cache(pipe, interval=2)
    batches = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    out = generate(pipe, steps=10, callback_on_step_end=CollapseGuidance(proc, pipe))
    handle.remove()
    assert np.isfinite(out).all()
    n, gate = len(batches), proc.schedule.gate_start
    assert batches == [2] * gate + [1] * (n - gate)
    # full / cached alternating; the first collapsed call (batch halved) is full, then alternating again
    assert cache.schedule == [(c - (0 if c < gate else gate)) % 2 == 1 for c in range(n)]
    assert cache.schedule[gate - 1]  # the call that fills the gate skipped the deep layers ...
    assert [s.gated for s in proc.report.steps] == [c >= gate for c in range(n)]  # ... and gating still works


def test_hand_written_loop_needs_the_number_of_calls(pipe):
    unet = pipe.unet
    x, text = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32)
    cache = apply_deep_cache(unet, interval=2)
    with pytest.warns(UserWarning, match="cannot tell how many denoiser calls"), torch.no_grad():
        unet(x, 10, text)
        unet(x, 5, text)
    assert cache.schedule == [False, False]  # every call full
    cache.begin_generation(4)
    with torch.no_grad():
        for t in (40, 30, 20, 10):
            unet(x, t, text)
    assert cache.schedule == [False, True, False, True]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(interval=0), "interval must be a positive int, got 0"),
        (dict(interval=2.5), "interval must be a positive int, got 2.5"),
        (dict(start=1.5), r"start must be a number in \[0, 1\], got 1.5"),
        (dict(depth=2), "depth must be below the UNet's 2 levels"),
        (dict(num_steps=0), "num_steps must be a positive int, got 0"),
    ],
)
def test_bad_options_are_refused_with_the_value(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_deep_cache(pipe, **kwargs)
    assert get_deep_cache(pipe) is None


def test_refuses_a_model_without_unet_blocks():
    with pytest.raises(TypeError, match="Linear"):
        apply_deep_cache(torch.nn.Linear(2, 2))


def test_sdxl_gate_filled_on_a_cached_call_keeps_the_deep_cross_attention_later():
    """Tiny SDXL has cross-attention only in its deep level, which cached calls skip: when the call
    that fills the gate is cached, each such layer is computed once more on the next full call and
    kept from there on."""
    from tokenprune_diffusers.models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    proc = apply_token_pruning(pipe, top_k=2, gate=0.5)
    cache = apply_deep_cache(pipe, interval=2)
    deep_attn2 = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    computed = []
    handle = deep_attn2.to_q.register_forward_pre_hook(lambda m, a: computed.append(proc.clock.now.call))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        image = pipe("a red circle", num_inference_steps=8, generator=g, height=32, width=32, output_type="np",
                     callback_on_step_end=CollapseGuidance(proc, pipe)).images
    handle.remove()
    gate = proc.schedule.gate_start
    assert gate == 4 and cache.schedule[gate - 1]  # the filling call was cached
    assert computed == [0, 2, 4]  # full calls before the gate, then once after it (kept), never again
    assert np.isfinite(image).all()


def test_a_processor_installed_by_hand_is_refused_with_the_way_out(pipe):
    from tokenprune_diffusers import TokenPruneProcessor

    pipe.unet.set_attn_processor(TokenPruneProcessor())
    with pytest.raises(ValueError, match="apply_token_pruning"):
        apply_deep_cache(pipe)
