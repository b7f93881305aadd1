"""Prompt adherence on the trained UNet toy of the speed presets and of the peer's algorithm
(the frontier's second fidelity axis, issue 18):

    python benchmarks/toy_unet_presets.py --n 100 --out benchmarks/results/toy_unet_presets

Rows: stock; each preset of ``tokenprune_diffusers.presets.PRESETS`` (gate + collapse + DeepCache);
DeepCache at interval 2 and 5, branch 0 alone: the ``DeepCache`` package's algorithm at its
default ``cache_branch_id=0`` (ours matches its images on SD layouts, tests/test_tokenprune_deepcache.py;
the package itself assumes SD's three skip branches per level, and the toy UNet has two levels of
one resnet, so it does not run there). T-GATE's package has no row here either (its pipeline
replaces the toy's). Protocol of ``tokenprune_diffusers.toy.evaluate`` (DPM-Solver++, the analytic
checker, seeded prompts); the table and JSON are rewritten after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from tokenprune_diffusers._atomic import atomic_write_text
from tokenprune_diffusers.presets import PRESETS
from tokenprune_diffusers.toy.evaluate import EvalConfig, Setting, evaluate, load_kind, markdown_table


def settings() -> list[Setting]:
    rows = [Setting("stock")]
    for name, p in PRESETS.items():
        c = p.cache
        rows.append(Setting(f"preset {name}", dict(threshold=p.prune.threshold, warmup=p.prune.warmup, gate=p.prune.gate),
                            collapse=True, deep_cache=dict(interval=c.interval, branch=c.branch, start=c.start)))
    rows += [Setting(f"DeepCache N={k} branch 0 (the peer's algorithm)", None, deep_cache=dict(interval=k, branch=0)) for k in (2, 5)]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="prompts per object count")
    ap.add_argument("--out", required=True, help="write <out>.md and <out>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows_of = settings()
    config = EvalConfig.for_kind("unet", n=args.n)
    pipe = load_kind("unet")
    t0 = time.perf_counter()

    def write(rows: list[dict]) -> None:
        head = (f"unet toy, n={args.n} prompts per object count, {config.steps} DPM-Solver++ steps, guidance "
                f"{config.guidance_scale}, seed {config.seed}, one thread; {time.perf_counter() - t0:.0f} s "
                f"({len(rows)} of {2 * len(rows_of)} rows)\n\n")
        atomic_write_text(args.out + ".md", head + markdown_table(rows))
        atomic_write_text(args.out + ".json", json.dumps(dict(config=dataclasses.asdict(config),
                                                              settings=[s._asdict() for s in rows_of], rows=rows), indent=1) + "\n")

    write(evaluate(pipe, config, settings=rows_of, progress=False, on_row=write))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
