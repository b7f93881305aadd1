"""Token pruning on MM-DiTs (SD3-medium and FLUX.1-dev widths, random weights, reduced depth), measured.

    pytest benchmarks/test_bench_mmdit.py --benchmark -s        # 512 px, 20 steps, short and long prompt (CPU: long)
    pytest benchmarks/test_bench_mmdit.py --benchmark-smoke -s  # tiny transformers, 64 px, 3 steps (CI)

Results: benchmarks/results/tokenprune_mmdit_{sd3,flux}.md/json.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

import mmdit_bench as mb  # noqa: E402

# issue targets at 512 px, short prompt, from pruning alone: (whole loop, each pruned call)
TARGETS = {"sd3": (1.20, 1.25), "flux": (1.35, 1.45)}
FULL_TEXT = {"sd3": 333, "flux": 512}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_mmdit_pruning_speed(family, budget, results_dir):
    full_cfg, tiny_cfg = mb.ARCHITECTURES[family], {"sd3": mb.TINY, "flux": mb.TINY_FLUX}[family]
    if budget == "smoke":
        results = [mb.run(tiny_cfg, 64, 3, 1, mb.SHORT_PROMPT, progress=lambda s: None, family=family)]
        pairs = mb.call_pairs(tiny_cfg, 64, 1, family=family)
    else:
        results = [mb.run(full_cfg, 512, 20, 2, prompt, family=family) for prompt in (mb.SHORT_PROMPT, mb.LONG_PROMPT)]
        pairs = mb.call_pairs(full_cfg, 512, 5, family=family)
    md = mb.to_markdown(results) + mb.pairs_markdown(pairs)
    short = results[0]
    if budget == "full":
        loop_target, call_target = TARGETS[family]
        md += (f"\nTargets (short prompt, 512 px): loop >= {loop_target}x: {short['loop_speedup']:.2f}x "
               f"({'met' if short['loop_speedup'] >= loop_target else 'missed'}); pruned call >= {call_target}x: "
               f"{short['call_speedup']:.2f}x ({'met' if short['call_speedup'] >= call_target else 'missed'}).\n")
    print(md)
    (results_dir / f"tokenprune_mmdit_{family}.md").write_text(md)
    (results_dir / f"tokenprune_mmdit_{family}.json").write_text(json.dumps({"loops": results, "call_pairs": pairs}, indent=1))
    assert short["text_tokens"]["stock"] == FULL_TEXT[family] and max(short["text_tokens"]["kept_per_row"]) < FULL_TEXT[family]
    assert short["full_calls_per_pruned_generation"] == (1 if budget == "smoke" else 4)
    assert pairs["flops"]["full"] > pairs["flops"]["kept"] > 0
