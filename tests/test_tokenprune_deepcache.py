"""Deep-feature reuse (DeepCache) as diffusers hooks, alone and with pruning, gating and collapse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tokenprune_diffusers import (  # noqa: E402
    CollapseGuidance,
    NonUniform,
    apply_deep_cache,
    apply_token_pruning,
    get_deep_cache,
    remove_deep_cache,
    remove_token_pruning,
)
from tokenprune_diffusers.schedule import deep_cache_plan  # noqa: E402

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


@pytest.mark.parametrize("options", [dict(), dict(depth=1), dict(branch=1)])
def test_a_cached_call_equals_the_unet_with_the_deep_feature_of_the_last_full_call(pipe, options):
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

    cache = apply_deep_cache(unet, interval=2, num_steps=2, **options)
    assert cache.branch == 1  # the tiny UNet's outer up block consumes branches 0 and 1
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


@pytest.mark.parametrize("branch", [None, 0])
def test_composes_with_pruning_gating_and_guidance_collapse(pipe, branch):
    """After the collapse the batch halves: that call is full, later ones are cached again, and the
    gated cross-attention layers that DeepCache skipped when the gate filled are kept later (at
    branch 0 the outer up block's first attention is skipped too)."""
    proc = apply_token_pruning(pipe, top_k=2, warmup=0.2, gate=0.5)
    cache = apply_deep_cache(pipe, interval=2, branch=branch)
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
        (dict(branch=4), r"branch must be below the UNet's 4 skip branches \(0..3\), got 4"),
        (dict(branch=-1), "branch must be a non-negative int, got -1"),
        (dict(branch=1.0), "branch must be a non-negative int, got 1.0"),
        (dict(branch=0, depth=1), "give depth or branch, not both"),
        (dict(schedule="non-uniform"), "schedule must be \"uniform\", \"nonuniform\" or a NonUniform, got 'non-uniform'"),
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


# ---------------------------------------------------------------------- skip branches and schedules
LAYER_TYPES = ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D")


def count_layers(unet):
    """Names of the resnets, attentions and samplers that compute, in call order: a plain torch hook
    on each one's first child (a layer returning a cached output is called, but its children are not)."""
    ran, handles = [], []
    for name, module in unet.named_modules():
        if type(module).__name__ in LAYER_TYPES:
            child = next(module.children())
            handles.append(child.register_forward_pre_hook(lambda m, a, name=name: ran.append(name)))
    return ran, handles


def unet_inputs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(n)]
    return xs, torch.randn(2, 77, 32, generator=g)


def test_a_shallower_branch_runs_fewer_layers_on_a_cached_call(pipe):
    """Tiny UNet: branch 0 = conv_in, 1 = down 0's resnet, 2 = its downsampler, 3 = down 1's resnet."""
    unet = pipe.unet
    (x0, x1), text = unet_inputs(2)
    ran, handles = count_layers(unet)
    with torch.no_grad():
        unet(x0, 900, text)
    stock = list(ran)
    computed = {}
    for branch in range(4):
        apply_deep_cache(unet, interval=2, num_steps=2, branch=branch)
        ran.clear()
        with torch.no_grad():
            unet(x0, 900, text)
            full = list(ran)
            ran.clear()
            unet(x1, 800, text)
        computed[branch] = list(ran)
        assert full == stock  # the full call runs every layer
    remove_deep_cache(unet)
    for h in handles:
        h.remove()
    assert computed[0] == ["up_blocks.1.resnets.1", "up_blocks.1.attentions.1"]
    assert computed[3] == [n for n in stock if not n.startswith("mid_block")]
    counts = [len(computed[b]) for b in range(4)]
    assert counts == sorted(counts) and len(set(counts)) == 4, counts


def test_branch_zero_equals_the_unet_with_every_deeper_output_of_the_last_full_call(pipe):
    """Reference independent of the wiring: plain forward hooks replace, on the second call, the
    outputs of a hand-written list of modules with their outputs of the first call."""
    unet = pipe.unet
    (x0, x1, x2), text = unet_inputs(3)
    names = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1.resnets.0", "up_blocks.1.attentions.0"]
    modules = dict(unet.named_modules())
    kept, mode = {}, {"inject": False}

    def hook(m, a, out, name):
        if mode["inject"]:
            return kept[name]
        kept[name] = out

    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: hook(m, a, out, n)) for n in names]
    with torch.no_grad():
        stock0 = unet(x0, 900, text).sample
        mode["inject"] = True
        reference = unet(x1, 800, text).sample
    for h in handles:
        h.remove()
    with torch.no_grad():
        stock2 = unet(x2, 700, text).sample
    cache = apply_deep_cache(unet, interval=2, num_steps=3, branch=0)
    with torch.no_grad():
        out = [unet(x, t, text).sample for x, t in ((x0, 900), (x1, 800), (x2, 700))]
    remove_deep_cache(unet)
    assert cache.schedule == [False, True, False]
    torch.testing.assert_close(out[0], stock0, rtol=0, atol=0)  # every full call equals stock
    torch.testing.assert_close(out[1], reference, rtol=0, atol=0)
    torch.testing.assert_close(out[2], stock2, rtol=0, atol=0)
    assert not torch.equal(out[1], stock0)


def test_apply_twice_with_branches_and_remove_leave_no_hook(pipe):
    unet = pipe.unet
    blocks = (*unet.down_blocks, unet.mid_block, *unet.up_blocks)
    layers = [m for m in unet.modules() if type(m).__name__ in LAYER_TYPES or any(m is b for b in blocks)]
    forwards = [m.forward for m in layers]
    stock = generate(pipe)
    apply_deep_cache(pipe, interval=2, branch=0)
    apply_deep_cache(pipe, interval=3, branch=2)
    hooked = {id(m) for m in layers if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks}
    # branch 2 only: the deep down block, the mid block, the up resnet consuming branch 3
    assert hooked == {id(unet.down_blocks[1]), id(unet.mid_block), id(unet.up_blocks[0].resnets[0])}
    remove_deep_cache(pipe)
    assert [m.forward for m in layers] == forwards
    assert not any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks for m in layers)
    np.testing.assert_array_equal(generate(pipe), stock)


def test_depth_one_and_its_branch_give_the_same_images(pipe):
    a = (apply_deep_cache(pipe, interval=3, depth=1), generate(pipe, steps=7))[1]
    b = (apply_deep_cache(pipe, interval=3, branch=1), generate(pipe, steps=7))[1]
    np.testing.assert_array_equal(a, b)
    c = (apply_deep_cache(pipe, interval=3, branch=0), generate(pipe, steps=7))[1]
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("schedule", ["nonuniform", NonUniform(center=0.6, power=2.0)])
def test_the_non_uniform_schedule_is_followed_in_a_pipeline(pipe, schedule):
    cache = apply_deep_cache(pipe, interval=3, schedule=schedule)
    calls, handle = deep_work(pipe)
    generate(pipe, steps=12)
    handle.remove()
    n = len(cache.schedule)
    spec = schedule if isinstance(schedule, NonUniform) else NonUniform()
    assert tuple(cache.schedule) == deep_cache_plan(n, 3, schedule=spec)
    assert tuple(cache.schedule) != deep_cache_plan(n, 3)
    assert len(calls) == cache.schedule.count(False)


@pytest.fixture(scope="module")
def sd_layout_pipe(tiny_pipe):
    """The tiny pipeline with a UNet of the Stable Diffusion layout (two resnets and a downsampler
    per block), on DDIM (the peer finds the step by its timestep: PNDM repeats one)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from tokenprune_diffusers.models import TINY_UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(TINY_UNET_CONFIG, layers_per_block=2)).eval()
    scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    return StableDiffusionPipeline(**{**tiny_pipe.components, "unet": unet, "scheduler": scheduler})


@pytest.mark.parametrize("interval, branch", [(3, 0), (2, 1), (3, 2), (4, 4), (3, 5)])
def test_branches_match_the_deepcache_package(sd_layout_pipe, interval, branch):
    """Optional peer check (skipped without the ``DeepCache`` package): our ``branch`` is its
    ``cache_branch_id`` on the SD layout, and the images agree."""
    peer = pytest.importorskip("DeepCache")
    pipe = sd_layout_pipe
    helper = peer.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        theirs = generate(pipe, steps=7)
    finally:
        helper.disable()
    cache = apply_deep_cache(pipe, interval=interval, branch=branch)
    try:
        ours = generate(pipe, steps=7)
    finally:
        remove_deep_cache(pipe)
    assert cache.schedule == [c % interval != 0 for c in range(7)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    if branch < 5:
        assert not np.allclose(ours, generate(pipe, steps=7), atol=1e-3)  # the comparison is not vacuous
