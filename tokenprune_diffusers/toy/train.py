"""Seeded, resumable training of the toy model: the VAE first, then the UNet and text encoder.

    python -m tokenprune_diffusers.toy.train --out runs/toy --steps 8000 \
        --export tokenprune_diffusers/toy/weights

Phase 1 trains the VAE alone for ``vae_steps`` steps (reconstruction + a tiny KL term) and sets its
``scaling_factor`` to 1 / std of the latents. Phase 2 freezes the VAE and trains the UNet and the
text encoder jointly on the usual epsilon-prediction loss, dropping the caption for 10% of the
samples (classifier-free guidance). An exponential moving average (EMA) of the phase-2 weights is
kept and exported.

Every random draw of step ``s`` comes from ``torch.Generator().manual_seed(seed, s)`` and the data
of step ``s`` is samples ``s * batch .. (s + 1) * batch - 1`` of a seeded
:class:`~tokenprune_diffusers.toy.data.ToyShapesDataset`; so a run stopped and resumed from its
checkpoint computes exactly what an uninterrupted run computes. Checkpoints are written atomically
(temporary file, then ``os.replace``) every ``ckpt_every`` steps and at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .._atomic import atomic_path
from .data import ToyShapesDataset, collate
from .model import ToyModelConfig, assemble_pipeline, build_models, data_token_ids, save_weights

__all__ = ["TrainConfig", "train", "load_checkpoint", "export_checkpoint", "pipeline_from_checkpoint", "main",
           "step_generator", "run_loop", "load_state_file", "save_state_file", "held_out_loss", "run_cli"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (stored in its checkpoint)."""

    # --- important args ---
    steps: int = 8000  # phase-2 (UNet + text encoder) optimiser steps, in total
    vae_steps: int = 600  # phase-1 (VAE) optimiser steps, done first
    batch_size: int = 32  # samples per step (both phases)
    lr: float = 1e-3  # phase-2 AdamW learning rate (after warm-up)
    seed: int = 0  # weights, data and noise all derive from it
    # --- args to tinker with ---
    vae_lr: float = 2e-3  # phase-1 AdamW learning rate
    kl_weight: float = 1e-6  # phase-1 KL term weight (keeps the latent distribution tame)
    warmup_steps: int = 200  # linear learning-rate warm-up of phase 2
    cond_drop: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)
    ema_decay: float = 0.999  # EMA decay of phase-2 weights (ramped up over the first steps)
    grad_clip: float = 1.0  # max global gradient norm
    ckpt_every: int = 250  # steps between checkpoints (phase 1 and 2 counted together)
    scale_samples: int = 256  # held-out samples measuring the latent std (the VAE scaling factor)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)

    def __post_init__(self) -> None:
        if self.scale_samples < 2:
            raise ValueError(f"scale_samples must be >= 2, got {self.scale_samples!r}")
        for name in ("steps", "vae_steps", "ckpt_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size!r}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop!r}")
        if isinstance(self.model, dict):
            self.model = ToyModelConfig(**self.model)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw of training step ``step`` of a run seeded ``seed``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def save_state_file(out: Path, state: dict) -> None:
    """Write ``out/checkpoint.pt`` atomically (temporary file, then ``os.replace``)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def load_state_file(out: str | Path) -> dict | None:
    """The state stored in ``out/checkpoint.pt``, or None when there is none."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def run_loop(trainer, out: Path, ckpt_every: int, progress: bool = True, stop_after: int | None = None):
    """Drive ``trainer`` from ``trainer.step`` to ``trainer.total``: ``trainer.train_step()`` -> (phase, loss)
    does step ``trainer.step``; checkpoints (``trainer.state()``) every ``ckpt_every`` steps and at the end."""
    from tqdm.auto import tqdm

    done_here = 0
    bar = tqdm(total=trainer.total, initial=trainer.step, disable=not progress, desc=trainer.name, dynamic_ncols=True)
    running = math.nan
    while trainer.step < trainer.total and (stop_after is None or done_here < stop_after):
        phase, loss = trainer.train_step()
        if not math.isfinite(loss):
            bar.close()
            raise FloatingPointError(f"training loss became {loss} at step {trainer.step}; the last checkpoint is in {out}")
        trainer.history.append((trainer.step, loss))
        trainer.step += 1
        done_here += 1
        running = loss if math.isnan(running) else 0.98 * running + 0.02 * loss
        bar.set_postfix(phase=phase, loss=f"{running:.4f}")
        bar.update(1)
        if ckpt_every and trainer.step % ckpt_every == 0:
            save_state_file(Path(out), trainer.state())
    bar.close()
    save_state_file(Path(out), trainer.state())
    return trainer


def held_out_loss(loss_fn, seed: int, batch_size: int, num_batches: int = 2) -> float:
    """Mean of ``loss_fn(images, captions, generator)`` over fixed held-out batches (data seed
    ``seed + 1``, noise seed = batch index): comparable across steps, runs and toys."""
    held = ToyShapesDataset(seed=seed + 1)
    losses = []
    for k in range(num_batches):
        images, captions, _ = collate([held[i] for i in range(k * batch_size, (k + 1) * batch_size)])
        losses.append(float(loss_fn(images, captions, torch.Generator().manual_seed(k))))
    return sum(losses) / len(losses)


class _Trainer:
    """Holds the networks, optimisers and EMA; one method per training phase step."""

    name = "toy"

    def __init__(self, config: TrainConfig):
        from diffusers import DDPMScheduler

        from ..tokenizer import load_clip_tokenizer

        self.config = config
        self.vae, self.text_encoder, self.unet = build_models(config.model, seed=config.seed)
        self.tokenizer = load_clip_tokenizer()
        self.noise = DDPMScheduler(**config.model.scheduler)
        self.data = ToyShapesDataset(seed=config.seed, length=2**62)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.params]
        self.step = 0  # global step: phase 1 is 0 .. vae_steps-1, phase 2 after
        self.total = config.vae_steps + config.steps
        self.history: list[tuple[int, float]] = []  # (global step, loss)

    # --- data -------------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        b = self.config.batch_size
        images, captions, _ = collate([self.data[i] for i in range(step * b, (step + 1) * b)])
        return images, captions  # (B, 3, 32, 32), B captions

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids  # (B, 77)
        return self.text_encoder(ids)[0]  # (B, 77, hidden)

    def train_step(self) -> tuple[str, float]:
        """Global step ``self.step`` (the loop then advances it); the scaling factor is set after phase 1."""
        if self.step < self.config.vae_steps:
            loss = self.vae_step()
            if self.step + 1 == self.config.vae_steps:
                self.set_scaling_factor()
            return "vae", loss
        return "unet", self.unet_step()

    # --- phase 1 ----------------------------------------------------------------------------
    def vae_step(self) -> float:
        g = step_generator(self.config.seed, self.step)
        images, _ = self.batch(self.step)  # (B, 3, 32, 32)
        self.vae.train()
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)  # (B, 4, 8, 8)
        recon = self.vae.decode(z).sample  # (B, 3, 32, 32)
        loss = F.mse_loss(recon, images) + self.config.kl_weight * posterior.kl().mean()
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.config.grad_clip)
        self.vae_opt.step()
        return float(loss.detach())

    def set_scaling_factor(self) -> None:
        """Scale latents to unit standard deviation, measured on a fixed held-out batch."""
        held = ToyShapesDataset(seed=self.config.seed + 1)
        images = collate([held[i] for i in range(self.config.scale_samples)])[0]  # (N, 3, 32, 32)
        with torch.no_grad():
            std = float(self.vae.eval().encode(images).latent_dist.mean.std())  # over (N, 4, 8, 8)
        self.vae.register_to_config(scaling_factor=1.0 / std)

    # --- phase 2 ----------------------------------------------------------------------------
    def diffusion_loss(self, images: torch.Tensor, captions: list[str], g: torch.Generator) -> torch.Tensor:
        b = images.shape[0]
        with torch.no_grad():
            latents = self.vae.eval().encode(images).latent_dist.mean * self.vae.config.scaling_factor  # (B, 4, 8, 8)
        drop = torch.rand(b, generator=g) < self.config.cond_drop  # (B,)
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        noise = torch.randn(latents.shape, generator=g)  # (B, 4, 8, 8)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (b,), generator=g)  # (B,)
        noisy = self.noise.add_noise(latents, noise, t)  # (B, 4, 8, 8)
        pred = self.unet(noisy, t, self.encode_text(captions)).sample  # (B, 4, 8, 8)
        return F.mse_loss(pred, noise)

    def unet_step(self) -> float:
        s = self.step - self.config.vae_steps  # phase-2 step
        g = step_generator(self.config.seed, self.step)
        images, captions = self.batch(self.step)
        self.unet.train()
        self.text_encoder.train()
        loss = self.diffusion_loss(images, captions, g)
        for group in self.opt.param_groups:
            group["lr"] = self.config.lr * min(1.0, (s + 1) / max(1, self.config.warmup_steps))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.opt.step()
        decay = min(self.config.ema_decay, (1 + s) / (10 + s))
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.lerp_(p.detach(), 1.0 - decay)
        return float(loss.detach())

    @torch.no_grad()
    def eval_loss(self, num_batches: int = 2) -> float:
        """Phase-2 loss of the current weights on fixed held-out data and noise (for comparisons)."""
        self.unet.eval()
        self.text_encoder.eval()
        return held_out_loss(self.diffusion_loss, self.config.seed, self.config.batch_size, num_batches)

    # --- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        return dict(
            config=dataclasses.asdict(self.config),
            step=self.step,
            vae=self.vae.state_dict(),
            scaling_factor=float(self.vae.config.scaling_factor),
            text_encoder=self.text_encoder.state_dict(),
            unet=self.unet.state_dict(),
            vae_opt=self.vae_opt.state_dict(),
            opt=self.opt.state_dict(),
            ema=self.ema,
            history=self.history,
        )

    def load_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.vae.load_state_dict(state["vae"])
        self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.unet.load_state_dict(state["unet"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.opt.load_state_dict(state["opt"])
        for e, saved in zip(self.ema, state["ema"]):
            e.copy_(saved)
        self.history = list(state["history"])

    def save(self, out: Path) -> None:
        save_state_file(Path(out), self.state())

    def ema_models(self):
        """(vae, text_encoder, unet) with the EMA weights (copies; the trained ones are untouched)."""
        vae, text_encoder, unet = build_models(self.config.model, seed=self.config.seed)
        vae.load_state_dict(self.vae.state_dict())
        vae.register_to_config(scaling_factor=float(self.vae.config.scaling_factor))
        text_encoder.load_state_dict(self.text_encoder.state_dict())
        unet.load_state_dict(self.unet.state_dict())
        ema_params = list(unet.parameters()) + list(text_encoder.parameters())
        with torch.no_grad():
            for p, e in zip(ema_params, self.ema):
                p.copy_(e)
        return vae.eval(), text_encoder.eval(), unet.eval()


def _config_from_state(state: dict) -> TrainConfig:
    cfg = dict(state["config"])
    cfg["model"] = ToyModelConfig(**cfg["model"])
    return TrainConfig(**cfg)


def train(config: TrainConfig, out: str | Path, progress: bool = True, stop_after: int | None = None) -> _Trainer:
    """Train (or resume, when ``out`` holds a checkpoint) until ``config.steps`` phase-2 steps are done.

    Args:
        config: the run's hyper-parameters. On resume, the checkpoint's config is used, except
            ``steps`` and ``ckpt_every``, which may be raised/changed to train longer.
        out: folder of ``checkpoint.pt``.
        progress: show tqdm progress bars.
        stop_after: stop (with a checkpoint) after this many global steps of this call; for tests
            and time-boxed sessions.

    Returns:
        The trainer (its ``history`` holds ``(global step, loss)``; see :func:`export_checkpoint`).
    """
    out = Path(out)
    state = load_state_file(out)
    if state is not None:
        saved = _config_from_state(state)
        config = dataclasses.replace(saved, steps=config.steps, ckpt_every=config.ckpt_every)
        trainer = _Trainer(config)
        trainer.load_state(state)
    else:
        trainer = _Trainer(config)
    return run_loop(trainer, out, config.ckpt_every, progress=progress, stop_after=stop_after)


def load_checkpoint(out: str | Path) -> _Trainer:
    """The trainer state stored in ``out/checkpoint.pt``."""
    state = load_state_file(out)
    if state is None:
        raise FileNotFoundError(f"no checkpoint at {Path(out) / CHECKPOINT}")
    trainer = _Trainer(_config_from_state(state))
    trainer.load_state(state)
    return trainer


def export_checkpoint(out: str | Path, folder: str | Path, ema: bool = True) -> dict[str, int]:
    """Write a checkpoint's (EMA) weights as safetensors + config.json (see :func:`~.model.save_weights`)."""
    trainer = load_checkpoint(out)
    models = trainer.ema_models() if ema else (trainer.vae, trainer.text_encoder, trainer.unet)
    return save_weights(models, folder, trainer.config.model, data_token_ids(trainer.tokenizer))


def pipeline_from_checkpoint(out: str | Path, ema: bool = True):
    """A ``StableDiffusionPipeline`` straight from a checkpoint (no export needed)."""
    trainer = load_checkpoint(out)
    models = trainer.ema_models() if ema else (trainer.vae, trainer.text_encoder, trainer.unet)
    return assemble_pipeline(*models, scheduler_config=trainer.config.model.scheduler, tokenizer=trainer.tokenizer)


def run_cli(train_fn, export_fn, config, args) -> None:
    """What both toys' training commands do: train (or resume) ``config`` in ``args.out``, print the
    step and the recent loss, and export the EMA weights to ``args.export`` when given."""
    start = time.time()
    trainer = train_fn(config, args.out, progress=not args.no_progress)
    tail = [loss for _, loss in trainer.history[-100:]]
    print(f"step {trainer.step} ({time.time() - start:.0f} s this call), mean loss of last {len(tail)} steps: "
          f"{sum(tail) / max(1, len(tail)):.4f}")
    if args.export:
        sizes = export_fn(args.out, args.export)
        print("exported:", ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="run folder (checkpoint.pt); resumes when it holds one")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="phase-2 steps in total")
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps, help="phase-1 (VAE) steps")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--ckpt-every", type=int, default=TrainConfig.ckpt_every, help="steps between checkpoints")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of the default")
    parser.add_argument("--export", default=None, help="after training, export the EMA weights to this folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    config = TrainConfig(
        steps=args.steps,
        vae_steps=args.vae_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        ckpt_every=args.ckpt_every,
        model=ToyModelConfig.tiny() if args.tiny else ToyModelConfig(),
    )
    run_cli(train, export_checkpoint, config, args)


if __name__ == "__main__":
    main()
