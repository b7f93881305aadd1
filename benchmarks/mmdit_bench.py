"""Token pruning on an MM-DiT, measured: SD3-medium-width and Flux-width transformers (random weights,
reduced depth) in their diffusers pipelines, stock vs pruning, interleaved.

- SD3: ``StableDiffusion3Pipeline`` with the T5 slot empty (77 CLIP + 256 zero positions), CFG batch 2.
- Flux: ``FluxPipeline`` with a T5-shaped text stream of 512 positions (the pipeline's default), no
  CFG (guidance-distilled, as FLUX.1-dev), batch 1.

Random weights attend almost uniformly, so their scores say nothing about which tokens matter; the
speed depends only on how many text positions are kept. The pruned rows therefore keep exactly the
prompt's own tokens (``top_k`` = the number of words, ``padding="drop"``): start, words and
end-of-text of every row, what the defaults' ``padding="drop"`` keeps. Which tokens the defaults keep
on trained weights is for the toy MM-DiT.

    python benchmarks/mmdit_bench.py --family sd3 --size 512 --steps 20 --repeats 3
    python benchmarks/mmdit_bench.py --family flux --size 512 --steps 20 --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# SD3-medium's published transformer widths (24 heads x 64 = 1536, T5 width 4096); depth reduced
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD3_MEDIUM_DEPTH = 24
TINY = dict(SD3_MEDIUM, num_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=16, pooled_projection_dim=64)
# FLUX.1-dev's published transformer widths (24 heads x 128 = 3072, T5 width 4096); depth reduced to
# 1 double-stream + 2 single-stream blocks, the 19 : 38 ratio of the full model
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_DEPTH = (19, 38)
TINY_FLUX = dict(FLUX_DEV, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                 axes_dims_rope=(4, 4, 8))
SHORT_PROMPT = "a photo of a cat wearing a red hat"
LONG_PROMPT = ("a detailed oil painting of an old lighthouse on a rocky cliff at sunset, waves crashing below, "
               "seagulls in an orange sky, warm light in the windows, dramatic clouds, highly detailed")


def sd3_pipeline(transformer_cfg: dict, seed: int = 0):
    """StableDiffusion3Pipeline around a seeded random transformer; tiny CLIP text encoders (they run
    once per generation, the same in every row), a tiny 16-channel VAE (latents are timed, not decoded)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tokenprune_diffusers.models import TINY_TEXT_CONFIG, assemble_sd3_pipeline

    half = transformer_cfg["pooled_projection_dim"] // 2
    text_cfg = CLIPTextConfig(**{**TINY_TEXT_CONFIG, "projection_dim": half, "hidden_act": "gelu"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**transformer_cfg).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False).eval()
        encoders = [CLIPTextModelWithProjection(text_cfg).eval() for _ in range(2)]
    pipe = assemble_sd3_pipeline(transformer, vae, encoders[0], encoders[1], FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipeline(transformer_cfg: dict, seed: int = 0):
    """FluxPipeline around a seeded random transformer; a one-layer CLIP text encoder (pooled prompt)
    and a one-layer T5-shaped encoder at the transformer's text width (they run once per generation,
    the same in every row), a tiny 16-channel VAE (latents are timed, not decoded)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tokenprune_diffusers.models import TINY_T5_CONFIG, TINY_TEXT_CONFIG, t5_shaped_tokenizer
    from tokenprune_diffusers.tokenizer import load_clip_tokenizer

    tokenizer_2 = t5_shaped_tokenizer()
    width = transformer_cfg["joint_attention_dim"]
    clip_cfg = CLIPTextConfig(**{**TINY_TEXT_CONFIG, "hidden_size": transformer_cfg["pooled_projection_dim"], "num_hidden_layers": 1})
    t5_cfg = T5Config(vocab_size=len(tokenizer_2), **{**TINY_T5_CONFIG, "d_model": width, "num_layers": 1, "num_heads": 1})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**transformer_cfg).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                            shift_factor=0.1159, scaling_factor=0.3611).eval()
        clip, t5 = CLIPTextModel(clip_cfg).eval(), T5EncoderModel(t5_cfg).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip,
                        tokenizer=load_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINES = {"sd3": sd3_pipeline, "flux": flux_pipeline}


def _prompt_tokens(pipe, family: str, prompt: str) -> int:
    """Positions the pruned rows keep in the text stream: the prompt's words and its special tokens."""
    if family == "flux":
        return len(pipe.tokenizer_2(prompt).input_ids)  # words + </s>
    return len(pipe.tokenizer(prompt).input_ids)  # <start> + words + <end>


def _call_timer(transformer, calls: list, device: str = "cpu"):
    """(text length, seconds) of every transformer call, measured inside the loop (the length as the
    blocks see it: the context embedder's input, after pruning shortened it)."""
    state = {}

    def pre(module, args, kwargs):
        _sync(device)
        state["t"] = _clock()

    def text(module, args):
        state["n"] = int(args[0].shape[1])

    def post(module, args, kwargs, out):
        _sync(device)
        calls.append((state["n"], _clock() - state["t"]))

    return [transformer.register_forward_pre_hook(pre, with_kwargs=True), transformer.register_forward_hook(post, with_kwargs=True),
            transformer.context_embedder.register_forward_pre_hook(text)]


def _clock() -> float:
    """Seconds: the process's CPU time on a single-threaded CPU run (what the work costs, whatever
    else the machine runs: interleaved rows on a shared machine stay comparable), else wall time."""
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


def use_clock(device: str) -> str:
    """Pick the clock of this run: "cpu" on a CPU with one torch thread, else "wall"."""
    global CLOCK
    CLOCK = "cpu" if device == "cpu" and torch.get_num_threads() == 1 else "wall"
    return CLOCK


CLOCK = "wall"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _options(pipe, family: str, prompt: str) -> dict[str, dict]:
    """Token-pruning options of each configuration but stock and the cache alone (``defaults``: the
    library's, whose kept set on random weights says nothing; ``defaults, no maps``: the same without
    the heat maps; for the memory rows)."""
    n_words = _prompt_tokens(pipe, family, prompt) - (1 if family == "flux" else 2)
    pruned = dict(top_k=n_words, padding="drop", warmup=0.2)
    return {"merged": dict(warmup=1.0), "pruned": pruned, "pruned+fbc": pruned, "defaults": {},
            "defaults, no maps": dict(record_maps=False)}


def _generate(pipe, family: str, config: str, prompt: str, steps: int, size: int, seed: int = 0, device: str = "cpu",
              cache_threshold: float | None = None) -> tuple[float, object, int]:
    """One generation of ``config``: (seconds, the pruning report or None, calls that ran every block)."""
    from tokenprune_diffusers import apply_token_pruning, remove_token_pruning

    options = _options(pipe, family, prompt)
    proc = apply_token_pruning(pipe, **options[config]) if config in options else None
    if config.endswith("fbc"):
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=cache_threshold))
    ran = []  # calls that ran the last block (not served from the cache)
    last_block = (getattr(pipe.transformer, "single_transformer_blocks", None) or pipe.transformer.transformer_blocks)[-1]
    handle = last_block.register_forward_hook(lambda *a: ran.append(1))
    guidance = 3.5 if family == "flux" else 7.0  # Flux: the distilled guidance embedding, one row
    g = torch.Generator(device).manual_seed(seed)
    try:
        _sync(device)
        t0 = _clock()
        with torch.inference_mode():
            pipe(prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=guidance, generator=g,
                 output_type="latent")
        _sync(device)
        seconds = _clock() - t0
    finally:
        handle.remove()
        if config.endswith("fbc"):
            pipe.transformer.disable_cache()
        remove_token_pruning(pipe)
    return seconds, proc.report if proc is not None else None, len(ran)


def _x(ratio: float | None) -> str:
    return "not recorded" if ratio is None else f"{ratio:.2f}x"


def _calls_ratio(stock: list, other: list, steps: int) -> float | None:
    """What the transformer calls alone make of the loop speed-up: the sum over the call indices of
    stock's median call over the sum of the other configuration's (each index's median over loops)."""
    if len(stock) % steps or len(other) % steps or not stock or not other:
        return None

    def per_index(calls):
        return [statistics.median(t for j, (_, t) in enumerate(calls) if j % steps == i) for i in range(steps)]

    return sum(per_index(stock)) / sum(per_index(other))


def _scoring_overhead(calls: list, steps: int, warm: int | None) -> float | None:
    """Median scored warm-up call over the median pruned call, where both ran the same text length
    (``padding="drop"`` leaves the padding out of the warm-up too): what scoring adds to a call."""
    if not warm or len(calls) % steps:
        return None
    loops = [calls[i:i + steps] for i in range(0, len(calls), steps)]
    scored = [t for loop in loops for n, t in loop[:warm] if n == loop[-1][0]]
    plain = [t for loop in loops for _, t in loop[warm:]]
    return statistics.median(scored) / statistics.median(plain) - 1 if scored and plain else None


def configs_of(family: str, cache_threshold: float | None = None) -> tuple[str, ...]:
    configs = ("stock", "merged", "pruned") if family == "sd3" else ("stock", "pruned")
    return configs + (("fbc", "pruned+fbc") if cache_threshold is not None else ())


def run(transformer_cfg: dict, size: int, steps: int, repeats: int, prompt: str, seed: int = 0, progress=print,
        family: str = "sd3", device: str = "cpu", dtype: torch.dtype = torch.float32,
        cache_threshold: float | None = None) -> dict:
    """Whole denoising loops, interleaved: stock; on SD3 the exact zero merge alone (``warmup=1``:
    nothing pruned); pruning (with the merge on SD3 during the warm-up); with ``cache_threshold``
    (Flux), diffusers' FirstBlockCache alone and with pruning. Medians; what each mechanism saved
    is the ratio of consecutive rows."""
    clock = use_clock(device)
    pipe = PIPELINES[family](transformer_cfg, seed).to(device, dtype)
    configs = configs_of(family, cache_threshold)
    if cache_threshold is not None and not hasattr(pipe.transformer, "enable_cache"):
        raise ValueError(f"{type(pipe.transformer).__name__} has no enable_cache in this diffusers: no FirstBlockCache rows")
    options = _options(pipe, family, prompt)
    reports, computed = {}, {c: [] for c in configs}

    def generate(config: str, n_steps: int = steps) -> float:
        seconds, report, ran = _generate(pipe, family, config, prompt, n_steps, size, seed, device, cache_threshold)
        computed[config].append(ran)
        if report is not None:
            reports[config] = report
        return seconds

    for config in configs:  # warm-up, untimed: 2 steps (one full call, one pruned)
        generate(config, min(2, steps))
        computed[config].clear()
    seconds: dict[str, list] = {c: [] for c in configs}
    calls: dict[str, list] = {c: [] for c in configs}
    for r in range(repeats):
        for config in configs if r % 2 == 0 else configs[::-1]:
            handles = _call_timer(pipe.transformer, calls[config], device)
            seconds[config].append(generate(config))
            for h in handles:
                h.remove()
            progress(f"[{r + 1}/{repeats}] {config}: {seconds[config][-1]:.2f} s")
    lengths = {c: sorted({n for n, _ in calls[c]}) for c in configs}  # text positions the blocks saw
    call_s = {c: statistics.median(t for n, t in calls[c] if n == lengths[c][0]) for c in configs}
    loop_s = {c: statistics.median(seconds[c]) for c in configs}
    warm = reports["pruned"].prune_start
    per_call = call_s["stock"] / call_s["pruned"]
    return {
        "setup": dict(family=family, size=size, steps=steps, repeats=repeats, prompt=prompt, seed=seed, device=device,
                      dtype=str(dtype), layers=transformer_cfg["num_layers"], single_layers=transformer_cfg.get("num_single_layers", 0),
                      widths={k: transformer_cfg[k] for k in ("num_attention_heads", "attention_head_dim", "joint_attention_dim")},
                      image_tokens=(size // 16) ** 2, batch=1 if family == "flux" else 2, options=options, clock=clock),
        "text_tokens": {"stock": lengths["stock"][-1], "per_config": lengths,
                        "kept_per_row": reports["pruned"].steps[-1].kept_counts},
        "loop_seconds": seconds,
        "loop_median_s": loop_s,
        "loop_speedup": loop_s["stock"] / loop_s["pruned"],
        "loop_speedup_merge_only": loop_s["stock"] / loop_s["merged"] if "merged" in loop_s else None,
        "call_seconds": call_s,
        "calls": calls,  # every timed call: (text positions, seconds), loop after loop, in call order
        "scoring_overhead": _scoring_overhead(calls["pruned"], steps, warm),
        "call_speedup": per_call,
        "full_calls_per_pruned_generation": warm,
        "computed_calls": computed,  # per timed loop: calls that ran every block (FirstBlockCache serves the others)
        "cache_threshold": cache_threshold,
        "loop_bound_from_calls": _calls_ratio(calls["stock"], calls["pruned"], steps),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "threads": torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None},
    }


def call_pairs(transformer_cfg: dict, size: int, pairs: int, prompt: str = SHORT_PROMPT, seed: int = 0,
               family: str = "sd3", device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """One transformer call with the full text stream vs one with the prompt's tokens only (padded
    rows masked, as a pruned call runs) and, on SD3, one with the 256 zero positions merged into one
    (as every call runs with ``merge_zeros``), alternated ``pairs`` times: the per-call ratios,
    robust to a machine whose load drifts over minutes (medians of interleaved single calls)."""
    from tokenprune_diffusers import apply_token_pruning, remove_token_pruning

    clock = use_clock(device)
    pipe = PIPELINES[family](transformer_cfg, seed)
    n = _prompt_tokens(pipe, family, prompt)
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        if family == "flux":
            text, pooled, txt_ids = pipe.encode_prompt(prompt, None)  # (1, 512, D)
            keep = [torch.arange(n)]
            latents = torch.randn(1, (size // 16) ** 2, transformer_cfg["in_channels"], generator=g)
            h = size // 16
            img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(h)), indexing="ij"), -1).reshape(-1, 3)
            extra_inputs = dict(img_ids=img_ids, guidance=torch.full((1,), 3.5))
        else:
            embeds, neg, pos_pooled, neg_pooled = pipe.encode_prompt(prompt, prompt, None, do_classifier_free_guidance=True)
            text, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pos_pooled])  # (2, 333, D), negatives first
            keep = [torch.arange(2), torch.arange(n)]  # the empty negative prompt: start, end; the prompt: its tokens
            latents = torch.randn(2, transformer_cfg["in_channels"], size // 8, size // 8, generator=g)
            extra_inputs = {}
    rows = text.shape[0]
    t = torch.full((rows,), 0.5 if family == "flux" else 500.0)
    index = torch.stack([torch.cat([k, k[-1:].expand(n - len(k))]) for k in keep])  # (B, K), padded
    valid = torch.stack([torch.arange(n) < len(k) for k in keep])
    short = text.gather(1, index[..., None].expand(-1, -1, text.shape[-1]))
    inputs = {"full": dict(encoder_hidden_states=text, joint_attention_kwargs=None),
              "kept": dict(encoder_hidden_states=short, joint_attention_kwargs=None if bool(valid.all()) else {"text_key_bias": torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))})}
    if family == "flux":
        inputs["full"]["txt_ids"], inputs["kept"]["txt_ids"] = txt_ids, txt_ids[:n]
    else:  # 77 CLIP positions + the 256 zero T5 positions as one, log(256) on its logit
        clip = pipe.tokenizer.model_max_length
        merge_bias = torch.zeros(rows, clip + 1)
        merge_bias[:, -1] = math.log(text.shape[1] - clip)
        inputs["merged"] = dict(encoder_hidden_states=text[:, : clip + 1], joint_attention_kwargs={"text_key_bias": merge_bias})
    pipe.to(device, dtype)
    latents, pooled, t = latents.to(device, dtype), pooled.to(device, dtype), t.to(device, dtype)
    extra_inputs = {k: v.to(device, dtype) for k, v in extra_inputs.items()}
    for x in inputs.values():
        x["encoder_hidden_states"] = x["encoder_hidden_states"].to(device, dtype)
        if "txt_ids" in x:
            x["txt_ids"] = x["txt_ids"].to(device, dtype)
        if x["joint_attention_kwargs"]:
            x["joint_attention_kwargs"] = {"text_key_bias": x["joint_attention_kwargs"]["text_key_bias"].to(device)}
    apply_token_pruning(pipe, threshold=0.0)  # the pruning processors (no plan outside a generation: no scoring)
    times = {name: [] for name in inputs}
    flops = {}
    with torch.inference_mode():
        for name in inputs:  # counted once each, untimed (the ceiling of the ratio)
            with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # math: attention counted
                pipe.transformer(hidden_states=latents, timestep=t, pooled_projections=pooled, return_dict=False,
                                 **inputs[name], **extra_inputs)
            flops[name] = counter.get_total_flops()
        for i in range(pairs + 1):  # pair 0 warms up
            for name in list(inputs) if i % 2 == 0 else list(inputs)[::-1]:
                _sync(device)
                t0 = _clock()
                pipe.transformer(hidden_states=latents, timestep=t, pooled_projections=pooled, return_dict=False,
                                 **inputs[name], **extra_inputs)
                _sync(device)
                if i:
                    times[name].append(_clock() - t0)
    remove_token_pruning(pipe)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"family": family, "size": size, "layers": transformer_cfg["num_layers"], "device": device, "dtype": str(dtype), "clock": clock,
            "text": {name: int(x["encoder_hidden_states"].shape[1]) for name, x in inputs.items()},
            "seconds": times, "median_s": med, "speedup": {name: med["full"] / m for name, m in med.items()}, "flops": flops}


def peak_memory(family: str, size: int, steps: int = 2, prompt: str = SHORT_PROMPT, seed: int = 0,
                architecture: str | None = None, cache_threshold: float | None = None) -> dict[str, float]:
    """Peak resident memory (MB) of one generation per configuration, each in a child process of its
    own, the kernel's peak-RSS counter reset after the pipeline is built (CPU, float32). With 2 steps
    and warm-up 0.2 a pruned generation runs one full (scored) call and one pruned call."""
    peaks = {}
    for config in configs_of(family, cache_threshold):
        cmd = [sys.executable, str(Path(__file__)), "--child-memory", config, "--family", family, "--size", str(size),
               "--steps", str(steps), "--architecture", architecture or family]
        if cache_threshold is not None:
            cmd += ["--cache-threshold", str(cache_threshold)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
        peaks[config] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    return peaks


def _pythonpath() -> str:
    here = str(Path(__file__).resolve().parent)
    return os.pathsep.join([here, str(Path(here).parent), os.environ.get("PYTHONPATH", "")])


def _child_memory(config: str, family: str, architecture: str, size: int, steps: int, cache_threshold: float | None) -> None:
    from peak_rss import peak_rss_mb, reset_peak_rss

    pipe = PIPELINES[family]({**ARCHITECTURES, "tiny-sd3": TINY, "tiny-flux": TINY_FLUX}[architecture])
    gc.collect()
    reset = reset_peak_rss()  # building the pipeline peaks higher than denoising: measure from here
    _generate(pipe, family, config, SHORT_PROMPT, steps, size, cache_threshold=cache_threshold)
    print(json.dumps({"peak_mb": peak_rss_mb(reset), "denoising_only": reset}))


def memory_markdown(family: str, size: int, steps: int, peaks: dict[str, float]) -> str:
    stock = peaks["stock"]
    rows = "\n".join(f"| {c} | {mb:.0f} | {mb - stock:+.0f} MB |" for c, mb in peaks.items())
    return (f"\nPeak memory ({family}, {size} px, {steps} steps, CPU float32; one child process per configuration, the "
            "peak-RSS counter reset after the pipeline is built: weights resident, text encoding included):\n\n"
            f"| configuration | peak RSS MB | vs stock |\n| --- | ---: | ---: |\n{rows}\n\n"
            + (f"Highest against stock: {max(peaks, key=peaks.get)} ({max(peaks.values()) - stock:+.0f} MB).\n"
               if max(peaks.values()) > stock else "No configuration peaks above stock.\n"))


FAMILY_TEXT = {
    "sd3": ("SD3-medium widths", "StableDiffusion3Pipeline with the T5 slot empty (77 CLIP + 256 zero positions), CFG batch 2",
            f"{SD3_MEDIUM_DEPTH} joint blocks"),
    "flux": ("FLUX.1-dev widths", "FluxPipeline, T5-shaped text stream padded to 512 positions, guidance-distilled (batch 1)",
             f"{FLUX_DEV_DEPTH[0]} double + {FLUX_DEV_DEPTH[1]} single blocks"),
}


def to_markdown(results: list[dict]) -> str:
    family = results[0]["setup"].get("family", "sd3")
    widths, pipeline, depth = FAMILY_TEXT[family]
    env = results[0]["environment"]
    where = f"GPU ({env['gpu']}, {results[0]['setup']['dtype']})" if env.get("gpu") else "CPU"
    lines = [
        f"### Token pruning on an MM-DiT: {widths}, random weights, {where}",
        "",
        f"{pipeline}, flow-matching Euler, warm-up 0.2; seconds are "
        + ("the process's CPU time (one torch thread: what the work costs, whatever else the machine runs)"
           if results[0]["setup"].get("clock") == "cpu" else "wall time") + "; the pruned rows keep exactly the prompt's tokens (random weights: "
        "scores mean nothing, speed depends only on the kept count). Rows interleaved in one process, medians. "
        + ("`merged`: the exact merge of the 256 zero T5 positions alone (`warmup=1.0`, nothing pruned); `pruned`: "
           "pruning, with the merge during the warm-up. " if family == "sd3" else "")
        + "Transformer depth reduced (stated): the text stream's share of a call is the same "
        f"in every block, so the per-call ratio holds for the full depth ({depth}) up to the embeddings and final layer.",
        "",
        "| size | prompt | blocks | config | text positions per call | calls computed | loop s | loop speedup | call s | call speedup |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        s = r["setup"]
        label = "short" if s["prompt"] == SHORT_PROMPT else "long" if s["prompt"] == LONG_PROMPT else "custom"
        blocks = f"{s['layers']} + {s['single_layers']}" if s.get("single_layers") else str(s["layers"])
        for c, loop in r["loop_median_s"].items():
            n = r["text_tokens"]["per_config"][c]
            text = " -> ".join(map(str, n[::-1])) if len(n) > 1 else str(n[0])
            done = r.get("computed_calls", {}).get(c)
            done = f"{statistics.median(done):g} / {s['steps']}" if done else "-"
            lines.append(f"| {s['size']} | {label} | {blocks} | {c} | {text} | {done} | {loop:.2f} | {r['loop_median_s']['stock'] / loop:.2f}x "
                         f"| {r['call_seconds'][c]:.3f} | {r['call_seconds']['stock'] / r['call_seconds'][c]:.2f}x |")
        if r.get("scoring_overhead") is not None:
            lines.append(f"| | | | | a scored warm-up call took {100 * r['scoring_overhead']:+.0f}% over a pruned call of the same "
                         "text length (the warm-up's scoring) | | | | | |")
        lines.append(f"| | | | | kept per row: {'/'.join(map(str, r['text_tokens']['kept_per_row']))}; full calls of a pruned "
                     f"loop: {r['full_calls_per_pruned_generation']}; the calls alone: {_x(r.get('loop_bound_from_calls'))} | | | | | |")
        if r.get("cache_threshold") is not None:
            lines.append(f"| | | | | `fbc`: diffusers' FirstBlockCache (threshold {r['cache_threshold']}); `calls computed`: calls "
                         "that ran the last block; `call s` of the fbc rows mixes computed and cached calls | | | | | |")
    lines += ["", f"Environment: {json.dumps(results[0]['environment'])}."]
    return "\n".join(lines) + "\n"


def pairs_markdown(pairs: dict) -> str:
    """The interleaved single calls, with the FLOP ceiling beside each measured ratio."""
    rows = []
    for name, n in pairs["text"].items():
        if name == "full":
            continue
        ceiling = pairs["flops"]["full"] / pairs["flops"][name]
        rows.append(f"{name} ({n} positions) {pairs['median_s'][name]:.3f} s: {pairs['speedup'][name]:.2f}x, FLOP ceiling "
                    f"{ceiling:.2f}x, measured / ceiling {pairs['speedup'][name] / ceiling:.0%}")
    clock = "CPU seconds of the process, one thread" if pairs.get("clock") == "cpu" else "wall seconds"
    return (f"\nSingle calls, interleaved ({len(pairs['seconds']['full'])} rounds, {pairs['size']} px, {clock}; FLOPs counted with "
            f"`torch.utils.flop_counter`): full text ({pairs['text']['full']} positions) {pairs['median_s']['full']:.3f} s; "
            + "; ".join(rows) + ".\n")


ARCHITECTURES = {"sd3": SD3_MEDIUM, "flux": FLUX_DEV}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=tuple(ARCHITECTURES), default="sd3")
    ap.add_argument("--size", type=int, nargs="+", default=[512])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="timed loops per configuration (0: single-call pairs only)")
    ap.add_argument("--pairs", type=int, default=5, help="interleaved single-call pairs (0: none)")
    ap.add_argument("--prompts", choices=("short", "long", "both"), default="both")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--cache-threshold", type=float, default=None, help="Flux: add FirstBlockCache rows at this threshold")
    ap.add_argument("--memory", action="store_true", help="also the peak memory of each configuration (child processes, CPU)")
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--architecture", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write results .json and .md with this path prefix")
    args = ap.parse_args(argv)
    if args.child_memory:
        _child_memory(args.child_memory, args.family, args.architecture or args.family, args.size[0], args.steps, args.cache_threshold)
        return 0
    cfg = ARCHITECTURES[args.family]
    where = dict(device=args.device, dtype=getattr(torch, args.dtype))
    prompts = {"short": (SHORT_PROMPT,), "long": (LONG_PROMPT,), "both": (SHORT_PROMPT, LONG_PROMPT)}[args.prompts]
    results = [run(cfg, size, args.steps, args.repeats, prompt, family=args.family, cache_threshold=args.cache_threshold, **where)
               for size in args.size for prompt in prompts] if args.repeats else []
    pairs = [call_pairs(cfg, size, args.pairs, family=args.family, **where) for size in args.size] if args.pairs else []
    md = (to_markdown(results) if results else "") + "".join(pairs_markdown(p) for p in pairs)
    memory = {size: peak_memory(args.family, size, cache_threshold=args.cache_threshold) for size in args.size} if args.memory else {}
    md += "".join(memory_markdown(args.family, size, 2, peaks) for size, peaks in memory.items())
    print(md)
    write_out(args.out, {"loops": results, "call_pairs": pairs, "peak_mb": memory}, md)
    return 0


def write_out(prefix: str | None, result: dict, md: str) -> None:
    """``prefix``.json and ``prefix``.md of a CLI run (nothing without a prefix)."""
    if prefix:
        Path(prefix + ".json").write_text(json.dumps(result, indent=1))
        Path(prefix + ".md").write_text(md)


if __name__ == "__main__":
    raise SystemExit(main())
