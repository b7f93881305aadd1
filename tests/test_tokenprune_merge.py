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
