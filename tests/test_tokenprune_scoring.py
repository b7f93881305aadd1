"""The maths, on plain tensors."""

import math

import pytest
import torch

from tokenprune_diffusers.scoring import (
    PADDING,
    SPECIAL,
    WORD,
    attention_mass,
    attention_with_lse,
    gather_mask,
    gather_rows,
    kept_index,
    normalise_scores,
    select_tokens,
)


def _qk(B=2, H=3, N=20, L=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, d, generator=g), torch.randn(B, H, L, d, generator=g)


@pytest.mark.parametrize("chunk", [1, 50, 10**9])
def test_attention_mass_is_the_mean_softmax_probability_whatever_the_chunk(chunk):
    q, k = _qk()
    bias = torch.zeros(2, 1, 1, 7)
    bias[1, ..., 3] = -math.inf
    probs = ((q @ k.transpose(-1, -2)) / math.sqrt(8) + bias).softmax(-1)  # (B, H, N, L)
    mass, per_pos = attention_mass(q, k, bias, chunk_elems=chunk, with_positions=True)
    torch.testing.assert_close(mass, probs.mean(dim=(1, 2)))
    torch.testing.assert_close(per_pos, probs.sum(1))
    torch.testing.assert_close(mass.sum(1), torch.ones(2))
    assert mass[1, 3] == 0


@pytest.mark.parametrize("chunk", [1, 50, 10**9])
def test_joint_attention_mass_from_the_kernels_log_sum_exp_is_the_recomputed_one(chunk):
    """Joint attention (image then text keys), a bias with a masked slot and a merged position:
    the kernel's output is SDPA's, bit for bit, and the text keys' mass from its log-sum-exp
    equals the mass with the normaliser recomputed over every key."""
    g = torch.Generator().manual_seed(1)
    B, H, N, K, d = 2, 3, 20, 5, 8
    q, k, v = (torch.randn(B, H, N + K, d, generator=g) for _ in range(3))
    bias = torch.zeros(B, 1, 1, N + K)
    bias[0, ..., -1] = -math.inf  # row 0 keeps one text position fewer
    bias[1, ..., N] = math.log(4.0)  # a position standing for 4 identical ones
    out, lse = attention_with_lse(q, k, v, bias)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    assert lse is not None and lse.shape == (B, H, N + K)
    fast, fast_pos = attention_mass(q[:, :, :N], k, bias, chunk, with_positions=True, keys_from=N, lse=lse[:, :, :N])
    slow, slow_pos = attention_mass(q[:, :, :N], k, bias, chunk, with_positions=True, keys_from=N)
    torch.testing.assert_close(fast, slow, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(fast_pos, slow_pos, atol=1e-6, rtol=1e-5)
    assert fast[0, -1] == 0 and fast[1, 0] > fast[1, 1]


def test_attention_with_lse_follows_sdpa_kernel_choice():
    """Under ``sdpa_kernel`` without the flash backend (e.g. the math one, which FLOP counters
    see), SDPA chooses as ever and no log-sum-exp comes back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH):
        out, lse = attention_with_lse(q, q, q)
    assert lse is None
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))


def test_normalised_score_is_one_for_the_best_word_and_ignores_the_start_token():
    mass = torch.tensor([[0.9, 0.02, 0.05, 0.01, 0.02]])
    roles = torch.tensor([[SPECIAL, WORD, WORD, SPECIAL, PADDING]], dtype=torch.int8)
    s = normalise_scores(mass, roles)
    torch.testing.assert_close(s, torch.tensor([[18.0, 0.4, 1.0, 0.2, 0.4]]))


def _roles(*rows):
    return torch.tensor(rows, dtype=torch.int8)


S, W, P = SPECIAL, WORD, PADDING


def test_threshold_keeps_specials_and_words_at_or_above_it():
    scores = torch.tensor([[5.0, 1.0, 0.05, 0.5, 0.0, 0.02, 0.9]])
    roles = _roles([S, W, W, W, S, P, P])
    keep = select_tokens(scores, roles, rule="threshold", value=0.1, min_tokens=0, padding="score")
    assert keep.tolist() == [[True, True, False, True, True, False, True]]


def test_padding_policies():
    scores = torch.tensor([[5.0, 1.0, 0.5, 0.0, 0.9, 0.01]])
    roles = _roles([S, W, W, S, P, P])
    kw = dict(rule="threshold", value=0.1, min_tokens=0)
    assert select_tokens(scores, roles, padding="keep", **kw)[0, 4:].tolist() == [True, True]
    assert select_tokens(scores, roles, padding="drop", **kw)[0, 4:].tolist() == [False, False]
    assert select_tokens(scores, roles, padding="score", **kw)[0, 4:].tolist() == [True, False]


def test_min_tokens_floor_keeps_the_best_words_even_above_the_threshold():
    scores = torch.tensor([[5.0, 0.01, 0.03, 0.02, 0.0]])
    roles = _roles([S, W, W, W, S])
    keep = select_tokens(scores, roles, rule="threshold", value=0.9, min_tokens=2, padding="drop")
    assert keep.tolist() == [[True, False, True, True, True]]


def test_top_k_and_keep_ratio_rank_candidates_per_row():
    scores = torch.tensor([[1.0, 0.2, 0.9, 0.5, 1.0, 0.3], [1.0, 0.9, 0.1, 0.8, 0.7, 1.0]])
    roles = _roles([S, W, W, W, W, S], [S, W, W, W, W, S])
    top2 = select_tokens(scores, roles, rule="top_k", value=2, min_tokens=0, padding="score")
    assert top2.tolist() == [[True, False, True, False, True, True], [True, True, False, True, False, True]]
    half = select_tokens(scores, roles, rule="keep_ratio", value=0.5, min_tokens=0, padding="score")
    assert half.equal(top2)
    none = select_tokens(scores, roles, rule="keep_ratio", value=0.0, min_tokens=0, padding="score")
    assert none.tolist()[0] == [True, False, False, False, False, True]


def test_kept_index_preserves_order_and_pads_short_rows_with_a_mask():
    keep = torch.tensor([[True, False, True, True], [True, True, False, False]])
    index, valid = kept_index(keep)
    assert index.tolist() == [[0, 2, 3], [0, 1, 1]]
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    same, none = kept_index(torch.tensor([[True, False, True], [False, True, True]]))
    assert none is None and same.tolist() == [[0, 2], [1, 2]]


def test_gather_rows_and_masks():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    index = torch.tensor([[0, 2, 3], [0, 1, 1]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    torch.testing.assert_close(gather_rows(x, index)[1], x[1, [0, 1, 1]])
    m = gather_mask(None, index, valid, ndim=4)
    assert m.shape == (2, 1, 1, 3) and m[1, 0, 0, 2] == -math.inf and m[0].eq(0).all()
    user = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -5.0, -6.0, -7.0]]).view(2, 1, 1, 4).expand(2, 2, 1, 4)
    m = gather_mask(user, index, valid, ndim=4)
    assert m.shape == (2, 2, 1, 3)
    assert m[0, 1, 0].tolist() == [0.0, -2.0, -3.0] and m[1, 0, 0, :2].tolist() == [0.0, -5.0] and m[1, 0, 0, 2] == -math.inf
    assert gather_mask(None, index, None, ndim=4) is None


def test_text_stream_merges_identical_positions_exactly_and_spreads_their_mass_back():
    """m identical keys == one key with log(m) on its logit: attention outputs and per-position
    attention mass are recovered exactly; kept positions and padded slots are respected."""
    import torch.nn.functional as F

    from tokenprune_diffusers.merge import identical_groups, kept_groups, text_stream
    from tokenprune_diffusers.scoring import attention_mass

    g = torch.Generator().manual_seed(0)
    B, L, N, H, d = 2, 10, 5, 2, 4
    identical = torch.zeros(B, L, dtype=torch.bool)
    identical[:, 6:] = True  # a zero tail of 4 positions
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, 2] = keep[1, 7] = False
    ts = text_stream(kept_groups(identical_groups(identical), keep), keep)
    assert ts.index.tolist() == [[0, 1, 3, 4, 5, 6, 6], [0, 1, 2, 3, 4, 5, 6]]  # row 0 padded with its last
    assert ts.bias[0, 5] == pytest.approx(math.log(4)) and ts.bias[0, 6] == -math.inf and ts.bias[1, 6] == pytest.approx(math.log(3))
    k, v = torch.randn(B, H, L, d, generator=g), torch.randn(B, H, L, d, generator=g)
    k[:, :, 6:], v[:, :, 6:] = k[:, :, 6:7], v[:, :, 6:7]
    q = torch.randn(B, H, N, d, generator=g)
    full_bias = torch.zeros(B, 1, 1, L).masked_fill(~keep[:, None, None, :], -math.inf)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=full_bias)
    gather = ts.index[:, None, :, None].expand(B, H, -1, d)
    bias = ts.bias[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k.gather(2, gather), v.gather(2, gather), attn_mask=bias)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
    mass, per_pos = attention_mass(q, k, full_bias, with_positions=True)
    merged_mass, merged_pos = attention_mass(q, k.gather(2, gather), bias, with_positions=True)
    torch.testing.assert_close(ts.scatter(merged_mass), mass, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ts.scatter(merged_pos), per_pos, atol=1e-7, rtol=1e-6)
    alone = identical_groups(torch.zeros(B, L, dtype=torch.bool))
    assert text_stream(alone).bias is None and not text_stream(alone).merged  # nothing to merge or mask
