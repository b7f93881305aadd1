"""The real SD-1.5 and SDXL UNet architectures (random weights), at a small resolution."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from tokenprune_diffusers import TokenPruneProcessor  # noqa: E402
from tokenprune_diffusers.models import SD15_UNET_CONFIG, build_unet  # noqa: E402


@pytest.mark.slow
def test_sd15_unet_pruned_equals_stock_with_the_pruned_tokens_masked(clip_tokenizer):
    unet = build_unet(SD15_UNET_CONFIG, seed=0)
    prompts = ["a cat wearing a red hat, highly detailed, studio lighting", "a dog"]
    ids = clip_tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500)  # 64 px images
    text = torch.randn(2, 77, 768, generator=g)
    proc = TokenPruneProcessor(keep_ratio=0.3, warmup=0.0)
    proc.tokenizer = clip_tokenizer
    unet.set_attn_processor(proc)
    proc.begin_generation(num_steps=2, token_ids=ids)
    with torch.no_grad():
        unet(x, t, text)  # call 0: scored over all 16 cross-attention layers
        pruned = unet(x, t, text).sample  # call 1: pruned
        unet.set_attn_processor(AttnProcessor2_0())
        reference = unet(x, t, text, encoder_attention_mask=proc.report.keep.float()).sample
    step = proc.report.steps[1]
    assert step.layers == 16 and step.pruned
    assert max(step.kept_counts) < 77 and step.kept_counts[0] != step.kept_counts[1]
    torch.testing.assert_close(pruned, reference, atol=1e-4, rtol=1e-4)
