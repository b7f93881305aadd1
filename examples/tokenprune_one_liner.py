"""Prompt-token pruning in one line, and what it did.

    python examples/tokenprune_one_liner.py            # SD-1.5 architecture, random weights, 256 px
    python examples/tokenprune_one_liner.py --smoke    # a tiny pipeline, seconds
    python examples/tokenprune_one_liner.py --model runwayml/stable-diffusion-v1-5   # where weights can be had
"""

import argparse

import torch

from tokenprune_diffusers import TokenPruneProcessor
from tokenprune_diffusers.models import sd15_pipeline, tiny_pipeline

ap = argparse.ArgumentParser()
ap.add_argument("--smoke", action="store_true", help="tiny pipeline, 4 steps")
ap.add_argument("--model", default=None, help="hub id or local path of a real checkpoint")
args = ap.parse_args()

if args.model:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model)
else:
    pipe = tiny_pipeline() if args.smoke else sd15_pipeline()
size, steps = (32, 4) if args.smoke else (256, 10)

# the one line: every attention layer of the UNet gets the same processor instance
processor = TokenPruneProcessor(keep_ratio=0.5, warmup=0.2)
pipe.unet.set_attn_processor(processor)

image = pipe(
    "a cat wearing a red hat, highly detailed, studio lighting",
    num_inference_steps=steps,
    height=size,
    width=size,
    generator=torch.Generator().manual_seed(0),
).images[0]

report = processor.report
print(report.summary(max_rows=2))
row = -1  # under classifier-free guidance the prompt rows come after the negative-prompt rows
print("kept  :", " ".join(report.kept_words(row)))
print("pruned:", " ".join(report.pruned_words(row)))
print(f"cross-attention FLOPs saved: {report.flops_saved:.1%}")
