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


def test_random_weight_pipelines_keep_sd_published_clip_sample_for_a_swapped_scheduler():
    """SD's scheduler config says clip_sample=False; a DDIM swapped in with from_config must read it
    (DDIM's own default, True, clips x0 to [-1, 1] and sends any perturbed generation elsewhere)."""
    from diffusers import DDIMScheduler

    from tokenprune_diffusers.models import SD15_SCHEDULER_CONFIG, tiny_pipeline

    assert SD15_SCHEDULER_CONFIG["clip_sample"] is False
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.clip_sample is False

    def latents(scale: float) -> torch.Tensor:
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        x = x + scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            return pipe("a cat", num_inference_steps=10, height=32, width=32, latents=x, output_type="latent").images

    ref, near = latents(0.0), latents(1e-2)
    assert float(ref.abs().max()) > 1.5  # random weights: x0 far beyond [-1, 1], where clipping would bite
    assert float((near - ref).norm() / ref.norm()) < 0.05  # a 1% nudge of the noise stays a 1%-ish change
