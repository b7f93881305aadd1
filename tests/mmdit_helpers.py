"""What the MM-DiT (SD3, Flux) token-pruning tests share: one seeded tiny generation and a probe of
the text length each transformer call runs on."""

from __future__ import annotations

import torch

PROMPT = "a cat wearing a red hat"


def generate(pipe, prompt=PROMPT, steps=5, **kw):
    """Images (np) of one seeded 32 px generation without gradients."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=steps, generator=g, height=32, width=32, output_type="np", **kw).images


def text_lengths(pipe):
    """(lengths, handle): the text positions every transformer call's blocks see (the context
    embedder's input, after pruning shortened it); remove the handle when done."""
    lengths = []
    return lengths, pipe.transformer.context_embedder.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
