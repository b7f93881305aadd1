"""The report's FLOPs are what really runs: pinned against torch's own FLOP counter on a tiny UNet."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tokenprune_diffusers import apply_token_pruning, remove_token_pruning  # noqa: E402

PROMPTS = ["a cat wearing a red hat", "a dog"]


def counted_cross_attention_flops(unet, x, t, text) -> float:
    """FLOPs of the cross-attention modules (attn2) in one UNet call, as torch counts them (the math
    SDPA backend decomposes into the matmuls it counts)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, text)
    return float(sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("attn2")))


@pytest.fixture
def inputs(clip_tokenizer):
    g = torch.Generator().manual_seed(0)
    ids = clip_tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(2, 77, 32, generator=g), ids


@pytest.mark.parametrize("reuse_kv", [True, False])
def test_reported_flops_equal_the_flop_counter_per_call(tiny_pipe, clip_tokenizer, inputs, reuse_kv):
    unet, (x, t, text, ids) = tiny_pipe.unet, inputs
    before = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    stock = counted_cross_attention_flops(unet, x, t, text)
    proc = apply_token_pruning(unet, top_k=2, warmup=0.0, padding="drop", reuse_kv=reuse_kv)
    proc.tokenizer = clip_tokenizer
    proc.begin_generation(3, token_ids=ids)
    counted = [counted_cross_attention_flops(unet, x, t, text) for _ in range(3)]  # scored, pruned, pruned
    remove_token_pruning(unet)
    unet.set_attn_processor(before)
    rep = proc.report
    assert [(s.scored, s.pruned) for s in rep.steps] == [(True, False), (False, True), (False, True)]
    assert [s.flops_stock for s in rep.steps] == pytest.approx([stock] * 3, rel=1e-9)
    assert [s.flops_done for s in rep.steps] == pytest.approx(counted, rel=1e-9)
    # attribution: scoring costs on call 0, pruning saves from call 1, K/V reuse only from call 2
    s0, s1, s2 = rep.steps
    assert s0.flops_scoring > 0 and not any(s0.saved.values())
    assert s1.saved["pruning"] > 0 and s1.saved["kv_reuse"] == 0
    assert (s2.saved["kv_reuse"] > 0) == reuse_kv and s2.saved["pruning"] == s1.saved["pruning"]
    shares = rep.savings()
    assert sum(shares.values()) == pytest.approx(rep.flops_saved, abs=1e-12)


def test_a_run_that_prunes_nothing_reports_nothing_saved_by_pruning(tiny_pipe):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for warmup in (1.0, 0.2):
            proc = apply_token_pruning(tiny_pipe, warmup=warmup, threshold=0.0)  # threshold 0 keeps everything
            tiny_pipe("a red hat", num_inference_steps=5, generator=g, height=32, width=32, output_type="np")
            shares = proc.report.savings()
            assert shares["pruning"] == 0 and shares["gating"] == 0
            assert shares["kv_reuse"] > 0  # the prompt is projected once, not five times: that is reuse, not pruning
            assert (shares["scoring"] < 0) == (warmup < 1.0)  # warm-up 1.0 never scores
            remove_token_pruning(tiny_pipe)
