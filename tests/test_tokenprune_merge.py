"""The text-stream merge (tokenprune_diffusers.merge): grouping near-identical positions, merged inputs."""

from __future__ import annotations

import math

import pytest
import torch


def test_similar_groups_merge_near_parallel_candidates_only_and_gather_takes_their_mean():
    from tokenprune_diffusers.merge import similar_groups, text_stream

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    x = torch.stack([a, b, a * 2.0, b + 0.01, a, torch.zeros(8)])[None]  # (1, 6, 8)
    cand = torch.tensor([[False, True, True, True, True, True]])  # position 0 is not a candidate
    rep = similar_groups(x, cand, threshold=0.999)
    assert rep.tolist() == [[0, 1, 2, 1, 2, 5]]  # a*2 and a group; b and b+eps group; the zero stays alone
    ts = text_stream(rep)
    assert ts.index.tolist() == [[0, 1, 2, 5]] and ts.merged
    assert ts.bias[0].tolist() == pytest.approx([0.0, math.log(2), math.log(2), 0.0])
    out = ts.gather(x)  # (1, 4, 8)
    torch.testing.assert_close(out[0, 1], (x[0, 1] + x[0, 3]) / 2)
    torch.testing.assert_close(out[0, 2], (x[0, 2] + x[0, 4]) / 2)
    torch.testing.assert_close(out[0, 0], x[0, 0])
    assert similar_groups(x, cand, threshold=1.0)[0, 3] == 3  # b + eps is not parallel to b


def test_merge_padding_is_refused_outside_its_range():
    from tokenprune_diffusers import TokenPruneConfig

    for bad in (0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="merge_padding"):
            TokenPruneConfig(merge_padding=bad)


@pytest.fixture(scope="module")
def sd3():
    pytest.importorskip("diffusers")
    from tokenprune_diffusers.models import tiny_sd3_pipeline

    return tiny_sd3_pipeline(seed=0)


def test_merge_padding_equals_stock_on_the_text_with_each_group_replaced_by_its_mean(sd3):
    """merge_padding runs each group of near-identical CLIP padding positions as one slot from the
    first call (their mean, + log(m) on its logit): exactly the stock transformer on the text where
    every member of a group is replaced by the group's mean (identical positions stay identical
    through the blocks); the zero T5 positions merge as before; approximate against stock on the
    original text."""
    from mmdit_helpers import generate, text_lengths

    from tokenprune_diffusers import apply_token_pruning, remove_token_pruning
    from tokenprune_diffusers.merge import similar_groups
    from tokenprune_diffusers.scoring import PADDING

    proc = apply_token_pruning(sd3, threshold=0.0, merge_padding=0.5, warmup=0.2)
    lengths, h = text_lengths(sd3)
    seen = []
    h2 = sd3.transformer.register_forward_hook(lambda m, a, k, out: seen.append((dict(k), out[0])), with_kwargs=True)
    generate(sd3)
    h.remove(), h2.remove()
    roles = proc.report.roles  # (2, 333): the empty negative prompt, then the prompt
    remove_token_pruning(sd3)
    kwargs, merged_out = seen[-1]
    text = kwargs["encoder_hidden_states"]  # (2, 333, D) as the pipeline built it
    zeros = (text == 0).all(-1)
    rep = similar_groups(text, (roles == PADDING) & ~zeros, 0.5)  # (2, 333)
    groups = int((rep != torch.arange(333)).sum())
    assert groups > 0 and max(lengths) < 78  # from the first call: fewer than the zero merge alone
    mean = torch.zeros_like(text).index_put_((torch.arange(2)[:, None].expand_as(rep), rep), text, accumulate=True)
    size = torch.zeros(2, 333).index_put_((torch.arange(2)[:, None].expand_as(rep), rep), torch.ones(2, 333), accumulate=True)
    mean = (mean / size.clamp_min(1)[..., None]).gather(1, rep[..., None].expand_as(text))  # each position: its group's mean
    with torch.no_grad():
        reference = sd3.transformer(**{**kwargs, "encoder_hidden_states": mean, "return_dict": False})[0]
        original = sd3.transformer(**{**kwargs, "return_dict": False})[0]
    torch.testing.assert_close(merged_out, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_out, original, atol=1e-5)


def test_kept_groups_never_split_a_group_and_a_kept_member_stands_for_it():
    """Greedy grouping can split a group when a middle member is left out before grouping; grouping
    all positions and then keeping some does not: a group whose first member is dropped is stood
    for by its first kept member, and the stream never has more slots than the unrestricted one."""
    from tokenprune_diffusers.merge import kept_groups, text_stream

    rep = torch.tensor([[0, 0, 0, 3, 3, 5]])
    keep = torch.tensor([[False, True, True, True, False, True]])
    assert kept_groups(rep, keep).tolist() == [[0, 1, 1, 3, 4, 5]]
    assert text_stream(kept_groups(rep, keep), keep).index.shape[1] <= text_stream(rep).index.shape[1]
