"""Prompt adherence on the trained UNet toy of the speed presets, the frontier's candidates and the
peer's algorithm (the frontier's second fidelity axis, issue 18):

    python benchmarks/toy_unet_presets.py --n 200 --out benchmarks/results/toy_unet_presets
    python benchmarks/toy_unet_presets.py --n 200 --rows late-gate --out benchmarks/results/toy_unet_late_gate

Rows: stock; DeepCache at interval 2, 3 and 5, branch 0 alone: the ``DeepCache`` package's
algorithm at its default ``cache_branch_id=0`` (ours matches its images on SD layouts,
tests/test_tokenprune_deepcache.py; the package itself assumes SD's three skip branches per level,
and the toy UNet has two levels of one resnet, so it does not run there); then our rows of the
frontier's ``presets`` row set (``deepcache_frontier.ROW_SETS``: the presets of
``tokenprune_diffusers.presets`` and the candidates beside them). T-GATE's package has no row here
(its pipeline replaces the toy's). Protocol of ``tokenprune_diffusers.toy.evaluate`` (DPM-Solver++,
the analytic checker, seeded prompts: every row sees the same prompts and noise seeds, so each row's
all-correct share is compared with stock's paired by prompt, with the standard error of the paired
difference). The table and JSON are rewritten after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import deepcache_frontier as df
import torch

from tokenprune_diffusers._atomic import atomic_write_text
from tokenprune_diffusers.toy.evaluate import (
    EvalConfig,
    Setting,
    evaluate,
    load_kind,
    markdown_table,
    paired_difference,
)

# DeepCache alone at interval 3 (no gate): ungated, the toy's most faithful candidate at the peer's N=2
# point (not in the 256 px frontier run: it did not fit beside the rest); in the presets row set only
TOY_ONLY = [df.Ours(3, 2)]
WITHIN = 0.03  # the target: all-correct within 3 points of stock where the peer is


def setting_of(row: df.Row) -> Setting:
    """The toy's setting of one of our frontier rows (same gate, collapse and DeepCache options)."""
    c = row.config
    return Setting(row.name.removeprefix("ours "), c.options, collapse=c.collapse, deep_cache=c.deep_cache)


def peer_setting(interval: int) -> Setting:
    """The ``DeepCache`` package's algorithm at ``cache_interval`` and its default branch 0, run by ours."""
    return Setting(f"DeepCache N={interval} branch 0 (the peer's algorithm)", None,
                   deep_cache=dict(interval=interval, branch=0))


def settings(rows: str = "presets") -> list[Setting]:
    """The toy's rows for one of the frontier's row sets (``deepcache_frontier.ROW_SETS``): stock,
    the peer's algorithm at the row set's intervals and our rows of that set."""
    chosen = df.ROW_SETS[rows]()
    intervals = [n for n, _ in chosen["peer"]]
    if rows != "presets":
        return [Setting("stock"), *map(peer_setting, intervals), *(setting_of(o.row()) for o in chosen["ours"])]
    ours = chosen["ours"] + TOY_ONLY
    # the candidates aimed at the peer's N=2 point first (a later gate, DeepCache alone), then the presets
    ours = sorted(ours, key=lambda o: (o.gate is not None and o.gate < 0.5, o.label == "", o.interval))
    peers = dict(zip(intervals, map(peer_setting, intervals)))
    # stock and the peer's N=2 point first, its N=5 point last: the rows that decide the target first
    mine = [setting_of(o.row()) for o in ours]
    return [Setting("stock"), peers[2], *mine[:2], peers[3], *mine[2:], peers[5]]


def paired_table(rows: list[dict]) -> str:
    """Each row's all-correct share minus stock's, paired by prompt, with its standard error."""
    stock = {r["objects"]: r for r in rows if r["setting"] == "stock"}
    lines = ["| setting | objects | all correct | minus stock (paired) | standard error | within 3 points of stock |",
             "| --- | ---: | ---: | ---: | ---: | :---: |"]
    for r in rows:
        ref = stock.get(r["objects"])
        if ref is None or r is ref:
            continue
        d, se = paired_difference(r["all_per_image"], ref["all_per_image"])
        lines.append(f"| {r['setting']} | {r['objects']} | {100 * r['all']:.1f} | {100 * d:+.1f} | {100 * se:.1f} "
                     f"| {'yes' if d >= -WITHIN else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="prompts per object count")
    ap.add_argument("--out", required=True, help="write <out>.md and <out>.json")
    ap.add_argument("--rows", default="presets", choices=sorted(df.ROW_SETS),
                    help="the frontier's row set whose configurations to run (deepcache_frontier.ROW_SETS)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows_of = settings(args.rows)
    config = EvalConfig.for_kind("unet", n=args.n)
    pipe = load_kind("unet")
    t0 = time.perf_counter()

    def write(rows: list[dict]) -> None:
        head = (f"unet toy, n={args.n} prompts per object count, {config.steps} DPM-Solver++ steps, guidance "
                f"{config.guidance_scale}, seed {config.seed}, one thread; {time.perf_counter() - t0:.0f} s "
                f"({len(rows)} of {2 * len(rows_of)} rows)\n\n")
        paired = ("\nAll-correct against stock, paired by prompt and seed (points; the standard error is that of the "
                  "per-prompt differences):\n\n" + paired_table(rows))
        atomic_write_text(args.out + ".md", head + markdown_table(rows) + paired)
        atomic_write_text(args.out + ".json", json.dumps(dict(config=dataclasses.asdict(config),
                                                              settings=[s._asdict() for s in rows_of], rows=rows), indent=1) + "\n")

    write(evaluate(pipe, config, settings=rows_of, progress=False, on_row=write))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
