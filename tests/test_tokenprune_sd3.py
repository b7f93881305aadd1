"""Token pruning on an MM-DiT (a tiny SD3-shaped pipeline, T5 slot empty): the text stream gets shorter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import JointAttnProcessor2_0  # noqa: E402
from mmdit_helpers import PROMPT, assert_kernel_scores_equal_recomputed, generate, text_lengths  # noqa: E402

from tokenprune_diffusers import (  # noqa: E402
    TokenPruneProcessor,
    apply_token_pruning,
    get_token_pruning,
    remove_token_pruning,
)
from tokenprune_diffusers.scoring import PADDING  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    from tokenprune_diffusers.models import tiny_sd3_pipeline

    return tiny_sd3_pipeline(seed=0)


@pytest.fixture(autouse=True)
def clean(pipe):
    yield
    remove_token_pruning(pipe)


@pytest.mark.parametrize("options", [dict(threshold=0.0, merge_padding=None), dict(threshold=0.9, warmup=1.0)],
                         ids=["threshold0", "warmup1"])
def test_no_pruning_settings_give_the_stock_output(pipe, options):
    """Bit-exact without the zero merge; with it (the default) equal up to float rounding."""
    stock = generate(pipe)
    proc = apply_token_pruning(pipe, merge_zeros=False, **options)
    np.testing.assert_array_equal(generate(pipe), stock)
    assert options.get("warmup") != 1.0 or not any(s.scored for s in proc.report.steps)
    apply_token_pruning(pipe, **options)
    np.testing.assert_allclose(generate(pipe), stock, atol=5e-6, rtol=0)


def test_the_zero_t5_positions_run_as_one_from_the_first_call_exactly(pipe):
    """Without T5 the pipeline adds 256 identical zero positions: they run as one key with log(256)
    added to its logit (77 + 1 text positions on every call, no warm-up needed), the output equal to
    stock; without the log(256) the output would differ."""
    stock = generate(pipe, steps=3)
    apply_token_pruning(pipe, warmup=1.0)
    lengths, h = text_lengths(pipe)
    seen = []
    h2 = pipe.transformer.register_forward_hook(lambda m, a, k, out: seen.append((dict(k), out[0])), with_kwargs=True)
    merged = generate(pipe, steps=3)
    h.remove(), h2.remove()
    assert lengths == [78] * 3
    np.testing.assert_allclose(merged, stock, atol=5e-6, rtol=0)
    kwargs, out = seen[-1]
    remove_token_pruning(pipe)
    with torch.no_grad():
        reference = pipe.transformer(**{**kwargs, "return_dict": False})[0]  # stock, 333 positions
        one = pipe.transformer(**{**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:, :78], "return_dict": False})[0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one, reference, atol=1e-3)  # one zero position without log(256): not the same


def test_the_sd3_default_keeps_every_token_and_merges_the_zeros_and_the_padding(pipe):
    """Without a rule SD3 keeps every token (threshold 0) and merges near-identical CLIP padding
    (merge_padding 0.8: what the trained toy measured best); the warm-up still scores (report, heat
    maps). With merge_padding=None every call runs 77 + 1 positions and the output is stock's; a
    rule or a merge given by name is taken as given."""
    stock = generate(pipe)
    proc = apply_token_pruning(pipe)
    assert (proc.config.threshold, proc.config.warmup, proc.config.merge_padding) == (0.0, 0.2, 0.8)
    lengths, h = text_lengths(pipe)
    image = generate(pipe)
    assert proc.report.steps[0].scored and proc.report.keep.all()
    apply_token_pruning(pipe, merge_padding=None)
    exact = generate(pipe)
    h.remove()
    assert lengths[:5] == lengths[:1] * 5 and lengths[0] < 78 and lengths[5:] == [78] * 5  # merged from the first call
    np.testing.assert_allclose(exact, stock, atol=5e-6, rtol=0)
    assert np.abs(image - stock).max() < 0.1  # the merge is approximate
    assert apply_token_pruning(pipe, warmup=0.4).config.threshold == 0.0
    assert apply_token_pruning(pipe, threshold=0.1).config.threshold == 0.1
    assert apply_token_pruning(pipe, top_k=2).config.threshold is None
    assert apply_token_pruning(pipe, merge_padding=0.5).config.merge_padding == 0.5


def test_scores_with_the_zero_merge_equal_the_scores_without_it(pipe):
    options = dict(top_k=2, warmup=0.4, merge_padding=None)
    plain = apply_token_pruning(pipe, merge_zeros=False, **options)
    generate(pipe)
    mass, keep = plain.report.mass.clone(), plain.report.keep.clone()
    merged = apply_token_pruning(pipe, **options)
    generate(pipe)
    torch.testing.assert_close(merged.report.mass, mass, atol=1e-7, rtol=1e-5)
    assert torch.equal(merged.report.keep, keep)


def test_heat_maps_are_summed_over_the_merged_stream_and_equal_the_unmerged_ones(pipe):
    """The maps of the scored calls are held in the text stream's 78 slots, not the 333 positions
    (the memory of a scored generation), and spread when read: the same maps as without the merge."""
    options = dict(top_k=2, warmup=0.4, merge_padding=None)
    plain = apply_token_pruning(pipe, merge_zeros=False, **options)
    generate(pipe)
    maps = [plain.report.token_maps(r) for r in range(2)]
    merged = apply_token_pruning(pipe, **options)
    generate(pipe)
    assert {acc.shape[1] for acc in merged.report.maps.values()} == {78}
    assert {acc.shape[1] for acc in plain.report.maps.values()} == {333}
    for r in range(2):
        torch.testing.assert_close(merged.report.token_maps(r), maps[r], atol=1e-7, rtol=1e-5)


def test_the_text_stream_is_shortened_from_the_first_pruned_call(pipe):
    proc = apply_token_pruning(pipe, top_k=2, padding="drop", warmup=0.2)
    lengths, h = text_lengths(pipe)
    generate(pipe)
    h.remove()
    rep = proc.report
    assert rep.prune_start == 1 and lengths == [8] + [4] * 4  # padding="drop": start, 6 words, end from call 0; then 4
    assert rep.steps[-1].kept_counts == [2, 4]  # the empty negative prompt: start + end; the prompt: + 2 words
    assert (rep.roles[:, 77:] == PADDING).all() and rep.tokens[1][77] == "<zero>"
    assert rep.prompts == ["", PROMPT] and len(rep.kept_words(1)) == 4


def test_a_pruned_call_equals_the_stock_transformer_on_each_rows_kept_tokens(pipe):
    """Rows keep 2 and 4 positions: the short row is padded and its padded slots masked as keys;
    each row equals the stock transformer run on that row's kept positions alone."""
    proc = apply_token_pruning(pipe, top_k=2, padding="drop", warmup=0.2)
    seen = []
    h = pipe.transformer.register_forward_hook(lambda m, a, k, out: seen.append((k, out[0])), with_kwargs=True)
    generate(pipe, steps=3)
    h.remove()
    keep = proc.report.keep  # (2, 333)
    remove_token_pruning(pipe)
    assert isinstance(next(iter(pipe.transformer.attn_processors.values())), JointAttnProcessor2_0)
    kwargs, pruned = seen[-1]
    with torch.no_grad():
        for row in range(2):
            one = {k: (v[row : row + 1] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in kwargs.items()}
            one["encoder_hidden_states"] = kwargs["encoder_hidden_states"][row : row + 1, keep[row]]
            reference = pipe.transformer(**{**one, "return_dict": False})[0]
            torch.testing.assert_close(pruned[row : row + 1], reference, atol=1e-5, rtol=1e-5)


def test_several_prompts_images_per_prompt_and_no_guidance(pipe):
    proc = apply_token_pruning(pipe, top_k=1, padding="drop")
    generate(pipe, prompt=["a red hat", "a blue car on a wet road"], num_images_per_prompt=2)
    assert proc.report.steps[-1].kept_counts == [2] * 4 + [3] * 4
    assert proc.report.prompts[4:] == ["a red hat"] * 2 + ["a blue car on a wet road"] * 2
    generate(pipe, guidance_scale=1.0)
    assert proc.report.steps[-1].kept_counts == [3]


def test_bf16_runs_and_prunes():
    from tokenprune_diffusers.models import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed=0, dtype=torch.bfloat16)
    proc = apply_token_pruning(pipe, top_k=2)
    image = generate(pipe)
    assert np.isfinite(image).all() and proc.report.steps[-1].pruned


def test_apply_twice_is_safe_and_remove_restores_the_original_objects(pipe):
    before = pipe.transformer.attn_processors
    apply_token_pruning(pipe, top_k=1)
    second = apply_token_pruning(pipe, threshold=0.3)
    assert get_token_pruning(pipe) is second and list(pipe.transformer._diffusers_hook.hooks) == ["tokenprune_clock"]
    generate(pipe, steps=2)
    remove_token_pruning(pipe)
    after = pipe.transformer.attn_processors
    assert all(after[k] is before[k] for k in before) and get_token_pruning(pipe) is None
    assert not pipe.transformer._diffusers_hook.hooks and not pipe.text_encoder._diffusers_hook.hooks


def test_what_is_not_supported_is_refused_with_the_reason(pipe):
    with pytest.raises(ValueError, match="gate is a UNet cross-attention option"):
        apply_token_pruning(pipe, gate=0.5)
    pipe.transformer.set_attn_processor(TokenPruneProcessor())
    try:
        with pytest.raises(TypeError, match="use apply_token_pruning"):
            generate(pipe, steps=1)
    finally:
        pipe.transformer.set_attn_processor(JointAttnProcessor2_0())

    class AuraFlowPipeline:  # a transformer pipeline this package does not prune yet
        unet = None
        transformer = pipe.transformer

    with pytest.raises(TypeError, match="does not support AuraFlowPipeline yet; it supports UNet pipelines"):
        apply_token_pruning(AuraFlowPipeline())
    pipe.text_encoder_3 = torch.nn.Linear(1, 1)
    try:
        with pytest.raises(TypeError, match="text_encoder_3=None"):
            apply_token_pruning(pipe)
    finally:
        pipe.text_encoder_3 = None


def test_report_and_heat_maps_work(pipe, tmp_path):
    from tokenprune_diffusers.heatmap import render_heatmaps

    proc = apply_token_pruning(pipe, top_k=2, padding="drop")
    image = generate(pipe)[0]
    assert "PRUNED" in proc.report.summary() and "transformer FLOPs saved against stock" in proc.report.summary()
    assert proc.report.token_maps(-1).shape == (333, 8, 8)  # 16 x 16 latents in 2 x 2 patches
    assert render_heatmaps(proc.report, tmp_path / "maps.png", image=image).is_file()


def test_deep_cache_is_refused_on_an_mmdit_and_removing_it_is_a_no_op(pipe):
    from tokenprune_diffusers import apply_deep_cache, get_deep_cache, remove_deep_cache

    with pytest.raises(TypeError, match="expected a UNet2DConditionModel"):
        apply_deep_cache(pipe)
    assert get_deep_cache(pipe) is None
    remove_deep_cache(pipe)  # nothing installed: nothing to do


def test_scores_from_the_attention_kernels_log_sum_exp_equal_recomputed_scores(pipe):
    """On CPU the scored calls take each query's normaliser from the attention kernel; under the
    math backend scoring recomputes it: the same scores (up to the two kernels' rounding)."""
    assert_kernel_scores_equal_recomputed(pipe)
