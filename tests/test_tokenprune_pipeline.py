"""The processor inside real diffusers pipelines (tiny configs, as diffusers' own tests do)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from tokenprune_diffusers import (  # noqa: E402
    TokenPruneProcessor,
    apply_token_pruning,
    get_token_pruning,
    remove_token_pruning,
)
from tokenprune_diffusers.schedule import plan_generation  # noqa: E402
from tokenprune_diffusers.scoring import PADDING, SPECIAL  # noqa: E402

PROMPT = "a cat wearing a red hat, highly detailed, studio lighting"


@pytest.fixture
def pipe(tiny_pipe):
    """The session's tiny pipeline, with its original processors and scheduler put back after the test."""
    processors, scheduler = tiny_pipe.unet.attn_processors, tiny_pipe.scheduler
    yield tiny_pipe
    remove_token_pruning(tiny_pipe)  # also its UNet hook
    tiny_pipe.unet.set_attn_processor(processors)
    tiny_pipe.scheduler = scheduler


def generate(pipe, prompt=PROMPT, steps=5, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, generator=g, height=32, width=32, output_type="np", **kw).images


def as_read(pipe, texts):
    """The prompts as the report gives them: what the tokenizer reads."""
    return pipe.tokenizer.batch_decode(pipe.tokenizer(texts).input_ids, skip_special_tokens=True)


def count_unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def kv_lengths(pipe):
    """Token lengths seen by the first cross-attention K projection, one entry per UNet call."""
    attn2 = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    lengths = []
    handle = attn2.to_k.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    return lengths, handle


@pytest.mark.parametrize("options", [dict(threshold=0.0), dict(threshold=0.9, warmup=1.0)], ids=["threshold0", "warmup1"])
def test_no_pruning_settings_give_exactly_the_stock_pipeline_output(pipe, options):
    stock = generate(pipe)
    pipe.unet.set_attn_processor(TokenPruneProcessor(**options))
    out = generate(pipe)
    np.testing.assert_array_equal(out, stock)


def test_one_liner_prunes_after_warmup_and_kv_get_shorter(pipe):
    proc = TokenPruneProcessor(top_k=2, warmup=0.2, padding="drop", reuse_kv=False)  # project K/V at every call
    pipe.unet.set_attn_processor(proc)
    lengths, h = kv_lengths(pipe)
    generate(pipe, steps=10)
    h.remove()
    rep = proc.report
    n = rep.num_calls
    assert n == len(lengths) and rep.prune_start == math.ceil(0.2 * n)
    assert lengths[: rep.prune_start] == [77] * rep.prune_start
    assert set(lengths[rep.prune_start :]) == {4}  # start + end + 2 words (the empty negative prompt keeps 2, padded)
    assert [s.scored for s in rep.steps] == [c < rep.prune_start for c in range(n)]
    assert [s.pruned for s in rep.steps] == [c >= rep.prune_start for c in range(n)]
    assert rep.steps[-1].kept_counts == [2, 4]
    assert all(s.flops_done > s.flops_stock for s in rep.steps if s.scored)  # scoring costs extra
    assert all(s.flops_done < 0.6 * s.flops_stock for s in rep.steps if s.pruned)  # q/out projections stay
    assert 0.2 < rep.flops_saved < 0.6


@pytest.mark.parametrize(
    "scheduler, calls, start",
    [(EulerDiscreteScheduler, 4, 2), (HeunDiscreteScheduler, 7, 4), (DPMSolverMultistepScheduler, 4, 2), (DDIMScheduler, 4, 2)],
)
def test_schedule_follows_the_unet_calls_and_steps_of_any_scheduler(pipe, scheduler, calls, start):
    """4 steps, warm-up 0.3: pruning from step ceil(1.2) = 2, i.e. call 2 (Heun: 2 calls a step, 7 in all)."""
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    proc = apply_token_pruning(pipe, top_k=1, warmup=0.3)
    seen, h = count_unet_calls(pipe)
    generate(pipe, steps=4)
    h.remove()
    rep = proc.report
    assert rep.num_calls == len(seen) == len(rep.steps) == calls
    assert rep.schedule == plan_generation(calls, warmup=0.3, calls_per_step=pipe.scheduler.order)
    assert rep.prune_start == start
    assert [s.scored for s in rep.steps] == [c < start for c in range(calls)]
    assert [s.pruned for s in rep.steps] == [c >= start for c in range(calls)]


def test_hand_written_loop_follows_num_steps(tiny_pipe, clip_tokenizer):
    unet = tiny_pipe.unet
    before = unet.attn_processors
    ids = clip_tokenizer(["a red hat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, text = torch.zeros(1, 4, 8, 8), torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    proc = apply_token_pruning(unet, top_k=1, warmup=0.4, gate=0.8, padding="drop")
    proc.tokenizer = clip_tokenizer  # a UNet alone brings no tokenizer
    proc.begin_generation(5, token_ids=ids)
    with torch.no_grad():
        for t in (900, 700, 500, 300, 100):
            unet(x, t, text)
    remove_token_pruning(unet)
    unet.set_attn_processor(before)
    rep = proc.report
    assert rep.schedule.table().splitlines()[1:] == [
        "   0     0    yes      -      -          -",
        "   1     1    yes      -      -          -",
        "   2     2      -    yes      -          -",
        "   3     3      -    yes      -          -",
        "   4     4      -      -    yes          -",
    ]
    assert [s.scored for s in rep.steps] == [True, True, False, False, False]
    assert [(s.pruned, s.gated) for s in rep.steps] == [(False, False)] * 2 + [(True, False)] * 2 + [(False, True)]
    assert rep.steps[2].kept_counts == [3]


def test_a_hand_written_loop_after_a_pipeline_generation_follows_its_own_count(pipe, clip_tokenizer):
    """The helper attached the pipeline; its state from the last generation must not take over the loop."""
    proc = apply_token_pruning(pipe, top_k=1, warmup=0.4, padding="drop")
    generate(pipe, steps=3)
    ids = clip_tokenizer(["a red hat"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, text = torch.zeros(2, 4, 8, 8), torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0))
    proc.begin_generation(5, token_ids=ids)
    with torch.no_grad():
        for t in (900, 700, 500, 300, 100):
            pipe.unet(x, t, text)
    assert proc.report.num_calls == 5 and [s.call for s in proc.report.steps] == [0, 1, 2, 3, 4]
    assert [s.pruned for s in proc.report.steps] == [False, False, True, True, True]
    generate(pipe, steps=3)  # and the next pipeline generation is followed again
    assert proc.report.num_calls == len(proc.report.steps) == pipe._num_timesteps


def test_each_row_is_scored_and_pruned_on_its_own(pipe):
    prompts = ["a red hat", "a blue car parked on a wet road at night"]
    proc = apply_token_pruning(pipe, top_k=2, padding="drop", warmup=0.2)
    generate(pipe, prompt=prompts, negative_prompt=["blurry", "blurry"], num_images_per_prompt=2)
    rep = proc.report
    assert rep.prompts == ["blurry"] * 4 + [prompts[0]] * 2 + [prompts[1]] * 2
    # end-of-text sits right after each row's words, and is kept
    for row, text in enumerate(rep.prompts):
        n_words = len(pipe.tokenizer(text).input_ids) - 2
        eos = n_words + 1
        assert int(rep.roles[row, eos]) == SPECIAL and bool(rep.keep[row, eos])
        assert (rep.roles[row, eos + 1 :] == PADDING).all()
    assert rep.steps[-1].kept_counts == [3] * 4 + [4] * 4
    assert set(rep.kept_words(4)) <= {"<|startoftext|>", "a", "red", "hat", "<|endoftext|>"}
    assert len(rep.pruned_words(6)) == 10 - 2  # 10 words, 2 kept


def test_without_guidance_only_the_prompt_rows_exist(pipe):
    proc = apply_token_pruning(pipe, top_k=1)
    generate(pipe, guidance_scale=1.0)
    assert proc.report.prompts == as_read(pipe, [PROMPT]) and proc.report.roles.shape == (1, 77)


def test_same_seed_same_image_and_a_second_prompt_never_uses_the_first_prompts_scores(pipe):
    proc = apply_token_pruning(pipe, top_k=2, warmup=0.4)
    first = generate(pipe, prompt="a red hat on a wooden table")
    again = generate(pipe, prompt="a red hat on a wooden table")
    np.testing.assert_array_equal(first, again)
    other = generate(pipe, prompt="a blue bird in the sky")
    assert proc.report.prompts[-1] == "a blue bird in the sky"  # what the tokenizer reads: the same words
    fresh = apply_token_pruning(pipe, top_k=2, warmup=0.4)  # a brand-new processor, no history
    np.testing.assert_array_equal(generate(pipe, prompt="a blue bird in the sky"), other)
    assert fresh is not proc


def test_apply_twice_is_safe_and_remove_restores_the_original_objects(pipe):
    remove_token_pruning(pipe)  # whatever an earlier test left
    before, forward = pipe.unet.attn_processors, pipe.unet.forward
    apply_token_pruning(pipe, top_k=1)
    second = apply_token_pruning(pipe, threshold=0.3)
    assert get_token_pruning(pipe) is second and second.originals == before
    assert all(p is second for p in pipe.unet.attn_processors.values())
    assert list(pipe.unet._diffusers_hook.hooks) == ["tokenprune_clock"]  # one clock hook, not two
    assert list(pipe.text_encoder._diffusers_hook.hooks) == ["tokenprune_clock_text"]
    remove_token_pruning(pipe)
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert pipe.unet.forward == forward and not pipe.unet._diffusers_hook.hooks
    assert not pipe.text_encoder._diffusers_hook.hooks
    remove_token_pruning(pipe)  # no-op
    # replaced by hand instead of removed: the processor's UNet hook stays idle
    third = apply_token_pruning(pipe, top_k=1)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    generate(pipe, steps=2)
    assert third.report is None
    remove_token_pruning(pipe)
    with pytest.raises(TypeError, match="not both"):
        apply_token_pruning(pipe, TokenPruneProcessor(), top_k=1)


def test_custom_processors_already_installed_are_wrapped_not_discarded(pipe):
    class Counting(AttnProcessor2_0):  # a subclass may change the maths: it must be called
        calls = 0

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            Counting.calls += 1
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    pipe.unet.set_attn_processor(Counting())
    stock = generate(pipe)
    n_stock = Counting.calls
    apply_token_pruning(pipe, threshold=0.0)
    out = generate(pipe)
    assert Counting.calls == 2 * n_stock
    np.testing.assert_array_equal(out, stock)


def test_report_is_readable_and_heat_maps_are_written(pipe, tmp_path):
    from PIL import Image

    from tokenprune_diffusers.heatmap import render_heatmaps

    proc = apply_token_pruning(pipe, top_k=3, padding="drop")
    image = generate(pipe)[0]
    text = proc.report.summary()
    assert "PRUNED" in text and "cross-attention FLOPs saved" in text and "studio" in text
    path = render_heatmaps(proc.report, tmp_path / "maps.png", image=image)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300
    maps = proc.report.token_maps(-1)
    assert maps.shape[0] == 77 and maps.shape[1:] == (16, 16)  # the tiny UNet's largest attention map


def test_unet_level_equivalence_pruned_equals_stock_with_encoder_mask(tiny_pipe, clip_tokenizer):
    """Pruning inside the UNet equals the stock UNet told (by encoder_attention_mask) to ignore the pruned tokens."""
    unet = tiny_pipe.unet
    before = unet.attn_processors
    ids = clip_tokenizer([PROMPT, "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(2, 77, 32, generator=g)
    proc = TokenPruneProcessor(top_k=3, warmup=0.0, padding="drop")
    proc.tokenizer = clip_tokenizer
    unet.set_attn_processor(proc)
    proc.begin_generation(num_steps=2, token_ids=ids)
    with torch.no_grad():
        unet(x, t, text)
        pruned = unet(x, t, text).sample
        unet.set_attn_processor(AttnProcessor2_0())
        reference = unet(x, t, text, encoder_attention_mask=proc.report.keep.float()).sample
    unet.set_attn_processor(before)
    assert proc.report.steps[1].kept_counts == [5, 4]
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=1e-5)


def test_bf16_pipeline_runs_and_prunes():
    from tokenprune_diffusers.models import tiny_pipeline

    pipe = tiny_pipeline(seed=0, dtype=torch.bfloat16)
    proc = apply_token_pruning(pipe, top_k=2)
    image = generate(pipe)
    assert np.isfinite(image).all() and proc.report.steps[-1].pruned


@pytest.mark.slow
def test_torch_compile_of_a_tiny_unet_does_not_break(tiny_pipe, clip_tokenizer):
    """Dynamo traces the UNet around the processor's eager cross-attention (aot_eager keeps this fast;
    the inductor backend was checked by hand too, see CHANGELOG)."""
    unet = tiny_pipe.unet
    before = unet.attn_processors
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8, generator=g), torch.tensor(10), torch.randn(2, 77, 32, generator=g)
    ids = clip_tokenizer(["a cat in a hat", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    outs = {}
    for mode in ("eager", "compiled"):
        proc = TokenPruneProcessor(top_k=2, warmup=0.0, padding="drop")
        proc.tokenizer = clip_tokenizer
        unet.set_attn_processor(proc)
        model = unet if mode == "eager" else torch.compile(unet, backend="aot_eager")
        proc.begin_generation(num_steps=3, token_ids=ids)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs[mode] = [model(x, t, text).sample for _ in range(3)]
        assert [s.pruned for s in proc.report.steps] == [False, True, True]
    torch._dynamo.reset()
    unet.set_attn_processor(before)
    for a, b in zip(outs["eager"], outs["compiled"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_sdxl_pipeline_with_added_conditions_prunes_and_matches_stock_when_told_to_keep_all():
    from tokenprune_diffusers.models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    stock = generate(pipe, steps=4)
    keep_all = apply_token_pruning(pipe, threshold=0.0)
    np.testing.assert_array_equal(generate(pipe, steps=4), stock)
    assert keep_all.report.steps[0].scored
    proc = apply_token_pruning(pipe, top_k=2, padding="drop", warmup=0.25, reuse_kv=False)
    lengths, h = kv_lengths(pipe)
    out = generate(pipe, steps=4)
    h.remove()
    assert lengths == [77, 4, 4, 4] and np.isfinite(out).all()
    assert proc.report.prompts == as_read(pipe, ["", PROMPT])
    # SDXL's negative prompt is all zeros: any subset of its tokens gives the same output, so it keeps
    # only its start / end tokens whatever the rule, and does not hold the batch at 77 tokens
    proc = apply_token_pruning(pipe, keep_ratio=0.5, padding="score")
    generate(pipe, steps=4)
    assert proc.report.steps[-1].kept_counts == [2, 2 + 38]
