"""The processor on a single diffusers ``Attention`` layer, driven by a hand-written loop."""

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from tokenprune_diffusers import TokenPruneProcessor  # noqa: E402

PROMPTS = ["a cat wearing a red hat, highly detailed, studio lighting", "a dog"]


def _layer(dtype=torch.float32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    return attn.eval().to(dtype)


def _inputs(tokenizer, dtype=torch.float32, n=16):
    g = torch.Generator().manual_seed(1)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = torch.randn(2, n, 32, generator=g).to(dtype)  # (B, N, C)
    text = torch.randn(2, 77, 24, generator=g).to(dtype)  # (B, L, D)
    return ids, hidden, text


def _pruned_and_reference(tokenizer, proc, user_mask=None, dtype=torch.float32):
    """Call 0 scores, call 1 prunes; reference: stock processor with the pruned tokens masked out."""
    attn = _layer(dtype)
    ids, hidden, text = _inputs(tokenizer, dtype)
    proc.tokenizer = tokenizer
    proc.begin_generation(num_steps=2, token_ids=ids)
    attn.set_processor(proc)
    with torch.no_grad():
        attn(hidden, encoder_hidden_states=text, attention_mask=user_mask)  # call 0: scored
        pruned = attn(hidden, encoder_hidden_states=text, attention_mask=user_mask)  # call 1: pruned
        keep = proc.report.keep  # (B, L)
        bias = torch.zeros(2, 1, 77, dtype=dtype).masked_fill(~keep[:, None, :], -math.inf)
        if user_mask is not None:
            bias = bias + user_mask
        attn.set_processor(AttnProcessor2_0())
        reference = attn(hidden, encoder_hidden_states=text, attention_mask=bias)
    return pruned, reference, proc


def test_pruned_attention_equals_full_attention_with_pruned_tokens_masked_mixed_counts(clip_tokenizer):
    proc = TokenPruneProcessor(top_k=3, warmup=0.0, padding="drop")
    pruned, reference, proc = _pruned_and_reference(clip_tokenizer, proc)
    assert proc.report.steps[1].kept_counts == [5, 4]  # start + end + 3 words; start + end + "a dog"
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)


def test_pruned_attention_equals_masked_attention_equal_counts_no_mask(clip_tokenizer):
    proc = TokenPruneProcessor(top_k=1, warmup=0.0, padding="drop")
    pruned, reference, proc = _pruned_and_reference(clip_tokenizer, proc)
    assert proc.report.steps[1].kept_counts == [3, 3]
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)


def test_user_encoder_mask_is_gathered_with_the_same_indices(clip_tokenizer):
    user = torch.zeros(2, 1, 77)
    user[0, 0, 2] = -1e4  # mask "cat" in row 0
    user[1, 0, 1] = -2.0  # soften "a" in row 1
    proc = TokenPruneProcessor(keep_ratio=0.5, warmup=0.5, padding="score")
    pruned, reference, _ = _pruned_and_reference(clip_tokenizer, proc, user_mask=user)
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_prunes_and_stays_close_to_fp32(clip_tokenizer, dtype):
    low, _, proc = _pruned_and_reference(clip_tokenizer, TokenPruneProcessor(top_k=2, warmup=0.0), dtype=dtype)
    full, _, _ = _pruned_and_reference(clip_tokenizer, TokenPruneProcessor(top_k=2, warmup=0.0))
    assert low.dtype == dtype and proc.report.steps[1].pruned
    torch.testing.assert_close(low.float(), full, atol=3e-2, rtol=3e-2)


class _Recorder:
    """A custom (non-stock) processor: records what it receives, then computes stock attention."""

    def __init__(self):
        self.lengths, self.extras = [], []
        self.stock = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if isinstance(encoder_hidden_states, tuple):
            self.extras.append(encoder_hidden_states[1])
            encoder_hidden_states = encoder_hidden_states[0]
        self.lengths.append(None if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_custom_processor_is_wrapped_and_given_pruned_tokens_and_untouched_extras(clip_tokenizer):
    attn = _layer()
    ids, hidden, text = _inputs(clip_tokenizer)
    rec = _Recorder()
    proc = TokenPruneProcessor(top_k=1, warmup=0.0, padding="drop")
    proc.tokenizer = clip_tokenizer
    proc.wrap({"layer.processor": rec}, {"layer.processor": attn})
    attn.set_processor(proc)
    image_tokens = torch.randn(2, 4, 24)
    proc.begin_generation(num_steps=2, token_ids=ids)
    with torch.no_grad():
        attn(hidden, encoder_hidden_states=(text, image_tokens))
        out = attn(hidden, encoder_hidden_states=(text, image_tokens))
    assert rec.lengths == [77, 3]
    assert all(e is image_tokens for e in rec.extras)
    # same result as the stock skeleton would give
    proc2 = TokenPruneProcessor(top_k=1, warmup=0.0, padding="drop")
    proc2.tokenizer = clip_tokenizer
    attn.set_processor(proc2)
    proc2.begin_generation(num_steps=2, token_ids=ids)
    with torch.no_grad():
        attn(hidden, encoder_hidden_states=text)
        ref = attn(hidden, encoder_hidden_states=text)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_hand_written_loop_without_step_count_warns_once_and_prunes_nothing():
    attn = _layer()
    proc = TokenPruneProcessor(threshold=0.9, warmup=0.0)
    attn.set_processor(proc)
    hidden, text = torch.randn(1, 16, 32), torch.randn(1, 77, 24)
    with pytest.warns(UserWarning, match="cannot tell how many denoiser calls") as record:
        for _ in range(3):
            attn(hidden, encoder_hidden_states=text)
    assert len([w for w in record if "denoiser calls" in str(w.message)]) == 1
    assert not any(s.pruned or s.scored for s in proc.report.steps)
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, hidden, text)
        torch.testing.assert_close(attn(hidden, encoder_hidden_states=text), ref, atol=0, rtol=0)


def test_num_steps_restarts_a_generation_every_n_calls():
    attn = _layer()
    proc = TokenPruneProcessor(top_k=2, warmup=0.5, num_steps=4, padding="drop")
    attn.set_processor(proc)
    hidden, text = torch.randn(1, 16, 32), torch.randn(1, 77, 24)
    with pytest.warns(UserWarning, match="token ids"):
        for _ in range(6):
            attn(hidden, encoder_hidden_states=text)
    assert [s.call for s in proc.report.steps] == [0, 1]  # second generation, two calls in
    assert [s.scored for s in proc.report.steps] == [True, True]


def test_self_attention_is_exactly_stock():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        attn = Attention(query_dim=32, heads=4, dim_head=8).eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, x)
        attn.set_processor(TokenPruneProcessor(threshold=0.5, warmup=0.0, num_steps=2))
        out = attn(x)
    assert torch.equal(out, ref)
