"""Token pruning on an MM-DiT, measured: an SD3-medium-width transformer (random weights, reduced
depth) in a StableDiffusion3Pipeline with the T5 slot empty, stock vs pruning, interleaved.

Random weights attend almost uniformly, so their scores say nothing about which tokens matter; the
speed depends only on how many text positions are kept. The pruned rows therefore keep exactly the
prompt's own tokens (``top_k`` = the number of words, ``padding="drop"``): start, words and
end-of-text of every row, what the defaults' ``padding="drop"`` keeps. Which tokens the defaults keep
on trained weights is for the toy MM-DiT.

    python benchmarks/mmdit_bench.py --size 512 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

# SD3-medium's published transformer widths (24 heads x 64 = 1536, T5 width 4096); depth reduced
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD3_MEDIUM_DEPTH = 24
TINY = dict(SD3_MEDIUM, num_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=16, pooled_projection_dim=64)
SHORT_PROMPT = "a photo of a cat wearing a red hat"
LONG_PROMPT = ("a detailed oil painting of an old lighthouse on a rocky cliff at sunset, waves crashing below, "
               "seagulls in an orange sky, warm light in the windows, dramatic clouds, highly detailed")


def sd3_pipeline(transformer_cfg: dict, seed: int = 0):
    """StableDiffusion3Pipeline around a seeded random transformer; tiny CLIP text encoders (they run
    once per generation, the same in every row), a tiny 16-channel VAE (latents are timed, not decoded)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tokenprune_diffusers.models import TINY_TEXT_CONFIG
    from tokenprune_diffusers.tokenizer import load_clip_tokenizer

    half = transformer_cfg["pooled_projection_dim"] // 2
    text_cfg = CLIPTextConfig(**{**TINY_TEXT_CONFIG, "projection_dim": half, "hidden_act": "gelu"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**transformer_cfg).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False).eval()
        encoders = [CLIPTextModelWithProjection(text_cfg).eval() for _ in range(2)]
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=load_clip_tokenizer(), text_encoder_2=encoders[1],
        tokenizer_2=load_clip_tokenizer(pad_token="!"), text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_timer(transformer, calls: list):
    """(text length, seconds) of every transformer call, measured inside the loop (the length as the
    blocks see it: the context embedder's input, after pruning shortened it)."""
    state = {}

    def pre(module, args, kwargs):
        state["t"] = time.perf_counter()

    def text(module, args):
        state["n"] = int(args[0].shape[1])

    def post(module, args, kwargs, out):
        calls.append((state["n"], time.perf_counter() - state["t"]))

    return [transformer.register_forward_pre_hook(pre, with_kwargs=True), transformer.register_forward_hook(post, with_kwargs=True),
            transformer.context_embedder.register_forward_pre_hook(text)]


def run(transformer_cfg: dict, size: int, steps: int, repeats: int, prompt: str, seed: int = 0, progress=print) -> dict:
    from tokenprune_diffusers import apply_token_pruning, remove_token_pruning

    pipe = sd3_pipeline(transformer_cfg, seed)
    n_words = len(pipe.tokenizer(prompt).input_ids) - 2
    options = dict(top_k=n_words, padding="drop", warmup=0.2)

    def generate(config: str):
        proc = apply_token_pruning(pipe, **options) if config == "pruned" else None
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe(prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=7.0, generator=g,
                 output_type="latent")
        seconds = time.perf_counter() - t0
        kept = proc.report.steps[-1].kept_counts if proc is not None else None
        remove_token_pruning(pipe)
        return seconds, kept

    generate("stock")  # warm-up, untimed
    generate("pruned")
    seconds = {"stock": [], "pruned": []}
    calls: dict[str, list] = {"stock": [], "pruned": []}
    kept = None
    for r in range(repeats):
        for config in ("stock", "pruned") if r % 2 == 0 else ("pruned", "stock"):
            handles = _call_timer(pipe.transformer, calls[config])
            s, k = generate(config)
            for h in handles:
                h.remove()
            seconds[config].append(s)
            kept = k if k is not None else kept
            progress(f"[{r + 1}/{repeats}] {config}: {s:.2f} s")
    full_text = max(n for n, _ in calls["stock"])
    stock_call = statistics.median(t for _, t in calls["stock"])
    pruned_call = statistics.median(t for n, t in calls["pruned"] if n < full_text)
    warm = sum(1 for n, _ in calls["pruned"][:steps] if n == full_text)  # full calls of one pruned generation
    loop = statistics.median(seconds["stock"]) / statistics.median(seconds["pruned"])
    per_call = stock_call / pruned_call
    return {
        "setup": dict(size=size, steps=steps, repeats=repeats, prompt=prompt, seed=seed, layers=transformer_cfg["num_layers"],
                      widths={k: transformer_cfg[k] for k in ("num_attention_heads", "attention_head_dim", "joint_attention_dim")},
                      image_tokens=(size // 8 // transformer_cfg["patch_size"]) ** 2, cfg_batch=2, kept_options=options),
        "text_tokens": {"stock": full_text, "kept_per_row": kept},
        "loop_seconds": seconds,
        "loop_speedup": loop,
        "call_seconds": {"stock": stock_call, "pruned": pruned_call},
        "call_speedup": per_call,
        "full_calls_per_pruned_generation": warm,
        "loop_bound_from_calls": steps / (warm + (steps - warm) / per_call),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
    }


def call_pairs(transformer_cfg: dict, size: int, pairs: int, prompt: str = SHORT_PROMPT, seed: int = 0) -> dict:
    """One transformer call with the full text stream vs one with the prompt's tokens only (padded
    rows masked, as a pruned call runs), alternated ``pairs`` times: the per-call ratio, robust to
    a machine whose load drifts over minutes (medians of interleaved single calls)."""
    from tokenprune_diffusers import apply_token_pruning, remove_token_pruning

    pipe = sd3_pipeline(transformer_cfg, seed)
    n_words = len(pipe.tokenizer(prompt).input_ids) - 2
    with torch.inference_mode():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, prompt, None, do_classifier_free_guidance=True)
    text, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])  # (2, 333, D), negatives first
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, transformer_cfg["in_channels"], size // 8, size // 8, generator=g)
    t = torch.full((2,), 500.0)
    keep = [torch.arange(2), torch.arange(n_words + 2)]  # the empty negative prompt: start, end; the prompt: its tokens
    index = torch.stack([torch.cat([k, k[-1:].expand(n_words + 2 - len(k))]) for k in keep])  # (2, K), padded
    valid = torch.stack([torch.arange(n_words + 2) < len(k) for k in keep])
    short = text.gather(1, index[..., None].expand(-1, -1, text.shape[-1]))
    apply_token_pruning(pipe, threshold=0.0)  # the pruning processors (no plan outside a generation: no scoring)
    times = {"full": [], "kept": []}
    with torch.inference_mode():
        for i in range(pairs + 1):  # pair 0 warms up
            for name in ("full", "kept") if i % 2 == 0 else ("kept", "full"):
                ehs, extra = (text, None) if name == "full" else (short, {"text_key_mask": valid})
                t0 = time.perf_counter()
                pipe.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=ehs, pooled_projections=pooled,
                                 joint_attention_kwargs=extra, return_dict=False)
                if i:
                    times[name].append(time.perf_counter() - t0)
    remove_token_pruning(pipe)
    full, kept = statistics.median(times["full"]), statistics.median(times["kept"])
    return {"size": size, "layers": transformer_cfg["num_layers"], "text": [text.shape[1], int(index.shape[1])],
            "seconds": times, "full_s": full, "kept_s": kept, "call_speedup": full / kept}


def to_markdown(results: list[dict]) -> str:
    lines = [
        "### Token pruning on an MM-DiT: SD3-medium widths, random weights, CPU",
        "",
        "StableDiffusion3Pipeline with the T5 slot empty (77 CLIP + 256 zero positions), CFG batch 2, "
        "flow-matching Euler, warm-up 0.2; the pruned rows keep exactly the prompt's tokens (random weights: "
        "scores mean nothing, speed depends only on the kept count). Stock and pruned interleaved in one "
        "process, medians. Transformer depth reduced (stated): the text stream's share of a call is the same "
        f"in every block, so the per-call ratio holds for the full depth ({SD3_MEDIUM_DEPTH} blocks) up to the "
        "embedding and final layer.",
        "",
        "| size | prompt | blocks | text positions: stock -> kept | loop s: stock | pruned | loop speedup | call s: stock | pruned | call speedup | loop bound from calls |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        s, ls, cs = r["setup"], r["loop_seconds"], r["call_seconds"]
        kept = "/".join(map(str, r["text_tokens"]["kept_per_row"]))
        label = "short" if s["prompt"] == SHORT_PROMPT else "long" if s["prompt"] == LONG_PROMPT else "custom"
        lines.append(
            f"| {s['size']} | {label} | {s['layers']} | {r['text_tokens']['stock']} -> {kept} | {statistics.median(ls['stock']):.2f} "
            f"| {statistics.median(ls['pruned']):.2f} | {r['loop_speedup']:.2f}x | {cs['stock']:.3f} | {cs['pruned']:.3f} "
            f"| {r['call_speedup']:.2f}x | {r['loop_bound_from_calls']:.2f}x |"
        )
    lines += ["", f"Environment: {json.dumps(results[0]['environment'])}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, nargs="+", default=[512])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=SD3_MEDIUM["num_layers"])
    ap.add_argument("--prompts", choices=("short", "long", "both"), default="both")
    ap.add_argument("--out", default=None, help="write results .json and .md with this path prefix")
    args = ap.parse_args(argv)
    cfg = dict(SD3_MEDIUM, num_layers=args.layers)
    prompts = {"short": (SHORT_PROMPT,), "long": (LONG_PROMPT,), "both": (SHORT_PROMPT, LONG_PROMPT)}[args.prompts]
    results = [run(cfg, size, args.steps, args.repeats, prompt) for size in args.size for prompt in prompts]
    md = to_markdown(results)
    print(md)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(results, indent=1))
        Path(args.out + ".md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
