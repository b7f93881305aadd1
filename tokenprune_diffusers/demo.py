"""The demo: stock vs pruned on the same seed, offline.

    python -m tokenprune_diffusers                       # the embedded, trained toy model (32 px, seconds)
    python -m tokenprune_diffusers --toy-sd3             # the embedded SD3-shaped (MM-DiT) toy model
    python -m tokenprune_diffusers --toy-flux            # the embedded Flux-shaped (MM-DiT) toy model
    python -m tokenprune_diffusers --sd15-random         # SD-1.5 architecture, random weights, 256 px (speed)
    python -m tokenprune_diffusers --model PATH_OR_HUB_ID # a real checkpoint, where one can be had
    python -m tokenprune_diffusers --tiny --steps 4       # seconds: a tiny random pipeline (smoke test)

Prints which tokens were kept or pruned at each UNet call, what pruning (and, apart, K/V reuse)
removed from the cross-attention (UNet) or transformer (MM-DiT) FLOPs, the median timings of interleaved runs, and writes
the two images, the per-token heat maps and the report (JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ._atomic import atomic_write_text
from .config import PADDING_POLICIES, TokenPruneConfig
from .heatmap import render_heatmaps
from .patch import apply_token_pruning, remove_token_pruning
from .processor import TokenPruneProcessor
from .toy.evaluate import KINDS as TOY_KINDS  # the steps and guidance each toy is meant for

DEFAULT_PROMPT = "a cat wearing a red hat, highly detailed, studio lighting, trending on artstation"
TOY_PROMPT = "a small red circle on the left and a large blue square on the right, highly detailed, studio lighting"
# per model: (prompt, steps, size, guidance scale) when not given
_DEFAULTS = {
    "toy": (TOY_PROMPT, TOY_KINDS["unet"][0], 32, TOY_KINDS["unet"][1]),
    "toy-sd3": (TOY_PROMPT, TOY_KINDS["sd3"][0], 32, TOY_KINDS["sd3"][1]),
    "toy-flux": (TOY_PROMPT, TOY_KINDS["flux"][0], 32, TOY_KINDS["flux"][1]),
    "sd15-random": (DEFAULT_PROMPT, 10, 256, 7.5),
    "tiny": (DEFAULT_PROMPT, 10, 64, 7.5),
    "model": (DEFAULT_PROMPT, 25, 512, 7.5),
}


# the pruning options the command line offers; their defaults and help come from TokenPruneConfig
CLI_OPTIONS = ("threshold", "keep_ratio", "top_k", "warmup", "min_tokens", "padding", "merge_padding")
RULE_OPTIONS = ("threshold", "keep_ratio", "top_k")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tokenprune_diffusers", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="hub id or local folder of a diffusers checkpoint (default: the embedded, trained toy model)")
    src.add_argument("--sd15-random", action="store_true", help="the SD-1.5 architecture with random weights (real speed, no content)")
    src.add_argument("--toy-sd3", action="store_true", help="the embedded SD3-shaped toy model (StableDiffusion3Pipeline, T5 slot empty)")
    src.add_argument("--toy-flux", action="store_true", help="the embedded Flux-shaped toy model (FluxPipeline, T5 padded, no guidance embedding)")
    src.add_argument("--tiny", action="store_true", help="a tiny random pipeline (seconds; for smoke tests)")
    ap.add_argument("--prompt", default=None, help="default: a two-object prompt for the toy model, else a cat in a red hat")
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--steps", type=int, default=None, help="num_inference_steps (toy 15, SD-1.5 random 10)")
    ap.add_argument("--size", type=int, default=None, help="image height and width in pixels (toy 32, SD-1.5 random 256)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="toy 2.0, others 7.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each pipeline, interleaved, after one untimed warm-up run each")
    rule = ap.add_mutually_exclusive_group()
    for name, (default, text, _) in TokenPruneConfig.help().items():
        if name not in CLI_OPTIONS:
            continue
        group = rule if name in RULE_OPTIONS else ap
        kind = {"padding": str, "top_k": int, "min_tokens": int}.get(name, float)
        extra = {"choices": PADDING_POLICIES} if name == "padding" else {}
        shown = "" if default is None else f" (default {default})"
        group.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"{text}{shown}", **extra)
    ap.add_argument("--out", default="outputs/demo", help="folder for images, heat maps and report")
    args = ap.parse_args(argv)
    args.source = ("model" if args.model else "sd15-random" if args.sd15_random else "tiny" if args.tiny
                   else "toy-sd3" if args.toy_sd3 else "toy-flux" if args.toy_flux else "toy")
    prompt, steps, size, guidance = _DEFAULTS[args.source]
    args.prompt = prompt if args.prompt is None else args.prompt
    args.steps = steps if args.steps is None else args.steps
    args.size = size if args.size is None else args.size
    args.guidance_scale = guidance if args.guidance_scale is None else args.guidance_scale
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.size < 8 or args.size % 8:
        ap.error(f"--size must be a positive multiple of 8, got {args.size}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    try:  # refuse bad pruning options before minutes are spent building the pipeline
        args.options = {k: getattr(args, k) for k in CLI_OPTIONS if getattr(args, k) is not None}
        TokenPruneConfig(**args.options)
    except ValueError as err:
        ap.error(str(err))
    return args


def load_pipeline(args: argparse.Namespace):
    if args.model:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model, safety_checker=None)
        return pipe, f"{args.model}"
    from .models import sd15_pipeline, tiny_pipeline

    if args.source == "tiny":
        return tiny_pipeline(seed=args.seed), "tiny random pipeline"
    if args.source == "sd15-random":
        return sd15_pipeline(seed=args.seed), "SD-1.5 architecture, random weights (seeded)"
    from .toy.model import load_toy_pipeline

    if args.source == "toy-flux":
        return load_toy_pipeline(kind="flux"), "embedded Flux-shaped toy model (MM-DiT trained on captioned shapes; tokenprune_diffusers.toy.flux)"
    if args.source == "toy-sd3":
        return load_toy_pipeline(kind="sd3"), "embedded SD3-shaped toy model (MM-DiT trained on captioned shapes; tokenprune_diffusers.toy.sd3)"
    pipe = load_toy_pipeline()
    return pipe, "embedded toy model (trained on captioned shapes; tokenprune_diffusers.toy)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"building pipeline ({args.model or args.source}) ...", flush=True)
    pipe, label = load_pipeline(args)
    size = args.size
    extra = {}
    if args.source == "toy-flux":
        from .toy.flux import FLUX_MAX_SEQUENCE_LENGTH

        extra["max_sequence_length"] = FLUX_MAX_SEQUENCE_LENGTH  # as trained

    def generate():
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            img = pipe(
                args.prompt,
                negative_prompt=args.negative_prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                height=size,
                width=size,
                generator=g,
                output_type="np",
                **extra,
            ).images[0]
        return img, time.perf_counter() - t0

    def pruned():
        proc = apply_token_pruning(pipe, **args.options)  # the options given, else the model family's defaults
        img, seconds = generate()
        remove_token_pruning(pipe)
        return img, seconds, proc.report

    config = apply_token_pruning(pipe, **args.options).config  # what the pruned runs take (SD3 / Flux: the family's)
    remove_token_pruning(pipe)
    print(f"stock and pruned ({TokenPruneProcessor(config)!r}): {args.steps} steps at {size}x{size}, "
          f"one warm-up run each, then {args.repeats} timed runs each, interleaved ...", flush=True)
    stock_img, _ = generate()
    pruned_img, _, report = pruned()
    stock_s, pruned_s = [], []
    for r in range(args.repeats):  # alternate which goes first
        for which in ("stock", "pruned") if r % 2 == 0 else ("pruned", "stock"):
            if which == "stock":
                stock_s.append(generate()[1])
            else:
                pruned_s.append(pruned()[1])

    print()
    print(report.summary(max_rows=2))
    print()
    print(f"model: {label}")
    print(timing_lines(stock_s, pruned_s))
    shares = report.savings()
    exact = ("the merges (zeros: exact; padding: approximate)", "merge") if report.flops_scope == "transformer" else ("K/V reuse (exact, not pruning)", "kv_reuse")
    print(f"{report.flops_scope} FLOPs against stock: pruning removed {100 * shares['pruning']:.1f}%, "
          f"{exact[0]} removed {100 * shares[exact[1]]:.1f}%, scoring added {-100 * shares['scoring']:.1f}%")
    diff = np.abs(stock_img.astype(np.float64) - pruned_img.astype(np.float64))
    mse = float((diff**2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
    print(f"fidelity vs stock: PSNR {psnr:.2f} dB, max abs diff {diff.max():.4f}")
    if report.keep is None or bool(report.keep.all()):
        why = ("the rule keeps every token (threshold 0" + ("; the merges shortened the text)" if shares["merge"] > 0 else ")")
               if config.threshold == 0 else "every candidate scored above the rule")
        print(f"nothing was pruned: {why}; try a higher --threshold or --keep-ratio 0.5")

    from PIL import Image

    Image.fromarray((stock_img * 255).round().astype(np.uint8)).save(out / "stock.png")
    Image.fromarray((pruned_img * 255).round().astype(np.uint8)).save(out / "pruned.png")
    heat = render_heatmaps(report, out / "heatmaps.png", image=stock_img) if report.maps else None
    summary = report.to_dict() | {"model": label, "stock_seconds": stock_s, "pruned_seconds": pruned_s, "psnr_db": psnr}
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1))
    print(f"wrote {out / 'stock.png'}, {out / 'pruned.png'}, {heat or '(no heat maps)'}, {out / 'report.json'}")
    return 0


def timing_lines(stock: list[float], pruned: list[float]) -> str:
    """Medians of the interleaved runs, and their ratio only when it is larger than the spread of the runs."""
    a, b = statistics.median(stock), statistics.median(pruned)
    lines = [f"stock : median {a:7.3f} s over {len(stock)} runs (min {min(stock):.3f}, max {max(stock):.3f})",
             f"pruned: median {b:7.3f} s over {len(pruned)} runs (min {min(pruned):.3f}, max {max(pruned):.3f})"]
    separated = max(pruned) < min(stock) or max(stock) < min(pruned)
    if len(stock) > 1 and separated:
        lines.append(f"speed: {a / b:.2f}x (every pruned run {'faster' if b < a else 'slower'} than every stock run)")
    else:
        lines.append("speed: within the noise (the runs overlap); see benchmarks/ for measured speedups")
    return "\n".join(lines)
