"""ProtoNet vs CCD on Omniglot: same Conv-4 backbone, budget, seeds and evaluation episodes.

    pytest benchmarks/test_fewshot_omniglot.py --benchmark -s         # full budget: 3,000 60-way
                                                                       # 1-shot episodes per model
    pytest benchmarks/test_fewshot_omniglot.py --benchmark-smoke -s   # tiny budget, < 1 minute
    FEWSHOT_CCD_BENCH_STEPS=400 pytest benchmarks/... --benchmark -s  # reduced training budget
    FEWSHOT_CCD_BENCH_DISTANCE=euclidean_unsquared pytest ...          # easyfsl's distance for both

Each model trains in its own single-threaded subprocess (``fewshot_bench.run_side_by_side``); the
two run side by side, so both see the same machine load and the peak resident memory of each is its
own.  Step time is also measured in this process with
the two models interleaved on identical episodes, which cancels most of the load of a shared
machine.  Results: ``benchmarks/results/fewshot_omniglot[_smoke].{md,json,png}``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch
from fewshot_bench import CLAIMED_BLOG, METHODS, budget_line, run_side_by_side
from fewshot_bench import fmt as _fmt

# Reference figures as cited in the issue (not re-checked: no web access on this machine).
REFERENCE_ISSUE = {
    "easyfsl ProtoNet, same budget (issue's measurement)": {
        "5way1shot": 98.39, "5way5shot": 99.59, "20way1shot": 94.72, "20way5shot": 98.49, "lake_error": 6.3},
    "Snell et al. 2017 ProtoNet 20-way 1-shot": {"20way1shot": 96.0},
    "Lake et al. 2015 humans (20 runs error %)": {"lake_error": 4.5},
    "Lake et al. 2015 BPL (20 runs error %)": {"lake_error": 3.3},
    "2019 progress report, ProtoNet 'around' (20 runs error %)": {"lake_error": 13.7},
}
SETTINGS = ("5way1shot", "5way5shot", "20way1shot", "20way5shot")
DISTANCES = ("euclidean", "euclidean_unsquared")  # squared (Snell et al.) | unsquared (easyfsl)


def _budget(budget: str) -> dict:
    if budget == "smoke":
        b = {"name": "smoke", "steps": 3, "n_way": 10, "eval_episodes": 20, "timing_rounds": 2, "max_classes": 30}
    else:
        b = {"name": "full", "steps": 3000, "n_way": 60, "eval_episodes": 1000, "timing_rounds": 20,
             "max_classes": None}
        if os.environ.get("FEWSHOT_CCD_BENCH_STEPS"):
            b["steps"] = int(os.environ["FEWSHOT_CCD_BENCH_STEPS"])
            b["name"] = f"reduced ({b['steps']} steps)"
        if os.environ.get("FEWSHOT_CCD_BENCH_EVAL_EPISODES"):
            b["eval_episodes"] = int(os.environ["FEWSHOT_CCD_BENCH_EVAL_EPISODES"])
    b.update(n_shot=1, n_query=5, seed=0, eval_seed=2024, eval_query=15, threads=1)
    b["distance"] = os.environ.get("FEWSHOT_CCD_BENCH_DISTANCE", "euclidean")
    if b["distance"] not in DISTANCES:
        raise ValueError(f"FEWSHOT_CCD_BENCH_DISTANCE must be one of {DISTANCES}, got {b['distance']!r}")
    return b


def _interleaved_step_ms(b: dict, data_root: Path) -> dict:
    """Median training-step time of both models, alternating on the same episodes in this process."""
    from fewshot_ccd.data import EpisodeCollate, EpisodeSampler, OmniglotDataset
    from fewshot_ccd.models import build_model

    torch.set_num_threads(b["threads"])
    data = OmniglotDataset(data_root, split="background", rotations=True, max_classes=b["max_classes"])
    sampler = EpisodeSampler(data.labels, n_way=b["n_way"], n_shot=b["n_shot"], n_query=b["n_query"],
                             episodes=b["timing_rounds"] + 2, seed=123)
    collate = EpisodeCollate(b["n_way"], b["n_shot"], b["n_query"])
    models = {m: build_model(m, seed=b["seed"], distance=b["distance"]).to(memory_format=torch.channels_last) for m in METHODS}
    opts = {m: torch.optim.Adam(models[m].parameters(), lr=1e-3) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    saved_mb: dict[str, float] = {}
    for i, indices in enumerate(sampler):
        support, s_labels, query, q_labels = collate([data[j] for j in indices])
        support = support.contiguous(memory_format=torch.channels_last)  # as in meta_train here
        query = query.contiguous(memory_format=torch.channels_last)
        for m in METHODS if i % 2 == 0 else METHODS[::-1]:
            sizes: list[int] = []

            def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
                sizes.append(t.numel() * t.element_size())
                return t

            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = models[m].episode_loss(support, s_labels, query, q_labels)
            loss.backward()
            opts[m].step()
            opts[m].zero_grad(set_to_none=True)
            if i >= 2:  # two warm-up episodes
                times[m].append(1000.0 * (time.perf_counter() - t0))
            saved_mb[m] = sum(sizes) / 2**20
    median = {m: statistics.median(times[m]) for m in METHODS}
    return {"median_ms": median, "ratio_ccd_over_protonet": median["ccd"] / median["protonet"],
            "rounds": len(times["protonet"]), "autograd_saved_mb": saved_mb}


def _targets(res: dict, timing: dict) -> list[tuple[str, bool | None, str]]:
    p, c = res["protonet"], res["ccd"]
    ref = REFERENCE_ISSUE["easyfsl ProtoNet, same budget (issue's measurement)"]
    out = []
    gaps = [f"{s}: {p['accuracy'][s]['mean']:.2f} vs {ref[s]:.2f}" for s in SETTINGS]
    out.append(("ProtoNet matches the easyfsl reference (within 2 CIs)",
                all(abs(p["accuracy"][s]["mean"] - ref[s]) <= 2 * max(p["accuracy"][s]["ci95"], 0.23)
                    for s in SETTINGS), "; ".join(gaps)))
    for s in SETTINGS:
        pa, ca = p["accuracy"][s], c["accuracy"][s]
        sep = ca["mean"] - pa["mean"] > pa["ci95"] + ca["ci95"]
        out.append((f"CCD beats ProtoNet beyond the CIs on {s}", sep, f"{_fmt(ca)} vs {_fmt(pa)}"))
    out.append(("CCD >= 96.0 on 20-way 1-shot", c["accuracy"]["20way1shot"]["mean"] >= 96.0,
                _fmt(c["accuracy"]["20way1shot"])))
    out.append(("CCD error < 4.5% on Lake's 20 runs", c["lake_runs"]["error"] < 4.5,
                f"{c['lake_runs']['error']:.2f}% (ProtoNet {p['lake_runs']['error']:.2f}%)"))
    r = timing["ratio_ccd_over_protonet"]
    out.append(("CCD step time within 10% of ProtoNet's (interleaved)", r <= 1.10, f"ratio {r:.3f}"))
    return out


def _markdown(b: dict, res: dict, timing: dict, targets: list, env: dict, command: str) -> str:
    p, c = res["protonet"], res["ccd"]
    lines = [
        "# Omniglot: ProtoNet vs CCD (measured)", "",
        f"Command: `{command}`  ",
        budget_line(b, res, "the background set with rotations", "the evaluation alphabets"),
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs (shared), torch threads {b['threads']}, "
        f"Python {env['python']}, torch {env['torch']}, {env['platform']}.", "",
        "| setting | ProtoNet | CCD | easyfsl ProtoNet (as cited in the issue) |",
        "| --- | --- | --- | --- |",
    ]
    ref = REFERENCE_ISSUE["easyfsl ProtoNet, same budget (issue's measurement)"]
    for s in SETTINGS:
        lines.append(f"| {s} acc % | {_fmt(p['accuracy'][s])} | {_fmt(c['accuracy'][s])} | {ref[s]:.2f} (3,000 ep.) |")
    lines.append(f"| Lake 20 runs error % | {p['lake_runs']['error']:.2f} ± {p['lake_runs']['ci95']:.2f} | "
                 f"{c['lake_runs']['error']:.2f} ± {c['lake_runs']['ci95']:.2f} | {ref['lake_error']:.1f} |")
    for label, key, fmt in (("training time s", "seconds", "{:.1f}"), ("episodes/s", "episodes_per_s", "{:.2f}"),
                            ("mean step ms (own process)", "step_ms", "{:.0f}"),
                            ("peak RSS MB (own process, incl. data)", "peak_memory_mb", "{:.0f}"),
                            ("final train acc % (last 10%)", "final_train_acc", "{:.1f}")):
        lines.append(f"| {label} | {fmt.format(p['train'][key])} | {fmt.format(c['train'][key])} | |")
    lines += [
        f"| median step ms (interleaved, {timing['rounds']} rounds) | {timing['median_ms']['protonet']:.0f} | "
        f"{timing['median_ms']['ccd']:.0f} | |",
        f"| autograd saved tensors MB / step | {timing['autograd_saved_mb']['protonet']:.1f} | "
        f"{timing['autograd_saved_mb']['ccd']:.1f} | |",
        f"| parameters | {p['parameters']:,} | {c['parameters']:,} | |", "",
        "## Targets (issue 5)", "", "| target | met | measured |", "| --- | --- | --- |",
    ]
    lines += [f"| {t} | {'yes' if ok else 'no'} | {m} |" for t, ok, m in targets]
    lines += ["", "## Reference figures (as cited in the issue; not re-checked, no web access)", ""]
    for k, v in REFERENCE_ISSUE.items():
        lines.append(f"- {k}: " + ", ".join(f"{s} {x}" for s, x in v.items()))
    lines += ["", "## The blog's table (claimed, mini-ImageNet; not reproduced here: no mini-ImageNet data)", "",
              "| table | method | claimed acc % | claimed cost |", "| --- | --- | --- | --- |"]
    lines += [f"| {t} | {m} | {a} (claimed) | {x} |" for t, m, a, x in CLAIMED_BLOG]
    return "\n".join(lines) + "\n"


def _plot(res: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.38
    for k, m in enumerate(METHODS):
        acc = res[m]["accuracy"]
        xs = [i + (k - 0.5) * width for i in range(len(SETTINGS))]
        ax1.bar(xs, [acc[s]["mean"] for s in SETTINGS], width, yerr=[acc[s]["ci95"] for s in SETTINGS],
                label=m, capsize=3)
        ax2.bar([k], [res[m]["lake_runs"]["error"]], yerr=[res[m]["lake_runs"]["ci95"]], capsize=3)
    ax1.set_xticks(range(len(SETTINGS)), SETTINGS)
    lo = min(res[m]["accuracy"][s]["mean"] for m in METHODS for s in SETTINGS)
    ax1.set_ylim(max(0.0, lo - 10), 100)
    ax1.set_ylabel("accuracy % (± 95% CI)")
    ax1.legend()
    ax1.set_title(title)
    ax2.axhline(4.5, color="gray", ls="--", lw=1, label="human 4.5% (as cited)")
    ax2.set_xticks([0, 1], METHODS)
    ax2.set_ylabel("Lake 20 runs error %")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@pytest.mark.benchmark
def test_omniglot_protonet_vs_ccd(budget: str, data_root: Path, results_dir: Path, tmp_path: Path) -> None:
    from fewshot_ccd.experiment import environment

    if not (data_root / "omniglot" / "images_background.npz").exists():
        pytest.skip(f"Omniglot not found under {data_root}/omniglot (pass --data-root)")
    b = _budget(budget)
    res = run_side_by_side(b, data_root, tmp_path)
    timing = _interleaved_step_ms(b, data_root)
    targets = _targets(res, timing)
    env = environment() | {"torch_threads": b["threads"]}
    suffix = ("" if b["distance"] == "euclidean" else f"_{b['distance']}") + ("" if budget == "full" else "_smoke")
    flag = "--benchmark" if budget == "full" else "--benchmark-smoke"
    prefix = f"FEWSHOT_CCD_BENCH_STEPS={b['steps']} " if b["name"].startswith("reduced") else ""
    if b["distance"] != "euclidean":
        prefix += f"FEWSHOT_CCD_BENCH_DISTANCE={b['distance']} "
    command = f"{prefix}pytest benchmarks/test_fewshot_omniglot.py {flag} -s"
    md = _markdown(b, res, timing, targets, env, command)
    print("\n" + md)
    (results_dir / f"fewshot_omniglot{suffix}.md").write_text(md)
    payload = {"budget": b, "command": command, "environment": env, "results": res, "timing": timing,
               "targets": [{"target": t, "met": ok, "measured": m} for t, ok, m in targets],
               "claimed_blog": CLAIMED_BLOG, "reference_as_cited_in_issue": REFERENCE_ISSUE}
    (results_dir / f"fewshot_omniglot{suffix}.json").write_text(json.dumps(payload, indent=2))
    _plot(res, results_dir / f"fewshot_omniglot{suffix}.png",
          f"Omniglot, Conv-4, {b['distance']}, {b['name']} budget")

    for m in METHODS:  # sanity: trained models are far above chance on every setting
        for s in SETTINGS:
            chance = 100.0 / int(s.split("way")[0])
            assert res[m]["accuracy"][s]["mean"] > chance + 10, (m, s, res[m]["accuracy"][s])
