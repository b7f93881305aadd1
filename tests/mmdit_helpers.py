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


def assert_kernel_scores_equal_recomputed(pipe) -> None:
    """A scored generation's mass and maps with the normaliser from the attention kernel (CPU's
    default) equal those with it recomputed (the math backend), up to the two kernels' rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tokenprune_diffusers import apply_token_pruning

    proc = apply_token_pruning(pipe, top_k=2, warmup=0.4)
    generate(pipe)
    fast, maps = proc.report.mass.clone(), {hw: m.clone() for hw, m in proc.report.maps.items()}
    with sdpa_kernel(SDPBackend.MATH):
        generate(pipe)
    torch.testing.assert_close(proc.report.mass, fast, atol=1e-6, rtol=1e-4)
    assert maps and all(torch.allclose(proc.report.maps[hw], m, atol=1e-5, rtol=1e-4) for hw, m in maps.items())
