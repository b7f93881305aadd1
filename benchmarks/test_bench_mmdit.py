"""Token pruning on an MM-DiT (SD3-medium widths, random weights, reduced depth), measured.

    pytest benchmarks/test_bench_mmdit.py --benchmark -s        # 512 px, 20 steps, short and long prompt (CPU: long)
    pytest benchmarks/test_bench_mmdit.py --benchmark-smoke -s  # a tiny transformer, 64 px, 3 steps (CI)

Results: benchmarks/results/tokenprune_mmdit_sd3.md/json.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

import mmdit_bench as mb  # noqa: E402

LOOP_TARGET, CALL_TARGET = 1.20, 1.25  # issue targets, SD3-medium architecture, 512 px, short prompt, from pruning alone


def test_mmdit_pruning_speed(budget, results_dir):
    if budget == "smoke":
        results = [mb.run(mb.TINY, 64, 3, 1, mb.SHORT_PROMPT, progress=lambda s: None)]
        pairs = mb.call_pairs(mb.TINY, 64, 1)
    else:
        results = [mb.run(mb.SD3_MEDIUM, 512, 20, 2, prompt) for prompt in (mb.SHORT_PROMPT, mb.LONG_PROMPT)]
        pairs = mb.call_pairs(mb.SD3_MEDIUM, 512, 5)
    md = mb.to_markdown(results)
    md += (f"\nSingle calls, interleaved ({len(pairs['seconds']['full'])} pairs, {pairs['size']} px): full text "
           f"{pairs['text'][0]} positions {pairs['full_s']:.3f} s, kept {pairs['text'][1]} positions {pairs['kept_s']:.3f} s: "
           f"{pairs['call_speedup']:.2f}x.\n")
    short = results[0]
    if budget == "full":
        md += (f"\nTargets (short prompt, 512 px): loop >= {LOOP_TARGET}x: {short['loop_speedup']:.2f}x "
               f"({'met' if short['loop_speedup'] >= LOOP_TARGET else 'missed'}); pruned call >= {CALL_TARGET}x: "
               f"{short['call_speedup']:.2f}x ({'met' if short['call_speedup'] >= CALL_TARGET else 'missed'}).\n")
    print(md)
    (results_dir / "tokenprune_mmdit_sd3.md").write_text(md)
    (results_dir / "tokenprune_mmdit_sd3.json").write_text(json.dumps({"loops": results, "call_pairs": pairs}, indent=1))
    assert short["text_tokens"]["stock"] == 333 and max(short["text_tokens"]["kept_per_row"]) < 333
    assert short["full_calls_per_pruned_generation"] == (1 if budget == "smoke" else 4)
