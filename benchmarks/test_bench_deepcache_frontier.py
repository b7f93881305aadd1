"""UNet speed against the peers: our DeepCache (intervals, skip branches, schedules, with gating +
collapse), the `DeepCache` package and T-GATE when installed; one speed-fidelity frontier.

    pytest benchmarks/test_bench_deepcache_frontier.py --benchmark -s        # SD-1.5 architecture, random weights
    pytest benchmarks/test_bench_deepcache_frontier.py --benchmark-smoke -s  # tiny pipeline, seconds (CI)

Full budget: the presets row set (``deepcache_frontier.ROW_SETS["presets"]``: the library's presets,
the candidates, the peer at N=2, 3, 5 and T-GATE), 256 px, 20 DDIM steps, 3 repeats on CPU (512 px
fp16, 5 repeats on a GPU): the published run, ``python benchmarks/deepcache_frontier.py --rows presets
--out results/deepcache_frontier_cpu_sd15-random_256``. Results: benchmarks/results/deepcache_frontier_*.{md,json,png}. Install the peers with
``pip install DeepCache==0.1.1 tgate==1.0.0``; without them their rows are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

import deepcache_frontier as df  # noqa: E402


def _setting(budget: str, model: str | None) -> dict:
    if budget == "smoke":
        ours = [df.Ours(n, b) for n in (2, 3) for b in (0, 1)] + [df.Ours(3, schedule="nonuniform"), df.Ours(2, gate=0.2),
                                                                 df.Ours(2, 0, gate=0.4, start=0.5)]
        return dict(model="tiny", size=32, steps=4, repeats=1, ours=ours, peer=[(2, 0)])
    gpu = torch.cuda.is_available()
    return dict(model=model or "sd15-random", size=512 if gpu else 256, steps=20, repeats=5 if gpu else 3,
                **df.ROW_SETS["presets"]())


def test_deepcache_frontier(budget, results_dir, request):
    s = _setting(budget, request.config.getoption("--model"))
    peer, reason = df.peer_available(s["model"])
    tgate = budget == "full" and importlib.util.find_spec("tgate") is not None
    rows = df.rows_for(s["ours"], s["peer"] if peer else [], tgate)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stem = results_dir / f"deepcache_frontier_{device}_{s['model'].replace('/', '_')}_{s['size']}"
    partial = stem.with_name(stem.name + "_partial.json")  # the repeats done so far, in case the run is stopped
    result = df.run(s["model"], s["size"], s["steps"], s["repeats"], rows, device=device,
                    dtype=torch.float16 if device == "cuda" else torch.float32, progress=print,
                    on_repeat=lambda r: partial.write_text(json.dumps(r, indent=1, default=str)))
    partial.unlink(missing_ok=True)
    md = df.to_markdown(result, [reason] if reason else [])
    print(md)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    png = df.plot(result, stem.with_suffix(".png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = {r["row"]: r for r in result["rows"]}
    assert len(table) == len(rows) and all(r["runs"] == s["repeats"] for r in table.values())
    assert table["stock"]["speedup"] == 1.0 and table["stock"]["latent_psnr_db"] == math.inf
    ours = [r for r in result["rows"] if r["group"] == "ours"]
    assert all(math.isfinite(r["latent_psnr_db"]) and math.isfinite(r["image_psnr_db"]) for r in ours)  # approximate
    # near stock, far above the ~8-21 dB of unrelated trajectories (what DDIM's clip_sample=True gave every row)
    assert result["setup"]["clip_sample"] is False and min(r["latent_psnr_db"] for r in ours) > 30
    assert any(r["group"] == "DeepCache pkg" for r in result["rows"]) == peer
    assert (reason is None) == peer and (reason is None or f"Skipped: {reason}." in md)
    front = df.frontier(result["rows"])
    assert table["stock"] in front and all(r["row"] in md for r in result["rows"])


def test_the_presets_row_set_runs_every_preset_and_the_toy_the_same_rows(budget):
    """``--rows presets`` (the 256 px run): one row per preset of the library, read from it, plus the
    candidates; the toy's adherence rows (toy_unet_presets.py) are the same configurations."""
    import toy_unet_presets as toy

    from tokenprune_diffusers.presets import PRESETS

    chosen = df.ROW_SETS["presets"]()
    by_label = {o.label: o for o in chosen["ours"] if o.label}
    assert set(by_label) == {f"preset {name}" for name in PRESETS}
    for name, p in PRESETS.items():
        o = by_label[f"preset {name}"]
        assert (o.interval, o.branch, o.schedule, o.gate, o.start) == (p.cache.interval, p.cache.branch, p.cache.schedule,
                                                                        p.prune.gate, p.cache.start)
        assert o.row().config.options == dict(threshold=p.prune.threshold, warmup=p.prune.warmup, gate=p.prune.gate)
    assert all(c in chosen["ours"] for c in df.CANDIDATES) and chosen["peer"] == df.FULL["peer"]
    settings = {s.label: s for s in toy.settings()}
    for o in chosen["ours"]:
        row = o.row()
        s = settings[row.name.removeprefix("ours ")]
        assert (s.prune, s.collapse, s.deep_cache) == (row.config.options, row.config.collapse, row.config.deep_cache)
    peers = [s.label for s in settings.values() if "peer" in s.label]
    assert peers == [toy.peer_setting(n).label for n, b in chosen["peer"]] and all(b == 0 for _, b in chosen["peer"])
    late = df.ROW_SETS["late-gate"]()  # the late-gate run: the toy runs the same rows, no T-GATE in the frontier
    assert late["tgate"] is False and all(o.gate == 0.5 for o in late["ours"])
    assert [s.label for s in toy.settings("late-gate")] == (
        ["stock"] + [toy.peer_setting(n).label for n, _ in late["peer"]] + [o.row().name.removeprefix("ours ") for o in late["ours"]])
    with pytest.raises(SystemExit):
        df.main(["--rows", "nope"])
