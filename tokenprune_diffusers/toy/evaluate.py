"""Prompt adherence of the toy model, stock and under token pruning, as a markdown table.

    python -m tokenprune_diffusers.toy.evaluate --n 200 --out adherence.md
    python -m tokenprune_diffusers.toy.evaluate --toy sd3 --n 200 --out adherence_sd3.md
    python -m tokenprune_diffusers.toy.evaluate --toy flux --n 200 --out adherence_flux.md

Prompts are seeded samples of :class:`~tokenprune_diffusers.toy.data.ToyShapesDataset` (1-object
and 2-object prompts evaluated separately, distractor phrases included); prompt ``i`` is always
generated from ``torch.Generator().manual_seed(seed + i)``, so every setting sees the same prompts
and the same initial noise, and only the pruning differs. Images are scored by the analytic
checker (:mod:`~tokenprune_diffusers.toy.checker`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .._atomic import atomic_write_text
from ..deepcache import apply_deep_cache, remove_deep_cache
from ..guidance import CollapseGuidance
from ..patch import apply_token_pruning, remove_token_pruning
from .checker import ATTRIBUTES, score_images
from .data import COLORS, POSITIONS, SHAPES, SIZES, ToySample, ToyShapesDataset

__all__ = ["EvalConfig", "Setting", "DEFAULT_SETTINGS", "SPEED_SETTINGS", "SD3_SETTINGS", "FLUX_SETTINGS", "KINDS", "evaluation_samples",
           "generate", "evaluate", "paired_difference", "markdown_table", "load_kind", "main"]


class Setting(NamedTuple):
    """One evaluated configuration; a plain ``(label, prune)`` pair is accepted too."""

    label: str
    prune: dict | None = None  # apply_token_pruning options; None = stock processors
    collapse: bool = False  # CollapseGuidance as callback_on_step_end (needs a gate in prune)
    deep_cache: dict | None = None  # apply_deep_cache options; None = off


# (label, apply_token_pruning options or None for stock)
DEFAULT_SETTINGS: tuple[tuple[str, dict | None], ...] = (
    ("stock", None),
    ("threshold 0.1, warmup 0.2", dict(threshold=0.1, warmup=0.2)),
    ("threshold 0.1, warmup 0", dict(threshold=0.1, warmup=0.0)),
    ("threshold 0.3, warmup 0.2", dict(threshold=0.3, warmup=0.2)),
    ("threshold 0.3, warmup 0", dict(threshold=0.3, warmup=0.0)),
    ("threshold 0.5, warmup 0.2", dict(threshold=0.5, warmup=0.2)),
)
# the speed options beyond pruning (approximate ones: their adherence cost is what this measures)
SPEED_SETTINGS: tuple[Setting, ...] = (
    Setting("gate 0.4", dict(threshold=0.1, warmup=0.2, gate=0.4)),
    Setting("gate 0.4 + collapse", dict(threshold=0.1, warmup=0.2, gate=0.4), collapse=True),
    Setting("gate 0.2 + collapse", dict(threshold=0.1, warmup=0.1, gate=0.2), collapse=True),
    Setting("DeepCache N=3", None, deep_cache=dict(interval=3)),
    Setting("gate 0.2 + collapse + DeepCache N=3", dict(threshold=0.1, warmup=0.1, gate=0.2), collapse=True,
            deep_cache=dict(interval=3)),
)
# the SD3 toy: thresholds x warm-ups x padding policies (its text is 77 CLIP + 256 zero positions)
SD3_SETTINGS: tuple[tuple[str, dict | None], ...] = (
    ("stock", None),
    ("threshold 0.1, warmup 0.2", dict(threshold=0.1, warmup=0.2, merge_padding=None)),
    ("threshold 0.1, warmup 0.2, padding drop", dict(threshold=0.1, warmup=0.2, padding="drop", merge_padding=None)),
    ("threshold 0.1, warmup 0, padding drop", dict(threshold=0.1, warmup=0.0, padding="drop", merge_padding=None)),
    ("threshold 0.3, warmup 0.2, padding drop", dict(threshold=0.3, warmup=0.2, padding="drop", merge_padding=None)),
    ("threshold 0.5, warmup 0.2, padding drop", dict(threshold=0.5, warmup=0.2, padding="drop", merge_padding=None)),
    ("threshold 0.1, warmup 0", dict(threshold=0.1, warmup=0.0, merge_padding=None)),
    ("threshold 0.3, warmup 0.2", dict(threshold=0.3, warmup=0.2, merge_padding=None)),
    ("threshold 0.3, warmup 0.2, padding keep", dict(threshold=0.3, warmup=0.2, padding="keep", merge_padding=None)),
    # merge_padding: the CLIP padding after end-of-text run as groups of near-identical positions
    ("merge padding 0.9", dict(threshold=0.0, merge_padding=0.9)),
    ("merge padding 0.8", dict(threshold=0.0, merge_padding=0.8)),
    ("merge padding 0.7", dict(threshold=0.0, merge_padding=0.7)),
    ("merge padding 0.5", dict(threshold=0.0, merge_padding=0.5)),
    ("merge padding 0.3", dict(threshold=0.0, merge_padding=0.3)),
    ("merge padding 0.1", dict(threshold=0.0, merge_padding=0.1)),
    ("threshold 0.1, merge padding 0.9", dict(threshold=0.1, merge_padding=0.9)),
    ("SD3 defaults", {}),  # what apply_token_pruning(pipe) does (mmdit.FAMILIES)
)
# the Flux toy: its text is T5 only, FLUX_MAX_SEQUENCE_LENGTH positions, mostly padding (T5 ran unmasked)
FLUX_SETTINGS: tuple[tuple[str, dict | None], ...] = (
    ("stock", None),
    ("threshold 0.1, warmup 0.2", dict(threshold=0.1, merge_padding=None)),  # the library's UNet rule
    ("padding drop, warmup 0.2", dict(threshold=0.1, padding="drop", merge_padding=None)),
    ("padding drop, warmup 0", dict(threshold=0.1, padding="drop", warmup=0.0, merge_padding=None)),
    ("threshold 0.1, padding keep", dict(threshold=0.1, padding="keep", merge_padding=None)),
    ("top_k 8", dict(top_k=8, merge_padding=None)),
    ("merge padding 0.9", dict(threshold=0.0, merge_padding=0.9)),
    ("merge padding 0.7", dict(threshold=0.0, merge_padding=0.7)),
    ("merge padding 0.5", dict(threshold=0.0, merge_padding=0.5)),
    ("Flux defaults", {}),  # what apply_token_pruning(pipe) does (mmdit.FAMILIES)
)
# toy kind -> (num_inference_steps, guidance_scale) it is meant for (see docs/toy_model.md); the Flux
# toy has no guidance embedding: FluxPipeline ignores guidance_scale, it samples without guidance
KINDS: dict[str, tuple[int, float]] = {"unet": (15, 2.0), "sd3": (10, 3.0), "flux": (10, 1.0)}
_ATTRIBUTE_WORDS = frozenset([*COLORS, *SHAPES, *SIZES, *POSITIONS])
_SPECIAL = frozenset(["<|startoftext|>", "<|endoftext|>", "</s>", "<pad>"])  # CLIP's and T5's start / end / padding


@dataclass
class EvalConfig:
    """What to generate and how."""

    n: int = 200  # prompts per object count (1-object and 2-object each)
    steps: int = 15  # num_inference_steps (DPM-Solver++)
    guidance_scale: float = 2.0  # classifier-free guidance (2.0 beat 5.0 and 8.0 in a small sweep)
    seed: int = 10_000  # prompt set and noise seeds (disjoint from training seeds by default)
    batch_size: int = 50  # prompts per pipeline call
    max_sequence_length: int | None = None  # passed to the pipeline when set (the Flux toy's T5 length)

    @classmethod
    def for_kind(cls, kind: str, **options) -> EvalConfig:
        """The config with the steps and guidance the toy ``kind`` ("unet" or "sd3") is meant for."""
        if kind not in KINDS:
            raise ValueError(f"unknown toy kind {kind!r}; expected one of {sorted(KINDS)}")
        steps, guidance = KINDS[kind]
        defaults = {"steps": steps, "guidance_scale": guidance}
        if kind == "flux":
            from .flux import FLUX_MAX_SEQUENCE_LENGTH

            defaults["max_sequence_length"] = FLUX_MAX_SEQUENCE_LENGTH
        return cls(**{**defaults, **options})

    def __post_init__(self) -> None:
        for name in ("n", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


def evaluation_samples(n: int, num_objects: int, seed: int) -> list[ToySample]:
    """``n`` seeded evaluation prompts (with their ground truth) of ``num_objects`` objects each."""
    data = ToyShapesDataset(seed=seed + num_objects, num_objects=num_objects)
    return [data[i] for i in range(n)]


def generate(pipe, captions: list[str], config: EvalConfig, on_batch=None, **pipe_kwargs) -> list[np.ndarray]:
    """(32, 32, 3) images in [0, 1]; caption ``i`` uses ``Generator().manual_seed(config.seed + i)``.

    ``on_batch(captions)`` is called after each pipeline call (e.g. to read the pruning report);
    ``pipe_kwargs`` go to every pipeline call (e.g. ``callback_on_step_end``).
    """
    if config.max_sequence_length is not None:
        pipe_kwargs = {"max_sequence_length": config.max_sequence_length, **pipe_kwargs}
    images: list[np.ndarray] = []
    for start in range(0, len(captions), config.batch_size):
        chunk = captions[start : start + config.batch_size]
        gens = [torch.Generator().manual_seed(config.seed + start + j) for j in range(len(chunk))]
        out = pipe(
            chunk,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale,
            generator=gens,
            output_type="np",
            **pipe_kwargs,
        ).images  # (b, 32, 32, 3)
        images.extend(list(out))
        if on_batch is not None:
            on_batch(chunk)
    return images


def _pruned_shares(report, rows: int) -> tuple[int, int, int, int]:
    """(attribute words pruned, attribute words, other words pruned, other words) over the prompt rows."""
    ap = at = op = ot = 0
    offset = report.keep.shape[0] - rows if report.keep is not None else 0  # CFG: negatives first
    for r in range(offset, offset + rows):
        words = report.words(r, list(range(report.roles.shape[1]))) if report.roles is not None else []
        pruned = report.pruned_words(r)
        for w in words:
            if w in _SPECIAL:
                continue
            if w in _ATTRIBUTE_WORDS:
                at += 1
            else:
                ot += 1
        for w in pruned:
            if w in _ATTRIBUTE_WORDS:
                ap += 1
            elif w not in _SPECIAL:
                op += 1
    return ap, at, op, ot


def _reset(pipe) -> None:
    """Stock processors again (DeepCache is a UNet option: an MM-DiT pipeline never has it)."""
    if getattr(pipe, "unet", None) is not None:
        remove_deep_cache(pipe)
    remove_token_pruning(pipe)


def _sequence_removed(report) -> tuple[float, float]:
    """Share of the text sequence the denoiser no longer runs, on the pruned calls (those after the
    warm-up, whether or not they dropped a token: merge_padding shortens them too) and averaged over
    every call: from the text positions each MM-DiT call ran (the zero merge, merge_padding and an
    early padding drop included), else from the kept counts (the batch runs its longest row's)."""
    if report.keep is None or not report.steps:
        return 0.0, 0.0
    length = report.keep.shape[1]
    runs = [s.text_positions if s.text_positions is not None  # what the transformer ran (merges, early drop)
            else max(s.kept_counts) if s.pruned and s.kept_counts else length for s in report.steps]
    start = report.prune_start
    pruned = [r for r, s in zip(runs, report.steps) if start is not None and s.call >= start]
    on_pruned = 1.0 - float(np.mean(pruned)) / length if pruned else 0.0
    return on_pruned, 1.0 - float(np.mean(runs)) / length


def evaluate(pipe, config: EvalConfig, settings=DEFAULT_SETTINGS, progress: bool = True, on_row=None) -> list[dict]:
    """One row per (setting, object count): checker scores, FLOPs saved, words pruned, seconds.
    ``on_row(rows)`` is called with the rows so far after each one (e.g. to write partial results)."""
    from tqdm.auto import tqdm

    rows = []
    work = [(Setting(*setting), k) for setting in settings for k in (1, 2)]
    for setting, k in tqdm(work, disable=not progress, desc="settings"):
        label = setting.label
        samples = evaluation_samples(config.n, k, config.seed)
        captions = [s.caption for s in samples]
        stats = dict(flops=[], pruning=[], kv_reuse=[], positions=[], seq_pruned=[], seq_gen=[], ap=0, at=0, op=0, ot=0)
        _reset(pipe)
        proc = None
        if setting.prune is not None:
            proc = apply_token_pruning(pipe, record_maps=False, **setting.prune)
        if setting.deep_cache is not None:
            apply_deep_cache(pipe, **setting.deep_cache)
        extra = {"callback_on_step_end": CollapseGuidance(proc, pipe)} if setting.collapse else {}

        def on_batch(chunk, proc=proc, stats=stats):
            if proc is None or proc.report is None:
                return
            rep = proc.report
            stats["flops"].append(rep.flops_saved)
            stats["pruning"].append(rep.savings()["pruning"])
            stats["kv_reuse"].append(rep.savings()["kv_reuse"])
            stats["positions"].append(0.0 if rep.keep is None else 1.0 - float(rep.keep.float().mean()))
            pruned, generation = _sequence_removed(rep)
            stats["seq_pruned"].append(pruned)
            stats["seq_gen"].append(generation)
            ap, at, op, ot = _pruned_shares(proc.report, len(chunk))
            stats["ap"] += ap
            stats["at"] += at
            stats["op"] += op
            stats["ot"] += ot

        start = time.perf_counter()
        images = generate(pipe, captions, config, on_batch=on_batch, **extra)
        seconds = time.perf_counter() - start
        _reset(pipe)
        scores = score_images(images, [s.objects for s in samples], per_image=True)
        rows.append(
            dict(
                setting=label,
                objects=k,
                **scores,
                flops_saved=float(np.mean(stats["flops"])) if stats["flops"] else 0.0,
                flops_saved_pruning=float(np.mean(stats["pruning"])) if stats["pruning"] else 0.0,
                flops_saved_kv_reuse=float(np.mean(stats["kv_reuse"])) if stats["kv_reuse"] else 0.0,
                positions_pruned=float(np.mean(stats["positions"])) if stats["positions"] else 0.0,
                sequence_removed=float(np.mean(stats["seq_pruned"])) if stats["seq_pruned"] else 0.0,
                sequence_removed_generation=float(np.mean(stats["seq_gen"])) if stats["seq_gen"] else 0.0,
                attribute_pruned=stats["ap"] / stats["at"] if stats["at"] else 0.0,
                other_pruned=stats["op"] / stats["ot"] if stats["ot"] else 0.0,
                seconds=seconds,
            )
        )
        if on_row is not None:
            on_row(rows)
    return rows


def paired_difference(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """All-correct share of ``a`` minus that of ``b`` over the same prompts and seeds (the rows'
    ``all_per_image``), and its standard error (of the per-prompt differences; 0 when n < 2)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired verdicts need two lists of the same (non-zero) length, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se


def markdown_table(rows: list[dict], kind: str = "unet") -> str:
    """The evaluation rows as a GitHub markdown table (percentages); ``kind="sd3"`` or ``"flux"`` shows
    the share of the text sequence removed instead of the UNet's cross-attention FLOPs."""
    head = ["setting", "objects", "n", "all correct", *ATTRIBUTES, "count", "attribute words pruned",
            "other words pruned", "text positions pruned"]
    mmdit = kind != "unet"
    tail = (["text sequence removed (pruned calls)", "over the generation"] if mmdit
            else ["x-attn FLOPs: by pruning", "by K/V reuse", "in all"])
    head += tail
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], str(r["objects"]), str(r["n"]), f"**{100 * r['all']:.1f}**"]
        cells += [f"{100 * r[a]:.1f}" for a in ATTRIBUTES]
        cells += [f"{100 * r['count']:.1f}", f"{100 * r['attribute_pruned']:.1f}", f"{100 * r['other_pruned']:.1f}",
                  f"{100 * r['positions_pruned']:.1f}"]
        keys = (["sequence_removed", "sequence_removed_generation"] if mmdit
                else ["flops_saved_pruning", "flops_saved_kv_reuse", "flops_saved"])
        cells += [f"{100 * r[k]:.1f}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_kind(kind: str, weights: str | None = None, checkpoint: str | None = None):
    """The toy pipeline of ``kind``: from a training run folder's EMA weights, an exported folder, or the package."""
    if kind not in KINDS:
        raise ValueError(f"unknown toy kind {kind!r}; expected one of {sorted(KINDS)}")
    if checkpoint:
        if kind == "sd3":
            from .train_sd3 import sd3_pipeline_from_checkpoint

            return sd3_pipeline_from_checkpoint(checkpoint)
        if kind == "flux":
            from .train_flux import flux_pipeline_from_checkpoint

            return flux_pipeline_from_checkpoint(checkpoint)
        from .train import pipeline_from_checkpoint

        return pipeline_from_checkpoint(checkpoint)
    from .model import load_toy_pipeline

    return load_toy_pipeline(weights, kind=kind)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", choices=sorted(KINDS), default="unet", help="which toy model (UNet, SD3- or Flux-shaped MM-DiT)")
    parser.add_argument("--n", type=int, default=EvalConfig.n, help="prompts per object count")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the toy's, see KINDS)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the toy's, see KINDS")
    parser.add_argument("--seed", type=int, default=EvalConfig.seed)
    parser.add_argument("--weights", default=None, help="exported weights folder (default: the package's)")
    parser.add_argument("--checkpoint", default=None, help="evaluate a training run folder's EMA weights instead")
    parser.add_argument("--stock-only", action="store_true", help="only the stock row")
    parser.add_argument("--only", action="append", default=None, metavar="LABEL", help="only this setting (repeatable)")
    parser.add_argument("--speed", action="store_true", help="stock and the speed options (gating, collapse, DeepCache; UNet toy)")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--json", default=None, help="write the rows, config and settings here as JSON")
    args = parser.parse_args(argv)
    given = {k: v for k, v in (("steps", args.steps), ("guidance_scale", args.guidance_scale)) if v is not None}
    config = EvalConfig.for_kind(args.toy, n=args.n, seed=args.seed, **given)
    pipe = load_kind(args.toy, weights=args.weights, checkpoint=args.checkpoint)
    base = {"sd3": SD3_SETTINGS, "flux": FLUX_SETTINGS}.get(args.toy, DEFAULT_SETTINGS)
    settings = base[:1] if args.stock_only else base
    if args.only:
        unknown = sorted(set(args.only) - {Setting(*b).label for b in base})
        if unknown:
            parser.error(f"unknown setting(s) {unknown}; the settings are: {[Setting(*b).label for b in base]}")
        settings = tuple(b for b in base if Setting(*b).label in args.only)
    if args.speed:
        if args.toy != "unet":
            parser.error("--speed is for the UNet toy (gating, collapse and DeepCache are UNet options)")
        settings = DEFAULT_SETTINGS[:1] + SPEED_SETTINGS
    start = time.perf_counter()
    sampler = "DPM-Solver++" if args.toy == "unet" else "flow-matching Euler"

    def write(rows: list[dict]) -> str:
        done = len(rows) == 2 * len(settings)
        header = (
            f"{args.toy} toy, n={config.n} prompts per object count, {config.steps} {sampler} steps, guidance "
            f"{config.guidance_scale}" + (" (ignored: no guidance embedding)" if args.toy == "flux" else "")
            + ("" if config.max_sequence_length is None else f", max_sequence_length {config.max_sequence_length}")
            + f", seed {config.seed}; {time.perf_counter() - start:.0f} s"
            + ("" if done else f" (partial: {len(rows)} of {2 * len(settings)} rows)") + "\n\n"
        )
        text = header + markdown_table(rows, kind=args.toy)
        if args.out:
            atomic_write_text(args.out, text)
        if args.json:
            record = dict(toy=args.toy, config=dataclasses.asdict(config), seconds=time.perf_counter() - start,
                          complete=done, settings=[Setting(*s)._asdict() for s in settings], rows=rows,
                          weights=args.weights, checkpoint=args.checkpoint)
            atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
        return text

    print(write(evaluate(pipe, config, settings=settings, on_row=write)))



if __name__ == "__main__":
    main()
