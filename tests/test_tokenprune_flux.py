"""Token pruning on a tiny Flux-shaped pipeline (T5 text stream padded to 512): the text stream gets shorter."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from mmdit_helpers import PROMPT, assert_kernel_scores_equal_recomputed, generate, text_lengths  # noqa: E402

from tokenprune_diffusers import (  # noqa: E402
    TokenPruneProcessor,
    apply_token_pruning,
    get_token_pruning,
    remove_token_pruning,
)
from tokenprune_diffusers.scoring import PADDING, SPECIAL, gather_rows, kept_index  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    from tokenprune_diffusers.models import tiny_flux_pipeline

    return tiny_flux_pipeline(seed=0)


@pytest.fixture(autouse=True)
def clean(pipe):
    yield
    remove_token_pruning(pipe)


@pytest.mark.parametrize("options", [dict(threshold=0.0, merge_padding=None), dict(threshold=0.9, warmup=1.0)],
                         ids=["threshold0", "warmup1"])
def test_no_pruning_settings_give_exactly_the_stock_output(pipe, options):
    assert apply_token_pruning(pipe).config.merge_padding == 0.9  # Flux's default, which these options turn off
    remove_token_pruning(pipe)
    stock = generate(pipe)
    proc = apply_token_pruning(pipe, **options)
    np.testing.assert_array_equal(generate(pipe), stock)
    assert options.get("warmup") != 1.0 or not any(s.scored for s in proc.report.steps)


def test_the_text_stream_and_its_positions_are_shortened_from_the_first_pruned_call(pipe):
    proc = apply_token_pruning(pipe, top_k=2, padding="drop", warmup=0.2)
    lengths, h = text_lengths(pipe)
    seen = []
    h2 = pipe.transformer.pos_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0] - 64))  # txt + img ids
    generate(pipe)
    h.remove(), h2.remove()
    rep = proc.report
    assert rep.prune_start == 1 and lengths == [7] + [3] * 4 and seen == [7] + [3] * 4  # padding="drop": no padding from call 0
    # T5's layout: no start token, </s> after the words (kept), <pad> after it (padding)
    assert rep.tokens[0][:7] == ["a", "cat", "wearing", "a", "red", "hat", "</s>"]
    assert rep.roles[0, 6] == SPECIAL and (rep.roles[0, 7:] == PADDING).all() and (rep.roles[0, :6] != SPECIAL).all()
    assert rep.steps[-1].kept_counts == [3] and rep.prompts == [PROMPT] and len(rep.kept_words(0)) == 3


def test_a_pruned_call_equals_the_stock_transformer_on_each_rows_kept_tokens(pipe):
    """Two prompts keep 4 and 5 positions: the short row is padded and its padded slots masked as
    keys in the double- and single-stream blocks; each row equals the stock transformer run on
    that row's kept positions alone (and without the mask it would not)."""
    proc = apply_token_pruning(pipe, top_k=4, padding="drop", warmup=0.2)
    seen = []
    h = pipe.transformer.register_forward_hook(lambda m, a, k, out: seen.append((dict(k), out[0])), with_kwargs=True)
    generate(pipe, prompt=["a red hat", "a blue car on a wet road"], steps=3)
    h.remove()
    keep = proc.report.keep  # (2, 512)
    assert keep.sum(1).tolist() == [4, 5]
    kwargs, pruned = seen[-1]  # the pipeline's inputs (full text) and the pruned call's output
    remove_token_pruning(pipe)
    with torch.no_grad():
        for row in range(2):
            one = {k: (v[row : row + 1] if isinstance(v, torch.Tensor) and v.ndim > 0 and k not in ("txt_ids", "img_ids") else v)
                   for k, v in kwargs.items()}
            one["encoder_hidden_states"] = kwargs["encoder_hidden_states"][row : row + 1, keep[row]]
            one["txt_ids"] = kwargs["txt_ids"][keep[row]]
            reference = pipe.transformer(**{**one, "return_dict": False})[0]
            torch.testing.assert_close(pruned[row : row + 1], reference, atol=1e-5, rtol=1e-5)
        index, valid = kept_index(keep)
        assert valid[0].sum() == 4 and index.shape[1] == 5
        unmasked = {**kwargs, "encoder_hidden_states": gather_rows(kwargs["encoder_hidden_states"], index),
                    "txt_ids": kwargs["txt_ids"][:5], "return_dict": False}
        assert not torch.allclose(pipe.transformer(**unmasked)[0][:1], pruned[:1], atol=1e-4)  # the mask makes row 0 exact


def test_several_prompts_and_images_per_prompt(pipe):
    proc = apply_token_pruning(pipe, top_k=1, padding="drop")
    generate(pipe, prompt=["a red hat", "a blue car on a wet road"], num_images_per_prompt=2)
    assert proc.report.steps[-1].kept_counts == [2] * 4
    assert proc.report.prompts == ["a red hat"] * 2 + ["a blue car on a wet road"] * 2


def test_bf16_runs_and_prunes():
    from tokenprune_diffusers.models import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed=0, dtype=torch.bfloat16)
    proc = apply_token_pruning(pipe, top_k=2)
    image = generate(pipe)
    assert np.isfinite(image).all() and proc.report.steps[-1].pruned


def test_true_cfg_with_a_negative_prompt_is_computed_as_stock_with_a_warning(pipe):
    kw = dict(negative_prompt="blurry", true_cfg_scale=2.0, steps=4)
    stock = generate(pipe, **kw)
    proc = apply_token_pruning(pipe, top_k=1, warmup=0.25, merge_padding=None)  # a merge would run from the first call
    with pytest.warns(UserWarning, match="another prompt tensor in the middle of a generation"):
        out = generate(pipe, **kw)
    np.testing.assert_array_equal(out, stock)
    assert not any(s.pruned for s in proc.report.steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(pipe, steps=4)  # a plain generation afterwards prunes, without a word
    assert proc.report.steps[-1].pruned


def test_apply_twice_is_safe_and_remove_restores_the_original_objects(pipe):
    before = pipe.transformer.attn_processors
    apply_token_pruning(pipe, top_k=1)
    second = apply_token_pruning(pipe, threshold=0.3)
    assert get_token_pruning(pipe) is second and list(pipe.transformer._diffusers_hook.hooks) == ["tokenprune_clock"]
    assert list(pipe.text_encoder_2._diffusers_hook.hooks) == ["tokenprune_clock_text"]  # T5: the text stream's ids
    generate(pipe, steps=2)
    remove_token_pruning(pipe)
    after = pipe.transformer.attn_processors
    assert all(after[k] is before[k] for k in before) and get_token_pruning(pipe) is None
    assert not pipe.transformer._diffusers_hook.hooks and not pipe.text_encoder_2._diffusers_hook.hooks


def test_the_unet_processor_by_hand_is_refused_with_a_pointer_to_the_helper(pipe):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    pipe.transformer.set_attn_processor(TokenPruneProcessor())
    try:
        with pytest.raises(TypeError, match="use apply_token_pruning"):
            generate(pipe, steps=1)
    finally:
        pipe.transformer.set_attn_processor(FluxAttnProcessor())


def test_report_and_heat_maps_work(pipe, tmp_path):
    from tokenprune_diffusers.heatmap import render_heatmaps

    proc = apply_token_pruning(pipe, top_k=2, padding="drop")
    image = generate(pipe)[0]
    assert "PRUNED" in proc.report.summary()
    assert proc.report.token_maps(-1).shape == (512, 8, 8)  # 32 px: 16 x 16 latents packed 2 x 2
    assert render_heatmaps(proc.report, tmp_path / "maps.png", image=image).is_file()


def test_composes_with_diffusers_first_block_cache(pipe):
    """FirstBlockCache holds residuals of the full-length text stream: they are reset when the text
    shortens, so pruning and the cache run together; with pruning at threshold 0 the output is the
    cache's own, exactly."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # caches every call it can
    try:
        cached = generate(pipe, steps=6)
        apply_token_pruning(pipe, threshold=0.0, merge_padding=None)
        np.testing.assert_array_equal(generate(pipe, steps=6), cached)
        proc = apply_token_pruning(pipe, top_k=2, warmup=0.34, merge_padding=None)  # padding scored: full-length warm-up calls
        lengths, h = text_lengths(pipe)
        image = generate(pipe, steps=6)
        h.remove()
        start = proc.report.prune_start
        assert np.isfinite(image).all() and start >= 2 and lengths == [512] * start + [3] * (6 - start)
    finally:
        pipe.transformer.disable_cache()


def test_padding_drop_leaves_the_padding_out_from_the_first_call(pipe):
    """With padding="drop" the decision always drops the padding, so the warm-up calls run without
    it too (a warm-up full-length call would cost the most on Flux, where T5 pads to 512)."""
    proc = apply_token_pruning(pipe, top_k=2, padding="drop", warmup=0.4)
    lengths, h = text_lengths(pipe)
    generate(pipe)
    h.remove()
    assert proc.report.prune_start == 2 and lengths == [7] * 2 + [3] * 3  # 6 words + </s>, then 2 words + </s>
    assert (proc.report.mass[0, 7:] == 0).all() and (proc.report.mass[0, :7] > 0).all()
    apply_token_pruning(pipe, top_k=2, padding="drop", warmup=1.0)  # never prunes: nothing is dropped either
    lengths, h = text_lengths(pipe)
    generate(pipe, steps=2)
    h.remove()
    assert lengths == [512] * 2


def test_scores_from_the_attention_kernels_log_sum_exp_equal_recomputed_scores(pipe):
    """On CPU the scored calls take each query's normaliser from the attention kernel; under the
    math backend scoring recomputes it: the same scores (up to the two kernels' rounding)."""
    assert_kernel_scores_equal_recomputed(pipe)
