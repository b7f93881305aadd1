"""Does pruning make the toy model forget the red circle? Stock vs pruned, scored by the checker.

    python examples/toy_prompt_adherence.py            # 20 prompts per object count, a few minutes
    python examples/toy_prompt_adherence.py --smoke    # 2 prompts, 4 steps: seconds
    python examples/toy_prompt_adherence.py --toy sd3  # the SD3-shaped MM-DiT toy instead

Loads a trained toy model shipped with the package (``load_toy_pipeline(kind=...)``, offline), generates
the same seeded prompts stock and under ``apply_token_pruning``, prints the adherence table, the
kept and pruned words of one prompt, and writes a picture grid (prompt rows; stock | pruned).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from tokenprune_diffusers import apply_token_pruning, remove_token_pruning
from tokenprune_diffusers.toy import load_toy_pipeline
from tokenprune_diffusers.toy.evaluate import (
    KINDS,
    EvalConfig,
    evaluate,
    evaluation_samples,
    generate,
    markdown_table,
)


def picture_grid(columns: list[list[np.ndarray]], path: Path, scale: int = 4) -> None:
    """Write a PNG: one row per prompt, one column per setting; pixels upscaled ``scale`` times."""
    from PIL import Image

    rows = [np.concatenate([col[i] for col in columns], axis=1) for i in range(len(columns[0]))]  # (32, 32*C, 3)
    grid = np.concatenate(rows, axis=0)  # (32*R, 32*C, 3)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", choices=sorted(KINDS), default="unet", help="which toy model (UNet or SD3-shaped MM-DiT)")
    parser.add_argument("--smoke", action="store_true", help="2 prompts, 4 steps: a seconds-long check")
    parser.add_argument("--n", type=int, default=20, help="prompts per object count")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the toy's)")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--padding", choices=("score", "keep", "drop"), default="score", help="padding policy")
    parser.add_argument("--merge-padding", type=float, default=None,
                        help="MM-DiT toys: merge_padding (default: the model family's, see mmdit.FAMILIES)")
    parser.add_argument("--weights", default=None, help="weights folder (default: the package's)")
    parser.add_argument("--out", default="outputs/toy_adherence", help="folder for the picture grid")
    args = parser.parse_args()
    n, steps = (2, 4) if args.smoke else (args.n, args.steps or KINDS[args.toy][0])
    torch.set_num_threads(min(2, torch.get_num_threads()))

    pipe = load_toy_pipeline(args.weights, kind=args.toy)
    config = EvalConfig.for_kind(args.toy, n=n, steps=steps, batch_size=min(n, 50))  # the toy's guidance, default seed
    options = dict(threshold=args.threshold, warmup=args.warmup, padding=args.padding)
    pruned = f"threshold {args.threshold}, warmup {args.warmup}" + ("" if args.padding == "score" else f", padding {args.padding}")
    if args.merge_padding is not None:
        options["merge_padding"] = args.merge_padding
        pruned += f", merge padding {args.merge_padding}"
    settings = (("stock", None), (pruned, options))
    print(markdown_table(evaluate(pipe, config, settings=settings, progress=False), kind=args.toy))

    samples = evaluation_samples(min(n, 6), 2, config.seed)
    captions = [s.caption for s in samples]
    stock = generate(pipe, captions, config)
    proc = apply_token_pruning(pipe, **options)
    try:
        with_pruning = generate(pipe, captions, config)
        report = proc.report
    finally:
        remove_token_pruning(pipe)
    row = report.keep.shape[0] - len(captions)  # first prompt row (the negative prompts come first)
    print(f"prompt: {captions[0]!r}\n  kept:   {report.kept_words(row)}\n  pruned: {report.pruned_words(row)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picture_grid([stock, with_pruning], out / "stock_vs_pruned.png")
    print(f"wrote {out / 'stock_vs_pruned.png'} (rows: prompts; columns: stock, {pruned})")


if __name__ == "__main__":
    main()
