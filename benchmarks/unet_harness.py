"""The UNet generation harness of the speed benchmarks (tokenprune_bench.py, deepcache_frontier.py):
build a pipeline, install one configuration (stock processors, token pruning, gating + guidance
collapse, DeepCache, or the tgate package's pipeline), time one generation's denoising loop, decode
and compare. No measurement policy here: the benchmarks decide what runs, how often and in what order.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Config:
    name: str
    options: dict | None  # TokenPruneProcessor options; None = stock processors
    collapse: bool = False  # pass CollapseGuidance as callback_on_step_end
    deep_cache: dict | None = None  # apply_deep_cache options (DeepCache); None = off
    tgate: bool = False  # the tgate package's own pipeline (gate at 40%, its defaults)


TGATE = Config("T-GATE (tgate pkg, gate 40%)", None, tgate=True)


def read_prompts(n: int | None = None) -> list[str]:
    lines = (HERE / "prompts.txt").read_text().splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return prompts[:n] if n else prompts


def build(model: str, device: str, dtype: torch.dtype, seed: int = 0):
    from tokenprune_diffusers.models import sd15_pipeline, tiny_pipeline

    if model == "tiny":
        pipe = tiny_pipeline(seed=seed)
    elif model == "sd15-random":
        pipe = sd15_pipeline(seed=seed)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if device != "cpu":
        pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def install(pipe, cfg: Config, originals):
    """Put the configuration's processors and hooks on the pipeline; return (pipeline kwargs, processor)."""
    from tokenprune_diffusers import (
        CollapseGuidance,
        apply_deep_cache,
        apply_token_pruning,
        remove_deep_cache,
        remove_token_pruning,
    )

    remove_deep_cache(pipe)
    remove_token_pruning(pipe)  # also its UNet hook
    pipe.unet.set_attn_processor(dict(originals))  # diffusers pops the entries of the dict it is given
    proc = apply_token_pruning(pipe, **cfg.options) if cfg.options is not None else None
    if cfg.deep_cache is not None:
        apply_deep_cache(pipe, **cfg.deep_cache)
    return ({"callback_on_step_end": CollapseGuidance(proc, pipe)} if cfg.collapse else {}), proc


def denoise(pipe, cfg: Config, prompt: str, steps: int, size: int, seed: int, originals, timer=time.perf_counter):
    """One generation's denoising loop (text encoding included, VAE decode excluded):
    (seconds, latents, report, calls) where calls lists (batch size, seconds) of every UNet call.
    ``timer`` reads the clock of ``seconds`` (wall clock by default; ``time.process_time`` gives the
    CPU seconds of the process, which a loaded machine does not inflate)."""
    kwargs, proc = install(pipe, cfg, originals)
    device = pipe.unet.device
    calls, started = [], []

    def pre(m, args, kw):
        sync(device)
        sample = args[0] if args else kw["sample"]
        started.append((int(sample.shape[0]), time.perf_counter()))

    def post(m, args, out):
        sync(device)
        batch, t0 = started.pop()
        calls.append((batch, time.perf_counter() - t0))

    handles = [pipe.unet.register_forward_pre_hook(pre, with_kwargs=True), pipe.unet.register_forward_hook(post)]
    g = torch.Generator("cpu").manual_seed(seed)
    call = pipe
    if cfg.tgate:
        from tgate import TgateSDLoader

        call = TgateSDLoader(pipe).tgate
        kwargs = {"gate_step": max(1, round(0.4 * steps))}
    try:
        sync(device)
        t0 = timer()
        with torch.inference_mode():
            latents = call(prompt, num_inference_steps=steps, height=size, width=size, generator=g, output_type="latent",
                           **kwargs).images
        sync(device)
        seconds = timer() - t0
    finally:
        for h in handles:
            h.remove()
        if cfg.tgate:  # tgate replaces every Attention module's forward (and keeps a cache on it): undo that
            for m in pipe.unet.modules():
                if type(m).__name__ == "Attention":
                    m.__dict__.pop("forward", None)
                    m.__dict__.pop("cache", None)
    return seconds, latents.float().cpu(), (proc.report if proc is not None else None), calls


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        x = latents.to(pipe.vae.device, pipe.vae.dtype) / pipe.vae.config.scaling_factor
        img = pipe.vae.decode(x).sample.float().cpu()
    return ((img / 2 + 0.5).clamp(0, 1)).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def environment() -> dict:
    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def sync(device) -> None:
    """Wait for the device (CUDA) so that a timer sees the work done."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
