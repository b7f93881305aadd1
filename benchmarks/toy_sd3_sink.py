"""Is the SD3 toy's zero padding an attention sink? Keep it as one weighted position, drop the rest.

    OMP_NUM_THREADS=1 python benchmarks/toy_sd3_sink.py --n 200 --out benchmarks/results/toy_sd3_sink

The 256 zero positions that ``StableDiffusion3Pipeline`` appends without T5 are identical vectors,
so in joint attention they act as one key whose logit is raised by ``log 256``
(:func:`~tokenprune_diffusers.toy.train_sd3.compress_zero_tail`, exact). This script generates the
toy's evaluation prompts (same prompts and noise as ``toy.evaluate``) with text sequences of

- "weighted zero": the 77 CLIP positions + one zero position weighted ``log 256`` (exactly stock's
  function, 78 of 333 positions);
- "77 CLIP, zeros dropped": the 77 CLIP positions alone (the zero positions masked out);
- "words + weighted zero": each row's start token, words and end-of-text token + the weighted zero
  position (the CLIP padding dropped; rows padded to the longest and masked),

and scores them with the checker. It is not token pruning (nothing is scored); it tells whether
pruning could drop the padding if it kept the zero positions' total attention weight.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from tokenprune_diffusers.toy.checker import score_images
from tokenprune_diffusers.toy.evaluate import EvalConfig, evaluation_samples
from tokenprune_diffusers.toy.model import load_toy_pipeline
from tokenprune_diffusers.toy.train_sd3 import MultiplicityJointProcessor, compress_zero_tail

VARIANTS = ("weighted zero", "77 CLIP, zeros dropped", "words + weighted zero")


def sequences(pipe, captions: list[str], variant: str):
    """(B, L, D) embeddings, (B, P) pooled, (B, L) key log-weights (-inf on padded slots)."""
    clip_len = pipe.tokenizer_max_length
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False)
    short, weights = compress_zero_tail(embeds, clip_len)  # (B, 78, D), (1, 78)
    if variant != VARIANTS[2]:
        bias = weights.expand(len(captions), -1).clone()  # (B, 78)
        if variant == VARIANTS[1]:
            bias[:, -1] = -math.inf
        return short, pooled, bias
    ids = pipe.tokenizer(captions, padding="max_length", max_length=clip_len, truncation=True, return_tensors="pt").input_ids
    lengths = (ids == pipe.tokenizer.eos_token_id).int().argmax(dim=1) + 1  # (B,) start .. first end-of-text
    width = int(lengths.max()) + 1
    out = short.new_zeros(len(captions), width, short.shape[2])  # (B, width, D)
    bias = torch.full((len(captions), width), -math.inf)
    for r, n in enumerate(lengths.tolist()):
        out[r, :n] = short[r, :n]
        out[r, n] = short[r, clip_len]  # the zero position
        bias[r, :n] = 0.0
        bias[r, n] = weights[0, -1]
    return out, pooled, bias


def run(pipe, captions: list[str], config: EvalConfig, variant: str) -> list[np.ndarray]:
    images = []
    for start in range(0, len(captions), config.batch_size):
        chunk = captions[start : start + config.batch_size]
        emb, pooled, bias = sequences(pipe, [""] * len(chunk) + chunk, variant)
        b = len(chunk)
        gens = [torch.Generator().manual_seed(config.seed + start + j) for j in range(b)]
        with torch.no_grad():
            out = pipe(prompt_embeds=emb[b:], negative_prompt_embeds=emb[:b], pooled_prompt_embeds=pooled[b:],
                       negative_pooled_prompt_embeds=pooled[:b], joint_attention_kwargs={"key_log_weight": bias},
                       num_inference_steps=config.steps, guidance_scale=config.guidance_scale, generator=gens,
                       output_type="np").images
        images.extend(list(out))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="prompts per object count")
    parser.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = parser.parse_args()
    config = EvalConfig.for_kind("sd3", n=args.n)
    pipe = load_toy_pipeline(kind="sd3")
    pipe.transformer.set_attn_processor(MultiplicityJointProcessor())
    rows, start = [], time.perf_counter()
    for variant in VARIANTS:
        for k in (1, 2):
            samples = evaluation_samples(config.n, k, config.seed)
            images = run(pipe, [s.caption for s in samples], config, variant)
            rows.append(dict(variant=variant, objects=k, **score_images(images, [s.objects for s in samples])))
            print(rows[-1], flush=True)
    head = (f"sd3 toy, n={config.n} prompts per object count, {config.steps} Euler steps, guidance "
            f"{config.guidance_scale}, seed {config.seed}; {time.perf_counter() - start:.0f} s\n\n"
            "| text sequence | objects | n | all correct | color | shape | size | position | count |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['variant']} | {r['objects']} | {r['n']} | **{100 * r['all']:.1f}** | "
             + " | ".join(f"{100 * r[a]:.1f}" for a in ("color", "shape", "size", "position", "count")) + " |" for r in rows]
    text = head + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text, encoding="utf-8")
        Path(args.out + ".json").write_text(json.dumps(dict(config=vars(config), rows=rows), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
