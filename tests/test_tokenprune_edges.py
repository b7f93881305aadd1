"""Edge cases found in review: inputs users really pass, and state that must not go stale."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.callbacks import SDCFGCutoffCallback  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from tokenprune_diffusers import TokenPruneProcessor, apply_token_pruning, remove_token_pruning  # noqa: E402


@pytest.fixture
def pipe(tiny_pipe):
    processors = tiny_pipe.unet.attn_processors
    yield tiny_pipe
    tiny_pipe.unet.set_attn_processor(processors)


def generate(pipe, prompt="a cat wearing a red hat", steps=4, **kw):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, generator=g, height=32, width=32, output_type="np", **kw).images


def _layer():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).eval()


def test_rows_are_the_unets_rows_distinct_negatives_and_several_images(pipe):
    """The token ids the processor assigns to each row are those of the text the UNet really gets."""
    prompts, negatives = ["a red hat", "a blue car on a road"], ["blurry", "low quality, cropped"]
    proc = apply_token_pruning(pipe, top_k=2)
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a, k: seen.append(k["encoder_hidden_states"]), with_kwargs=True)
    generate(pipe, prompt=prompts, negative_prompt=negatives, num_images_per_prompt=2)
    h.remove()
    with torch.no_grad():
        expected = pipe.text_encoder(proc.report.token_ids)[0]
    torch.testing.assert_close(seen[0], expected)
    read = pipe.tokenizer.batch_decode(pipe.tokenizer(negatives + prompts).input_ids, skip_special_tokens=True)
    assert proc.report.prompts == [read[0]] * 2 + [read[1]] * 2 + [read[2]] * 2 + [read[3]] * 2


def test_a_batch_change_during_warmup_stops_pruning_with_a_warning(pipe):
    proc = apply_token_pruning(pipe, top_k=1, warmup=0.6)
    with pytest.warns(UserWarning, match="batch changed from 2 to 1"):
        image = generate(pipe, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0))
    assert np.isfinite(image).all() and not any(s.pruned for s in proc.report.steps)


def test_hand_installed_processor_is_not_restored_and_one_processor_one_unet(pipe):
    from tokenprune_diffusers.models import tiny_pipeline

    pipe.unet.set_attn_processor(TokenPruneProcessor())
    apply_token_pruning(pipe, top_k=1)
    remove_token_pruning(pipe)
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    proc = apply_token_pruning(pipe, top_k=1)
    other = tiny_pipeline(seed=1)
    with pytest.raises(ValueError, match="already wraps another UNet"):
        apply_token_pruning(other, proc)


def test_kv_reuse_notices_an_in_place_change_of_the_prompt_under_inference_mode(clip_tokenizer):
    ids = clip_tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    outs = {}
    for reuse in (True, False):
        attn = _layer()
        proc = TokenPruneProcessor(threshold=0.0, warmup=1.0, reuse_kv=reuse)
        proc.tokenizer = clip_tokenizer
        attn.set_processor(proc)
        proc.begin_generation(num_steps=3, token_ids=ids)
        with torch.inference_mode():
            g = torch.Generator().manual_seed(0)
            hidden, text = torch.randn(1, 16, 32, generator=g), torch.randn(1, 77, 24, generator=g)
            attn(hidden, encoder_hidden_states=text)
            text.mul_(2.0)  # e.g. prompt interpolation into a static buffer
            outs[reuse] = attn(hidden, encoder_hidden_states=text)
    torch.testing.assert_close(outs[True], outs[False], atol=0, rtol=0)


def test_guidance_collapse_keeps_the_positive_rows_of_a_batch_of_several_prompts(pipe):
    """Two prompts under CFG are rows (neg0, neg1, pos0, pos1): after the collapse the UNet gets
    (pos0, pos1), and each gated layer returns the kept output of those rows."""
    from tokenprune_diffusers import CollapseGuidance

    prompts = ["a red hat", "a blue car on a road"]
    proc = apply_token_pruning(pipe, top_k=2, warmup=0.2, gate=0.5)
    texts, outs = [], []
    attn2 = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    h1 = pipe.unet.register_forward_pre_hook(lambda m, a, k: texts.append(k["encoder_hidden_states"]), with_kwargs=True)
    h2 = attn2.register_forward_hook(lambda m, a, out: outs.append(out))
    generate(pipe, prompt=prompts, steps=6, callback_on_step_end=CollapseGuidance(proc, pipe))
    h1.remove()
    h2.remove()
    gate, n = proc.schedule.gate_start, proc.report.num_calls
    assert n == len(texts) and [t.shape[0] for t in texts] == [4] * gate + [2] * (n - gate)
    with torch.no_grad():
        positive = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    torch.testing.assert_close(texts[gate], positive, rtol=0, atol=0)
    assert [s.collapsed for s in proc.report.steps] == [c >= gate for c in range(n)]
    torch.testing.assert_close(outs[gate], outs[gate - 1][2:], rtol=0, atol=0)  # the positive rows' kept output
    assert all(torch.equal(o, outs[gate]) for o in outs[gate:])


def test_ip_adapter_masks_reach_the_wrapped_processor():
    received = {}

    class Masked:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, ip_adapter_masks=None):
            received["masks"] = ip_adapter_masks
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    attn = _layer()
    proc = TokenPruneProcessor(num_steps=2)
    proc.wrap({"l.processor": Masked()}, {"l.processor": attn})
    attn.set_processor(proc)
    masks = torch.ones(1, 1, 4, 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attn(torch.randn(1, 16, 32), encoder_hidden_states=torch.randn(1, 77, 24), ip_adapter_masks=masks)
    assert received["masks"] is masks


def test_boolean_masks_are_honoured_when_pruning(clip_tokenizer):
    ids = clip_tokenizer(["a cat wearing a red hat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(1, 16, 32, generator=g), torch.randn(1, 77, 24, generator=g)
    allow = torch.ones(1, 1, 77, dtype=torch.bool)
    allow[0, 0, 2] = False  # "cat" may not be attended
    outs = []
    for mask in (allow, torch.zeros(1, 1, 77).masked_fill(~allow, float("-inf"))):
        attn = _layer()
        proc = TokenPruneProcessor(top_k=3, warmup=0.0, padding="drop")
        proc.tokenizer = clip_tokenizer
        attn.set_processor(proc)
        proc.begin_generation(num_steps=2, token_ids=ids)
        with torch.no_grad():
            attn(hidden, encoder_hidden_states=text, attention_mask=mask)
            outs.append(attn(hidden, encoder_hidden_states=text, attention_mask=mask))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)


def test_sd2_style_tokenizer_padding_with_exclamation_marks(pipe):
    """SD-2.x pads with '!' (id 0) after end-of-text: roles must still find the end-of-text token."""
    from tokenprune_diffusers.scoring import PADDING, SPECIAL
    from tokenprune_diffusers.tokenizer import load_clip_tokenizer

    original = pipe.tokenizer
    pipe.tokenizer = load_clip_tokenizer(pad_token="!")
    try:
        proc = apply_token_pruning(pipe, top_k=1, padding="drop")
        generate(pipe, prompt="a red hat")
    finally:
        pipe.tokenizer = original
    rep = proc.report
    assert rep.token_ids[1, 4] == 49407 and rep.token_ids[1, 5:].eq(0).all()  # "!" padding
    assert rep.roles[1, :5].tolist() == [SPECIAL, 1, 1, 1, SPECIAL] and (rep.roles[1, 5:] == PADDING).all()
    assert rep.steps[-1].kept_counts == [2, 3]
