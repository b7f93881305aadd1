"""Speed beyond pruning: exact K/V reuse, gating (T-GATE style) and guidance collapse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tokenprune_diffusers import CollapseGuidance, TokenPruneProcessor, apply_token_pruning  # noqa: E402

PROMPT = "a cat wearing a red hat, highly detailed, studio lighting"


@pytest.fixture
def pipe(tiny_pipe):
    processors = tiny_pipe.unet.attn_processors
    yield tiny_pipe
    tiny_pipe.unet.set_attn_processor(processors)


def generate(pipe, steps=6, **kw):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=steps, generator=g, height=32, width=32, output_type="np", **kw).images


def hook_count(module):
    calls = []
    return calls, module.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))


def first_attn2(pipe):
    return next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))


def test_kv_reuse_is_exact_and_projects_the_prompt_once_per_kept_set(pipe):
    outs, kcalls = {}, {}
    for reuse in (False, True):
        apply_token_pruning(pipe, top_k=2, warmup=0.3, reuse_kv=reuse)
        calls, h = hook_count(first_attn2(pipe).to_k)
        outs[reuse] = generate(pipe)
        h.remove()
        kcalls[reuse] = [shape[1] for shape in calls]
    np.testing.assert_array_equal(outs[True], outs[False])
    n = len(kcalls[False])
    assert kcalls[False] == [77] * 3 + [4] * (n - 3)
    assert kcalls[True] == [77, 4]  # once with all tokens, once with the kept ones


def test_gate_one_never_gates_and_matches_stock(pipe):
    stock = generate(pipe)
    apply_token_pruning(pipe, threshold=0.0, gate=1.0)
    np.testing.assert_array_equal(generate(pipe), stock)


def test_gating_skips_cross_attention_from_the_gate_on(pipe):
    proc = apply_token_pruning(pipe, top_k=2, warmup=0.2, gate=0.5)
    calls, h = hook_count(first_attn2(pipe).to_q)
    image = generate(pipe)
    h.remove()
    rep = proc.report
    n, gate = rep.num_calls, proc.schedule.gate_start
    assert gate == int(np.ceil(0.5 * n)) and len(calls) == gate
    assert [s.gated for s in rep.steps] == [c >= gate for c in range(n)]
    assert all(s.flops_done == 0 and s.flops_stock > 0 for s in rep.steps if s.gated)
    assert np.isfinite(image).all() and rep.flops_saved > 0.5
    assert "gated" in rep.summary()


def test_guidance_collapse_runs_one_batch_after_the_gate(pipe):
    proc = apply_token_pruning(pipe, top_k=2, warmup=0.2, gate=0.5)
    batches, h = hook_count(pipe.unet)
    image = generate(pipe, callback_on_step_end=CollapseGuidance(proc, pipe))
    h.remove()
    gate = proc.schedule.gate_start
    assert [b[0] for b in batches] == [2] * gate + [1] * (len(batches) - gate)
    assert np.isfinite(image).all()
    assert pipe.guidance_scale == 0.0  # diffusers' own way of switching guidance off mid-run


def test_guidance_collapse_on_sdxl_chunks_the_added_conditions():
    from tokenprune_diffusers.models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    proc = apply_token_pruning(pipe, top_k=2, gate=0.5)
    batches, h = hook_count(pipe.unet)
    cb = CollapseGuidance(proc, pipe)
    assert cb.tensor_inputs == ["prompt_embeds", "add_text_embeds", "add_time_ids"]
    image = generate(pipe, steps=4, callback_on_step_end=cb)
    h.remove()
    assert [b[0] for b in batches] == [2, 2, 1, 1] and np.isfinite(image).all()


def test_collapse_needs_a_gate_and_a_processor(tiny_pipe):
    with pytest.raises(ValueError, match="gate=None"):
        CollapseGuidance(TokenPruneProcessor(), tiny_pipe)
    with pytest.raises(TypeError, match="TokenPruneProcessor"):
        CollapseGuidance(object(), tiny_pipe)
    with pytest.raises(ValueError, match="gate must be a number in"):
        TokenPruneProcessor(gate=2)


def test_kv_reuse_under_inference_mode(pipe):
    apply_token_pruning(pipe, top_k=2, warmup=0.3)
    with torch.inference_mode():
        a = pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0), height=32, width=32, output_type="np").images
    b = generate(pipe, steps=4)
    np.testing.assert_array_equal(a, b)
