"""Cross-check of the Flux toy's padding result without token pruning: the text stream cut by hand.

    OMP_NUM_THREADS=1 python benchmarks/toy_flux_truncate.py --n 100

For the evaluation's seeded prompts (same noise seeds, 10 Euler steps), three text streams:
"stock" (T5 at 128 positions, as trained); "cut after </s>" (the same T5 outputs, the padding
positions removed before the transformer: what ``padding="drop"`` runs); "T5 at the prompt's
length" (T5 run without any padding, ``max_sequence_length`` = the prompt's token count). Prompts are
grouped by token count so a batch shares one length.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from tokenprune_diffusers.toy.checker import score_images
from tokenprune_diffusers.toy.evaluate import EvalConfig, evaluation_samples
from tokenprune_diffusers.toy.model import load_toy_pipeline


def run(pipe, samples, config: EvalConfig, mode: str) -> dict:
    tok = pipe.tokenizer_2
    groups = defaultdict(list)
    for i, s in enumerate(samples):
        groups[len(tok(s.caption).input_ids)].append(i)
    images: list = [None] * len(samples)
    for length, idx in groups.items():
        captions = [samples[i].caption for i in idx]
        gens = [torch.Generator().manual_seed(config.seed + i) for i in idx]
        seq = length if mode == "t5 short" else config.max_sequence_length
        embeds, pooled, _ = pipe.encode_prompt(captions, None, max_sequence_length=seq)
        if mode == "cut":
            embeds = embeds[:, :length]
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=config.steps,
                   generator=gens, output_type="np").images
        for i, im in zip(idx, out):
            images[i] = im
    return score_images(images, [s.objects for s in samples])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = EvalConfig.for_kind("flux", n=args.n)
    pipe = load_toy_pipeline(kind="flux")
    print("| text stream | objects | n | all correct | color | shape | size | position | count |")
    print("|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for k in (1, 2):
            samples = evaluation_samples(args.n, k, config.seed)
            for label, mode in (("stock (128 positions)", "stock"), ("cut after </s>", "cut"),
                                ("T5 at the prompt's length", "t5 short")):
                r = run(pipe, samples, config, mode)
                cells = [f"{100 * r[a]:.1f}" for a in ("color", "shape", "size", "position", "count")]
                print(f"| {label} | {k} | {r['n']} | **{100 * r['all']:.1f}** | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
