"""Episodic meta-training with accelerate, atomic checkpoints and resume (pre-training: :mod:`.pretrain`).

``accelerate launch your_script.py`` gives multi-GPU data parallelism with no code change: each
process draws different episodes (round-robin over the seeded episode list) and gradients are
averaged by DDP.  With one process it is plain single-device training.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._checks import finite, positive_int
from .checkpoint import (
    check_resumable,
    dataset_fingerprint,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .data.sampler import EpisodeCollate, EpisodeSampler
from .methods.base import FewShotClassifier

__all__ = ["TrainConfig", "TrainResult", "meta_train", "run_config", "save_checkpoint", "load_checkpoint",
           "peak_memory_mb"]

CHECKPOINT_NAME = "last.pt"
_RUN_ONLY = ("steps", "stop_after", "checkpoint_dir", "checkpoint_every", "resume", "num_workers", "progress",
             "cpu")


@dataclass
class TrainConfig:
    """Episodic meta-training; the defaults are Snell et al.'s Omniglot recipe."""

    n_way: int = 60  # classes per training episode (Snell et al.: 60 on Omniglot)
    n_shot: int = 1  # support images per class
    n_query: int = 5  # query images per class
    steps: int = 3000  # optimiser steps
    meta_batch: int = 1  # episodes per optimiser step (gradients averaged)
    lr: float = 1e-3  # Adam learning rate
    lr_decay_every: int = 2000  # steps between learning-rate decays (Snell et al.: halve every 2000)
    lr_decay: float = 0.5  # multiplicative decay
    weight_decay: float = 0.0  # Adam weight decay
    grad_clip: float | None = None  # max gradient norm (None: no clipping)
    mixed_precision: str = "no"  # accelerate's "no" | "fp16" | "bf16"
    seed: int = 0  # seed of the training episodes
    checkpoint_dir: str | None = None  # folder for last.pt (None: no checkpoints)
    checkpoint_every: int = 500  # steps between checkpoints
    resume: bool = True  # continue from checkpoint_dir/last.pt when it exists
    stop_after: int | None = None  # stop this call after this many steps (total, resumable later)
    num_workers: int = 0  # DataLoader workers
    progress: bool = True  # tqdm bar
    cpu: bool = False  # force CPU even when a GPU is present
    channels_last: bool = False  # NHWC memory format for conv backbones (~20% faster on CPU here)

    def __post_init__(self) -> None:
        for name in ("n_way", "n_shot", "steps", "meta_batch", "lr_decay_every", "checkpoint_every"):
            positive_int(name, getattr(self, name))
        if self.n_query < 1:
            raise ValueError(f"n_query must be >= 1 for training, got {self.n_query}")
        finite("lr", self.lr, low=0.0, low_open=True)
        finite("lr_decay", self.lr_decay, low=0.0, low_open=True)
        finite("weight_decay", self.weight_decay, low=0.0)
        if self.grad_clip is not None:
            finite("grad_clip", self.grad_clip, low=0.0, low_open=True)
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")


@dataclass
class TrainResult:
    steps: int  # total optimiser steps done (including resumed ones)
    losses: list[float] = field(default_factory=list)  # mean training loss per step
    accuracies: list[float] = field(default_factory=list)  # training query accuracy (%) per step
    seconds: float = 0.0  # wall time of the steps run in this call
    episodes_per_s: float = 0.0  # training episodes per second in this call (all processes)
    peak_memory_mb: float = 0.0  # CUDA peak allocated, else peak RSS of the process
    memory_kind: str = "rss"  # "cuda" or "rss"


def peak_memory_mb(device: torch.device | None = None) -> tuple[float, str]:
    """CUDA peak allocated memory on a GPU, else the process's peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "rss"


def run_config(config: TrainConfig) -> dict:
    """The fields of ``config`` that change what training computes: a checkpoint resumes only
    under the same ones (``steps`` may grow; the rest may change between resumed calls)."""
    return {k: v for k, v in asdict(config).items() if k not in _RUN_ONLY}


class _EpisodeLoss(nn.Module):
    """Routes the loss through ``forward`` so that DDP sees (and synchronises) it."""

    def __init__(self, model: FewShotClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, support, support_labels, query, query_labels):
        return self.model.episode_loss(support, support_labels, query, query_labels)


def meta_train(
    model: FewShotClassifier,
    dataset: torch.utils.data.Dataset,
    config: TrainConfig,
    *,
    accelerator=None,
) -> TrainResult:
    """Trains ``model`` in place on episodes of ``dataset`` (needs ``dataset.labels``).

    Step ``s`` of process ``r`` out of ``W`` uses episodes ``(s * meta_batch + m) * W + r`` of the
    seeded list, so a resumed run sees exactly the episodes an uninterrupted one would.
    """
    from accelerate import Accelerator  # lazy: keeps `import fewshot_ccd` light
    from tqdm.auto import tqdm

    if accelerator is None:
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    wrapper = _EpisodeLoss(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay)
    result = TrainResult(steps=0)

    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    fingerprint = dataset_fingerprint(dataset) if ckpt_path is not None else None
    if ckpt_path is not None and config.resume and find_checkpoint(ckpt_path) is not None:
        state = load_checkpoint(ckpt_path)  # falls back to the previous generation when the last is unreadable
        check_resumable(state, ckpt_path, fingerprint=fingerprint, config=run_config(config))
        if state["step"] > config.steps:
            raise ValueError(f"the checkpoint in {ckpt_path.parent} has done {state['step']} steps, more than "
                             f"steps={config.steps}: pass steps >= {state['step']}, another checkpoint_dir, "
                             f"or resume=False")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])  # dropout, if any, continues where it stopped
        result = TrainResult(steps=state["step"], losses=state["losses"], accuracies=state["accuracies"])

    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    end = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
    sampler = EpisodeSampler(
        dataset.labels, n_way=config.n_way, n_shot=config.n_shot, n_query=config.n_query,
        episodes=end * config.meta_batch * world, seed=config.seed,
        start=result.steps * config.meta_batch * world, rank=rank, world_size=world,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.num_workers,
        collate_fn=EpisodeCollate(config.n_way, config.n_shot, config.n_query),
    )

    def checkpoint(step: int) -> None:
        if ckpt_path is None or not accelerator.is_main_process:
            return
        save_checkpoint(ckpt_path, {
            "model": accelerator.unwrap_model(wrapper).model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "config": run_config(config), "fingerprint": fingerprint,
            "torch_rng": torch.get_rng_state(),
            "losses": result.losses, "accuracies": result.accuracies,
        })

    model.train()
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=end, initial=result.steps, disable=not (config.progress and accelerator.is_local_main_process),
               desc="meta-train", dynamic_ncols=True)
    start_step, t0 = result.steps, time.perf_counter()
    batch = iter(loader)
    for step in range(result.steps, end):
        step_loss, step_acc = 0.0, 0.0
        for m in range(config.meta_batch):
            support, s_labels, query, q_labels = (t.to(device) for t in next(batch))
            if config.channels_last:
                support = support.contiguous(memory_format=torch.channels_last)
                query = query.contiguous(memory_format=torch.channels_last)
            last = m == config.meta_batch - 1
            ctx = accelerator.no_sync(wrapper) if not last else contextlib.nullcontext()
            with ctx:
                loss, logits = wrapper(support, s_labels, query, q_labels)
                accelerator.backward(loss / config.meta_batch)
            step_loss += loss.item() / config.meta_batch
            step_acc += 100.0 * (logits.argmax(-1) == q_labels).float().mean().item() / config.meta_batch
        if config.grad_clip is not None:
            accelerator.clip_grad_norm_(wrapper.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(step_loss)
        result.accuracies.append(step_acc)
        result.steps = step + 1
        bar.update(1)
        if result.steps % 20 == 0:
            bar.set_postfix(loss=f"{step_loss:.3f}", acc=f"{step_acc:.1f}")
        if result.steps % config.checkpoint_every == 0 or result.steps == end:
            checkpoint(result.steps)
    bar.close()
    result.seconds = time.perf_counter() - t0
    done = (result.steps - start_step) * config.meta_batch * world
    result.episodes_per_s = done / result.seconds if result.seconds > 0 else 0.0
    result.peak_memory_mb, result.memory_kind = peak_memory_mb(device)
    accelerator.wait_for_everyone()
    return result
