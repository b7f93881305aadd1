"""Token-pruning speed / memory / fidelity benchmark (support module of test_bench_tokenprune.py).

Runs every configuration on the same pipeline, seed and prompts, interleaved (the order rotates at
each repeat), and reports medians; peak memory is measured on the GPU with
``torch.cuda.max_memory_allocated`` and on the CPU in a child process per configuration (peak RSS).
Also a standalone script: ``python benchmarks/tokenprune_bench.py --help``. Building, installing a
configuration and timing one generation: unet_harness.py.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from unet_harness import TGATE, Config, build, decode, denoise, environment, psnr, read_prompts, sync

# the blog's table (claimed, 1024x1024 SD on an RTX 4080, 100 complex prompts)
BLOG = {"iter/s": (4.2, 5.8), "VRAM GB": (12.4, 9.1), "CLIP score": (0.312, 0.309)}


CONFIGS = [
    Config("stock", None),
    Config("prune t=0.1 w=0.2, no K/V reuse", dict(threshold=0.1, warmup=0.2, reuse_kv=False)),
    Config("prune t=0.1 w=0.2 (defaults)", dict(threshold=0.1, warmup=0.2)),
    Config("prune keep 50% w=0.2", dict(keep_ratio=0.5, warmup=0.2)),
    Config("prune + gate 0.4", dict(threshold=0.1, warmup=0.2, gate=0.4)),
    Config("prune + gate 0.4 + collapse", dict(threshold=0.1, warmup=0.2, gate=0.4), collapse=True),
    Config("prune + gate 0.2 + collapse", dict(threshold=0.1, warmup=0.1, gate=0.2), collapse=True),
    Config("gate 0.1 + collapse", dict(threshold=0.1, warmup=0.05, gate=0.1), collapse=True),
    Config("DeepCache N=3", None, deep_cache=dict(interval=3)),
    Config("prune + gate 0.2 + collapse + DeepCache N=2", dict(threshold=0.1, warmup=0.1, gate=0.2), collapse=True,
           deep_cache=dict(interval=2)),
    Config("prune + gate 0.2 + collapse + DeepCache N=3", dict(threshold=0.1, warmup=0.1, gate=0.2), collapse=True,
           deep_cache=dict(interval=3)),
]
# the rows of the long CPU runs (512 px): defaults, the speed options and their best combination
LARGE_RUN = ["prune t=0.1 w=0.2 (defaults)", "prune + gate 0.4 + collapse", "prune + gate 0.2 + collapse",
             "DeepCache N=3", "prune + gate 0.2 + collapse + DeepCache N=3"]


def cross_attention_share(pipe, prompt: str, steps: int, size: int, seed: int, originals) -> dict:
    """Measured share of the stock denoising loop spent inside cross-attention (attn2) layers, and
    the token-dependent share of it by FLOPs (K/V projections and the two attention matmuls)."""
    from tokenprune_diffusers.report import cross_attention_flops

    spent, flops = [], {"dep": 0.0, "all": 0.0}
    starts = {}
    device = pipe.unet.device

    def pre(m, args, kwargs):
        sync(device)
        starts[id(m)] = time.perf_counter()
        h, e = args[0], kwargs.get("encoder_hidden_states")
        if e is not None:
            n = h.shape[1] if h.ndim == 3 else h.shape[-1] * h.shape[-2]
            f = cross_attention_flops(h.shape[0], n, e.shape[1], getattr(m.to_q, "in_features", m.inner_dim),
                                      m.cross_attention_dim, m.inner_dim, m.out_dim)
            flops["dep"] += f["kv_proj"] + f["scores"] + f["weighting"]
            flops["all"] += sum(f.values())

    def post(m, args, out):
        sync(device)
        spent.append(time.perf_counter() - starts.pop(id(m)))

    handles = []
    for name, m in pipe.unet.named_modules():
        if name.endswith("attn2"):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post))
    try:
        total, _, _, _ = denoise(pipe, CONFIGS[0], prompt, steps, size, seed, originals)
    finally:
        for h in handles:
            h.remove()
    xattn = sum(spent) / total
    dep = flops["dep"] / flops["all"] if flops["all"] else 0.0
    return {"cross_attention_share": xattn, "token_dependent_flop_share_of_xattn": dep, "token_dependent_share": xattn * dep}


def unet_call_costs(pipe, size: int, repeats: int = 3) -> dict:
    """Median seconds of one UNet call: batch 2 (CFG), batch 1 (after guidance collapse) and a
    batch-1 call that reuses the deep features (DeepCache, depth 1); the bounds they imply."""
    from tokenprune_diffusers import apply_deep_cache, remove_deep_cache

    unet, device = pipe.unet, pipe.unet.device
    h = size // pipe.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, h, h, generator=g).to(device, unet.dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device, unet.dtype)

    def timed(batch: int, cached: bool) -> float:
        times = []
        for _ in range(repeats):
            cache = apply_deep_cache(unet, interval=2, num_steps=2) if cached else None
            with torch.inference_mode():
                if cached:
                    unet(x[:batch], 500, text[:batch])  # the full call that fills the cache
                sync(device)
                t0 = time.perf_counter()
                unet(x[:batch], 500, text[:batch])
                sync(device)
            times.append(time.perf_counter() - t0)
            if cache is not None:
                remove_deep_cache(unet)
        return statistics.median(times)

    b2, b1, cached = timed(2, False), timed(1, False), timed(1, True)
    return {"batch2_s": b2, "batch1_over_batch2": b1 / b2, "cached_batch1_over_batch2": cached / b2}


@dataclass
class Row:
    name: str
    seconds: list[float] = field(default_factory=list)
    psnr_db: list[float] = field(default_factory=list)
    latent_rel_l2: list[float] = field(default_factory=list)
    flops_saved: list[float] = field(default_factory=list)
    flops_saved_pruning: list[float] = field(default_factory=list)
    peak_mb: float | None = None


def run(model: str, size: int, steps: int, repeats: int, n_prompts: int, seed: int, device: str, dtype: torch.dtype,
        memory: bool, with_tgate: bool, progress=None, only: list[str] | None = None) -> dict:
    """Every configuration (or those named in ``only``; stock always), interleaved; see the module docstring."""
    known = {c.name for c in CONFIGS}
    unknown = sorted(set(only or ()) - known)
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; known: {sorted(known)}")
    pipe = build(model, device, dtype, seed)
    originals = pipe.unet.attn_processors
    configs = [c for c in CONFIGS if only is None or c.name in only or c.name == "stock"]
    if with_tgate:
        configs.append(TGATE)
    prompts = read_prompts(n_prompts)
    rows = {c.name: Row(c.name) for c in configs}
    ceiling = cross_attention_share(pipe, prompts[0], steps, size, seed, originals)  # also the warm-up run
    ceiling |= unet_call_costs(pipe, size, repeats=1 if model == "tiny" or size > 256 else 3)
    in_loop = {"stock_batch2": [], "gated_batch1": []}  # seconds of single UNet calls inside the timed loops
    plan = [(r, p) for r in range(repeats) for p in prompts]
    for k, (r, prompt) in enumerate(plan):
        order = configs[k % len(configs):] + configs[: k % len(configs)]  # rotate: no position bias
        reference = None
        results = {}
        for cfg in order:
            s, lat, rep, calls = denoise(pipe, cfg, prompt, steps, size, seed + k, originals)
            results[cfg.name] = (s, lat, rep)
            if cfg.name == "stock":
                in_loop["stock_batch2"] += [t for b, t in calls if b == 2]
            elif cfg.collapse and cfg.deep_cache is None:  # after the collapse: gated batch-1 calls
                in_loop["gated_batch1"] += [t for b, t in calls if b == 1]
            if progress:
                progress(f"[{k + 1}/{len(plan)}] {cfg.name}: {s:.2f} s")
        reference = results["stock"][1]
        ref_img = decode(pipe, reference)
        for name, (s, lat, rep) in results.items():
            row = rows[name]
            row.seconds.append(s)
            if r == 0:  # fidelity does not depend on the repeat
                row.latent_rel_l2.append(float((lat - reference).norm() / reference.norm()))
                row.psnr_db.append(psnr(decode(pipe, lat), ref_img) if name != "stock" else float("inf"))
                row.flops_saved.append(rep.flops_saved if rep is not None else 0.0)
                row.flops_saved_pruning.append(rep.savings()["pruning"] if rep is not None else 0.0)
    if in_loop["stock_batch2"] and in_loop["gated_batch1"]:
        ceiling["in_loop_gated_batch1_over_batch2"] = (statistics.median(in_loop["gated_batch1"])
                                                       / statistics.median(in_loop["stock_batch2"]))
    if memory:
        for cfg in configs:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                denoise(pipe, cfg, prompts[0], steps, size, seed, originals)
                rows[cfg.name].peak_mb = torch.cuda.max_memory_allocated() / 2**20
            else:  # peak memory does not depend on the number of steps, only on what each call computes
                rows[cfg.name].peak_mb = peak_memory(model, cfg, prompts[0], min(steps, 5), size, seed, device, dtype)
    return summarise(rows, ceiling, dict(model=model, size=size, steps=steps, repeats=repeats, prompts=len(prompts),
                                         seed=seed, device=device, dtype=str(dtype).replace("torch.", "")))


def peak_memory(model, cfg, prompt, steps, size, seed, device, dtype) -> float:
    """Peak memory (MB) of one generation of this configuration, isolated."""
    if device.startswith("cuda"):  # one pipeline in memory: the run()'s (weights counted, the same for all rows)
        raise RuntimeError("on CUDA, peak memory is measured inside run()")
    idx = (CONFIGS + [TGATE]).index(cfg)
    cmd = [sys.executable, str(Path(__file__)), "--child", str(idx), "--model", model, "--size", str(size),
           "--steps", str(steps), "--seed", str(seed), "--prompt", prompt]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def _child(idx: int, model: str, prompt: str, steps: int, size: int, seed: int) -> None:
    from peak_rss import peak_rss_mb, reset_peak_rss

    cfg = (CONFIGS + [TGATE])[idx]
    pipe = build(model, "cpu", torch.float32, seed)
    gc.collect()
    reset = reset_peak_rss()  # building the pipeline peaks higher than denoising: measure from here
    denoise(pipe, cfg, prompt, steps, size, seed, pipe.unet.attn_processors)
    print(json.dumps({"peak_mb": peak_rss_mb(reset), "denoising_only": reset}))


def memory_markdown(model: str, size: int, steps: int, peaks: dict[str, float]) -> str:
    stock = peaks["stock"]
    lines = [f"### Peak memory while denoising: {model}, {size}x{size}, {steps} steps, CPU float32", "",
             "One child process per configuration; the kernel's peak-RSS counter is reset after the pipeline is built, "
             "so the peak covers the denoising loop (weights resident, text encoding included, VAE decode excluded).", "",
             "| configuration | peak RSS MB | vs stock |", "| --- | ---: | ---: |"]
    for name, mb in peaks.items():
        lines.append(f"| {name} | {mb:.0f} | {mb - stock:+.0f} MB |")
    worst = max(peaks.items(), key=lambda kv: kv[1])
    lines += ["", f"Highest: {worst[0]} at {worst[1]:.0f} MB ({worst[1] - stock:+.0f} MB against stock)."]
    return "\n".join(lines) + "\n"


def summarise(rows: dict[str, Row], ceiling: dict, setup: dict) -> dict:
    stock = statistics.median(rows["stock"].seconds)
    table = []
    for row in rows.values():
        med = statistics.median(row.seconds)
        table.append({
            "config": row.name,
            "median_s": med,
            "iter_per_s": setup["steps"] / med,
            "speedup": stock / med,
            "psnr_db": statistics.median(row.psnr_db) if row.psnr_db else None,
            "latent_rel_l2": statistics.median(row.latent_rel_l2) if row.latent_rel_l2 else None,
            "xattn_flops_saved": statistics.median(row.flops_saved) if row.flops_saved else None,
            "xattn_flops_saved_by_pruning": statistics.median(row.flops_saved_pruning) if row.flops_saved_pruning else None,
            "peak_mb": row.peak_mb,
            "runs": len(row.seconds),
        })
    max_prune = 1 / (1 - ceiling["token_dependent_share"])
    return {"setup": setup, "ceiling": ceiling | {"max_pruning_speedup": max_prune}, "rows": table, "environment": environment()}


def _collapse_bound(r: float, gate_share: float = 0.0) -> float:
    """Speed-up bound of gating + collapse when a gated batch-1 call costs ``r`` of a batch-2 call
    and the first ``gate_share`` of the steps still run at batch 2."""
    return 1 / (gate_share + (1 - gate_share) * r)


def _in_loop_sentence(c: dict) -> str:
    r = c.get("in_loop_gated_batch1_over_batch2")
    if r is None:
        return ""
    return (f"Inside the timed loops a gated batch-1 call (after the collapse, cross-attention skipped) took "
            f"{100 * r:.0f}% of a stock batch-2 call (medians over every call), which bounds gating + collapse at "
            f"{_collapse_bound(r):.2f}x from the first step and {_collapse_bound(r, 0.1):.2f}x with the gate at 10% of the steps. ")


def to_markdown(result: dict, target: float | None = None) -> str:
    s, c = result["setup"], result["ceiling"]
    lines = [
        f"### Token pruning: {s['model']}, {s['size']}x{s['size']}, {s['steps']} steps, {s['device']} {s['dtype']}",
        "",
        f"{s['prompts']} prompt(s) x {s['repeats']} repeat(s), configurations interleaved, seed {s['seed']}; "
        f"environment: {json.dumps(result['environment'])}. Peak memory: one generation per configuration "
        "(on CPU a child process each, peak RSS of the denoising loop with the weights resident, the counter reset "
        "after building where /proc allows, at min(steps, 5) steps; on GPU "
        "torch.cuda.max_memory_allocated).",
        "",
        "| configuration | median s / image | iter/s | speedup | peak MB | PSNR vs stock (dB) | latent rel. L2 | xattn FLOPs saved: by pruning | in all |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        ps = "identical" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}"
        lines.append(f"| {r['config']} | {r['median_s']:.2f} | {r['iter_per_s']:.2f} | {r['speedup']:.2f}x | {peak} | {ps} "
                     f"| {r['latent_rel_l2']:.4f} | {100 * r['xattn_flops_saved_by_pruning']:.1f}% | {100 * r['xattn_flops_saved']:.1f}% |")
    prune = next((r for r in result["rows"] if r["config"].startswith("prune t=0.1 w=0.2 (defaults)")), None)
    achieved = ("; the default pruning was not run" if prune is None else
                f"; the default pruning achieved {prune['speedup']:.3f}x "
                f"({100 * (prune['speedup'] - 1) / max(c['max_pruning_speedup'] - 1, 1e-9):.0f}% of that ceiling)")
    lines += [
        "",
        "xattn FLOPs saved: the share of the stock cross-attention FLOPs removed by pruning alone, and in all (K/V reuse, "
        "gating, guidance collapse and the layers DeepCache skipped included, the scoring overhead subtracted); "
        "from the processor's report (`report.savings()`), pinned against torch's FLOP counter in the tests.",
        "",
        f"Ceiling: cross-attention took {100 * c['cross_attention_share']:.1f}% of the stock loop; its token-dependent "
        f"part (K/V projections and the two attention matmuls, by FLOPs: {100 * c['token_dependent_flop_share_of_xattn']:.0f}% "
        f"of it) {100 * c['token_dependent_share']:.1f}%. Removing every prompt token could speed the loop up by at most "
        f"{c['max_pruning_speedup']:.3f}x{achieved}.",
        "",
        f"Guidance collapse: one UNet call at batch 1 costs {100 * c['batch1_over_batch2']:.0f}% of a batch-2 (CFG) call "
        f"here, so gating + collapse from the very first step could give at most {_collapse_bound(c['batch1_over_batch2']):.2f}x; "
        f"with the gate at 10% of the steps at most {_collapse_bound(c['batch1_over_batch2'], 0.1):.2f}x (calls timed "
        "alone). " + _in_loop_sentence(c) + "A batch-1 call that reuses the deep features (DeepCache, depth 1) costs "
        f"{100 * c['cached_batch1_over_batch2']:.0f}% of a batch-2 call.",
        "",
        "CLIP score: not measured here (no pretrained CLIP weights on this machine; random-weight images have no content).",
    ]
    if prune is not None:
        lines += _blog_table(result["rows"][0], prune)
    if target is not None:
        lines += [""] + _target_lines(result["rows"], target)
    return "\n".join(lines) + "\n"


def _blog_table(st: dict, prune: dict) -> list[str]:
    """The blog's claimed table beside ours (stock and the default pruning)."""
    gain = prune["speedup"] - 1
    lines = [
        "",
        "The blog's table (claimed; 1024x1024 SD on an RTX 4080, 100 prompts) beside ours:",
        "",
        "| metric | blog stock | blog pruned | blog change | ours stock | ours pruned (defaults) | ours change |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines.append(f"| iter/s | 4.2 | 5.8 | +38% | {st['iter_per_s']:.3f} | {prune['iter_per_s']:.3f} | {100 * gain:+.1f}% |")
    if st["peak_mb"] is not None:
        lines.append(f"| peak memory | 12.4 GB | 9.1 GB | -26% | {st['peak_mb']:.0f} MB | {prune['peak_mb']:.0f} MB | "
                     f"{100 * (prune['peak_mb'] / st['peak_mb'] - 1):+.1f}% |")
    lines.append("| CLIP score | 0.312 | 0.309 | -0.003 | not measured | not measured | - |")
    return lines


def _target_lines(rows: list[dict], target: float) -> list[str]:
    """The issue's speed target against the best row of each pool that was run."""
    lines = []
    ours = [r for r in rows if not r["config"].startswith("T-GATE")]
    three = [r for r in ours if "DeepCache" not in r["config"]]
    for label, pool in (("reuse + gating + collapse", three), ("any of our options (DeepCache included)", ours)):
        if not pool:
            continue
        best = max(pool, key=lambda r: r["speedup"])
        verdict = "met" if best["speedup"] >= target else f"missed by {target - best['speedup']:.2f}x"
        psnr_txt = "identical" if best["psnr_db"] == float("inf") else f"PSNR {best['psnr_db']:.1f} dB"
        lines.append(f"Target >= {target}x with {label}: best {best['speedup']:.2f}x ({best['config']}, {psnr_txt}): {verdict}.")
    tg = next((r for r in rows if r["config"].startswith("T-GATE")), None)
    if tg is not None:
        lines.append(f"T-GATE (the reference to beat) in the same run: {tg['speedup']:.2f}x.")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15-random", help="'tiny', 'sd15-random' or a hub id / local path")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    ap.add_argument("--memory-only", action="store_true", help="CPU: only the peak memory of each configuration")
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help="run only this configuration (repeatable; stock always runs)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = ap.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.model, args.prompt, args.steps, args.size, args.seed)
        return 0
    if args.memory_only:
        configs = CONFIGS + ([TGATE] if importlib.util.find_spec("tgate") is not None and args.model != "tiny" else [])
        prompt = read_prompts(1)[0]
        peaks = {}
        for cfg in configs:
            peaks[cfg.name] = peak_memory(args.model, cfg, prompt, min(args.steps, 5), args.size, args.seed, "cpu", torch.float32)
            print(f"{cfg.name}: {peaks[cfg.name]:.0f} MB", flush=True)
        md = memory_markdown(args.model, args.size, min(args.steps, 5), peaks)
        print(md)
        if args.out:
            Path(args.out + "_memory.md").write_text(md)
            Path(args.out + "_memory.json").write_text(json.dumps({"peak_mb": peaks, "environment": environment()}, indent=1))
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    try:
        import tgate  # noqa: F401

        with_tgate = args.model != "tiny"
    except ImportError:
        with_tgate = False
    result = run(args.model, args.size, args.steps, args.repeats, args.prompts, args.seed, device, dtype,
                 memory=not args.no_memory, with_tgate=with_tgate, progress=lambda m: print(m, flush=True), only=args.only)
    md = to_markdown(result, target=1.9 if args.size == 256 and device == "cpu" else None)  # the setting
    print(md)
    if args.out:
        Path(args.out + ".md").write_text(md)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
