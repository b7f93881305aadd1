"""Whole MM-DiT loops with a stock shadow: every transformer call of a configuration's generation
is paired with the stock transformer on the same inputs, timed seconds apart.

On a shared machine the speed of a call drifts by +-10-20% over minutes (other jobs' caches and
memory bandwidth, even in CPU seconds), so loops of different configurations timed minutes apart
disagree by as much as the effect measured. Here each call of the configuration (pruning, the
merge, a cache) and a stock call on the very inputs the pipeline gave it (the full text stream,
before pruning shortens it) run back to back, in alternating order, with an identical copy of the
stock transformer (same weights, stock processors, no hooks). The loop speed-up is then

    sum of the stock calls / sum of the configuration's calls

over every call of every loop: what the transformer calls of a generation cost against stock, with
the drift cancelled call by call. The rest of a loop (scheduler steps, the text encoders, run once)
is the same in both and is left out; `mmdit_bench.run` times whole loops, this pairs their calls.

    python benchmarks/mmdit_paired.py --family sd3 --size 512 --steps 20 --repeats 2
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics

import mmdit_bench as mb
import torch

# issue 14's targets at 512 px, short prompt, from pruning alone: (whole loop, each pruned call)
TARGETS = {"sd3": (1.20, 1.25), "flux": (1.35, 1.45)}


def _shadow(transformer, stock, calls: list, device: str):
    """Hooks on ``transformer`` that time each call and a ``stock`` call on its inputs, alternating
    which runs first; ``calls`` gets (text positions run, seconds, stock seconds) per call."""
    state = {"i": 0}

    def stock_call(args, kwargs) -> float:
        mb._sync(device)
        t0 = mb._clock()
        stock(*args, **kwargs)
        mb._sync(device)
        return mb._clock() - t0

    def pre(module, args, kwargs):
        state["inputs"] = (args, dict(kwargs))  # the full text stream: pruning shortens it inside forward
        state["stock"] = stock_call(*state["inputs"]) if state["i"] % 2 == 0 else None
        mb._sync(device)
        state["t"] = mb._clock()

    def text(module, args):
        state["n"] = int(args[0].shape[1])

    def post(module, args, kwargs, out):
        mb._sync(device)
        seconds = mb._clock() - state["t"]
        ref = state["stock"] if state["stock"] is not None else stock_call(*state["inputs"])
        calls.append((state["n"], seconds, ref))
        state["i"] += 1

    return [transformer.register_forward_pre_hook(pre, with_kwargs=True),
            transformer.register_forward_hook(post, with_kwargs=True),
            transformer.context_embedder.register_forward_pre_hook(text)]


def paired(transformer_cfg: dict, size: int, steps: int, repeats: int, prompt: str = mb.SHORT_PROMPT, seed: int = 0,
           family: str = "sd3", device: str = "cpu", dtype: torch.dtype = torch.float32,
           cache_threshold: float | None = None, progress=print) -> dict:
    """Every configuration but stock, ``repeats`` loops each (configurations alternated), each call
    paired with a stock call on its inputs."""
    clock = mb.use_clock(device)
    pipe = mb.PIPELINES[family](transformer_cfg, seed).to(device, dtype)
    stock = copy.deepcopy(pipe.transformer)  # same weights, stock processors, no hooks
    configs = [c for c in mb.configs_of(family, cache_threshold) if c != "stock"]
    calls: dict[str, list] = {c: [] for c in configs}
    for config in configs:  # warm-up, untimed
        mb._generate(pipe, family, config, prompt, min(2, steps), size, seed, device, cache_threshold)
    for r in range(repeats):
        for config in configs if r % 2 == 0 else configs[::-1]:
            handles = _shadow(pipe.transformer, stock, calls[config], device)
            mb._generate(pipe, family, config, prompt, steps, size, seed, device, cache_threshold)  # in inference mode
            for h in handles:
                h.remove()
            loop = calls[config][-steps:]
            progress(f"[{r + 1}/{repeats}] {config}: {sum(t for _, t, _ in loop):.2f} s, "
                     f"stock on its inputs {sum(s for _, _, s in loop):.2f} s")
    summary = {}
    for config, cs in calls.items():
        shortest = min(n for n, _, _ in cs)
        summary[config] = {
            "loop_speedup": sum(s for _, _, s in cs) / sum(t for _, t, _ in cs),
            "per_loop": [sum(s for _, _, s in cs[i:i + steps]) / sum(t for _, t, _ in cs[i:i + steps])
                         for i in range(0, len(cs), steps)],
            "text_positions": sorted({n for n, _, _ in cs}),
            "call_speedup_median": statistics.median(s / t for n, t, s in cs if n == shortest),
        }
    return {"setup": dict(family=family, size=size, steps=steps, repeats=repeats, prompt=prompt, seed=seed, device=device,
                          dtype=str(dtype), layers=transformer_cfg["num_layers"],
                          single_layers=transformer_cfg.get("num_single_layers", 0), clock=clock,
                          options=mb._options(pipe, family, prompt), cache_threshold=cache_threshold),
            "calls": calls, "summary": summary,
            "environment": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                            "threads": torch.get_num_threads()}}


def to_markdown(result: dict) -> str:
    s = result["setup"]
    blocks = f"{s['layers']}" + (f" + {s['single_layers']}" if s["single_layers"] else "")
    lines = [f"### Whole loops, each call paired with stock on its inputs: {s['family']}, {s['size']} px, {s['steps']} steps",
             "",
             f"{s['repeats']} loop(s) per configuration, alternated; {blocks} block(s); seconds: "
             f"{'CPU seconds of the process (one thread)' if s['clock'] == 'cpu' else 'wall clock'}. Loop speed-up = "
             "sum of the stock calls / sum of the configuration's calls (transformer calls only; the scheduler and the "
             "text encoders are the same in both).",
             "",
             "| config | text positions per call | loop speedup (calls) | per loop | median pruned-call speedup |",
             "| --- | --- | ---: | --- | ---: |"]
    for config, r in result["summary"].items():
        lines.append(f"| {config} | {', '.join(map(str, r['text_positions']))} | {r['loop_speedup']:.2f}x | "
                     f"{', '.join(f'{x:.2f}x' for x in r['per_loop'])} | {r['call_speedup_median']:.2f}x |")
    targets = TARGETS.get(s["family"]) if s["size"] == 512 and s["prompt"] == mb.SHORT_PROMPT else None
    if targets is not None and "pruned" in result["summary"]:
        pruned = result["summary"]["pruned"]
        verdicts = [f"{what} >= {target:.2f}x: {got:.2f}x ({'met' if got >= target else f'missed by {target - got:.2f}'})"
                    for what, target, got in zip(("loop", "pruned call (median)"), targets,
                                                 (pruned["loop_speedup"], pruned["call_speedup_median"]))]
        lines += ["", f"Targets (short prompt, 512 px, pruning alone): {'; '.join(verdicts)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=tuple(mb.ARCHITECTURES), default="sd3")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache-threshold", type=float, default=None, help="Flux: add FirstBlockCache rows")
    ap.add_argument("--out", default=None, help="write .json and .md with this path prefix")
    args = ap.parse_args(argv)
    result = paired(mb.ARCHITECTURES[args.family], args.size, args.steps, args.repeats, family=args.family,
                    cache_threshold=args.cache_threshold)
    md = to_markdown(result)
    print(md)
    mb.write_out(args.out, result, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
