"""Token pruning, measured: speed, peak memory, the ceiling, fidelity; the blog's table beside ours.

    pytest benchmarks/test_bench_tokenprune.py --benchmark -s        # CPU: SD-1.5 architecture at 256 and 512 px
    pytest benchmarks/test_bench_tokenprune.py --benchmark-smoke -s  # tiny pipeline, 2 steps (CI)
    pytest benchmarks/test_bench_tokenprune.py --benchmark --model runwayml/stable-diffusion-v1-5   # real weights

On a GPU the full budget runs SD-1.5 at 512 px in fp16. Results: benchmarks/results/tokenprune_speed_*.md/json.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

import tokenprune_bench as tb  # noqa: E402

TARGET = 1.9  # issue target: reuse + gating + collapse vs stock, SD-1.5 architecture, CPU, 256 px, 20 steps


def _settings(budget: str, model: str | None):
    gpu = torch.cuda.is_available()
    if budget == "smoke":
        return [dict(model="tiny", size=32, steps=2, repeats=1, n_prompts=1, memory=False)]
    model = model or "sd15-random"
    if gpu:
        return [dict(model=model, size=512, steps=20, repeats=5, n_prompts=3, memory=True)]
    return [
        dict(model=model, size=256, steps=20, repeats=3, n_prompts=1, memory=True),
        dict(model=model, size=512, steps=20, repeats=1, n_prompts=1, memory=False, only=tb.LARGE_RUN),
    ]


def test_tokenprune_speed(budget, results_dir, request):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    try:
        import tgate  # noqa: F401

        with_tgate = budget == "full"
    except ImportError:
        with_tgate = False
    for s in _settings(budget, request.config.getoption("--model")):
        result = tb.run(s["model"], s["size"], s["steps"], s["repeats"], s["n_prompts"], 0, device, dtype,
                        memory=s["memory"], with_tgate=with_tgate, progress=print, only=s.get("only"))
        md = tb.to_markdown(result, target=TARGET if s["size"] == 256 and device == "cpu" else None)
        print(md)
        stem = results_dir / f"tokenprune_speed_{device}_{s['model'].replace('/', '_')}_{s['size']}"
        stem.with_suffix(".md").write_text(md)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        rows = {r["config"]: r for r in result["rows"]}
        # the measurement is sound: every configuration ran, stock is its own reference,
        # K/V reuse is exact (same latents with and without it), gating reports its savings
        expected = len(s["only"]) + 1 if s.get("only") else len(tb.CONFIGS)
        assert len(rows) == expected + with_tgate and all(r["runs"] >= 1 for r in rows.values())
        assert rows["stock"]["speedup"] == 1.0 and rows["stock"]["latent_rel_l2"] == 0.0
        if "prune t=0.1 w=0.2, no K/V reuse" in rows:
            assert rows["prune t=0.1 w=0.2, no K/V reuse"]["latent_rel_l2"] == rows["prune t=0.1 w=0.2 (defaults)"]["latent_rel_l2"]
        if "prune + gate 0.4" in rows:
            assert rows["prune + gate 0.4"]["xattn_flops_saved"] > 0.0
        assert result["ceiling"]["in_loop_gated_batch1_over_batch2"] > 0
        assert 0 < result["ceiling"]["cross_attention_share"] < 1
