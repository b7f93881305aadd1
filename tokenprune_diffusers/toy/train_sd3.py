"""Seeded, resumable flow-matching training of the SD3-shaped toy (:mod:`~tokenprune_diffusers.toy.sd3`).

    python -m tokenprune_diffusers.toy.train_sd3 --out runs/toy_sd3 --steps 3000 \
        --export tokenprune_diffusers/toy/weights_sd3

The VAE is the trained UNet toy's, frozen (stored in the checkpoint, so a run is bound to it). The
transformer and both text encoders train jointly on SD3's rectified-flow loss: ``x_t = (1 - s) x0 +
s e`` with ``s = sigmoid(n)``, ``n ~ N(0, 1)`` (logit-normal), the transformer predicting ``e - x0``
at timestep ``1000 s``; 10% of the captions are replaced by ``""`` (classifier-free guidance); the
text sequence is what the pipeline's own ``encode_prompt`` builds (77 CLIP positions + the zero
T5 positions). An EMA of the trained weights is kept and exported.

Exact shortcut: the zero T5 positions are identical vectors, and an MM-DiT block treats identical
text tokens identically (no text position embedding), so ``m`` copies of one key act in attention
as one key whose logit gets ``+ log m``. Training hands the transformer one zero position with that
weight (:class:`MultiplicityJointProcessor`), which computes the same function as the full
sequence (tested), in a third of the time; the exported model runs the stock processors.

Seeding and resumption follow :mod:`~tokenprune_diffusers.toy.train`: step ``s`` draws from
:func:`~tokenprune_diffusers.toy.train.step_generator` and reads fixed data samples, and the
loop (:func:`~tokenprune_diffusers.toy.train.run_loop`) checkpoints atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from .data import ToyShapesDataset, collate
from .sd3 import SD3ToyConfig, assemble_sd3_pipeline, build_sd3_models, save_sd3_weights, sd3_token_ids
from .train import CHECKPOINT, held_out_loss, load_state_file, run_cli, run_loop, step_generator

__all__ = ["SD3TrainConfig", "MultiplicityJointProcessor", "train_sd3", "load_sd3_checkpoint", "export_sd3_checkpoint",
           "train_flow", "load_flow_checkpoint", "export_flow_checkpoint", "flow_pipeline_from_trainer", "flow_main",
           "sd3_pipeline_from_checkpoint", "main"]

MAX_SEQUENCE_LENGTH = 256  # the pipeline's default number of zero T5 positions (trained with it)


@dataclass
class SD3TrainConfig:
    """Hyper-parameters of an SD3-toy training run (stored in its checkpoint)."""

    steps: int = 3000  # optimiser steps in total
    batch_size: int = 32
    lr: float = 1e-3  # AdamW learning rate (after warm-up)
    seed: int = 0  # weights, data and noise all derive from it
    warmup_steps: int = 200  # linear learning-rate warm-up
    cond_drop: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    ema_decay: float = 0.999  # EMA decay (ramped up over the first steps)
    grad_clip: float = 1.0  # max global gradient norm
    ckpt_every: int = 200  # steps between checkpoints
    logit_mean: float = 0.0  # logit-normal timestep density: mean ...
    logit_std: float = 1.0  # ... and standard deviation of the logit
    init_from: str | None = None  # an exported weights folder to start from (a fine-tuning stage); None: fresh
    model: SD3ToyConfig = field(default_factory=SD3ToyConfig)
    model_class: ClassVar[type] = SD3ToyConfig  # what a dict ``model`` (from a checkpoint) becomes

    def __post_init__(self) -> None:
        for name in ("steps", "ckpt_every", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size!r}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")
        if isinstance(self.model, dict):
            self.model = type(self).model_class(**self.model)
        if self.init_from is not None:
            self.init_from = str(self.init_from)


class MultiplicityJointProcessor:
    """``JointAttnProcessor2_0``'s computation plus an additive key bias over the joint sequence.

    ``key_log_weight`` (B or 1, L) is added to the attention logits of the text keys (``log m`` for
    a position standing for ``m`` identical ones); without it the processor computes exactly what
    the stock one does. Training only.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, key_log_weight=None):
        b, n = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):  # (B, T, H*d) -> (B, H, T, d)
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        bias = None
        if encoder_hidden_states is not None:
            tq = split(attn.add_q_proj(encoder_hidden_states))
            tk = split(attn.add_k_proj(encoder_hidden_states))
            tv = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
            q, k, v = torch.cat([q, tq], dim=2), torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)
            if key_log_weight is not None:
                zeros = key_log_weight.new_zeros(key_log_weight.shape[0], n)  # image keys: weight 1
                bias = torch.cat([zeros, key_log_weight], dim=1)[:, None, None, :].to(q.dtype)  # (B, 1, 1, N + L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1]).to(q.dtype)  # (B, N + L, H*d)
        text = None
        if encoder_hidden_states is not None:
            out, text = out[:, :n], out[:, n:]
            if not attn.context_pre_only:
                text = attn.to_add_out(text)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, text) if encoder_hidden_states is not None else out


def compress_zero_tail(prompt_embeds: torch.Tensor, clip_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, clip_len + 1, D) embeddings and (1, clip_len + 1) key log-weights standing for ``prompt_embeds``
    (B, clip_len + m, D), whose last ``m`` positions must be zero (the empty T5 slot)."""
    tail = prompt_embeds[:, clip_len:]  # (B, m, D)
    m = tail.shape[1]
    if m < 1 or torch.count_nonzero(tail):
        raise ValueError(f"expected {m} zero positions after the {clip_len} CLIP positions (text_encoder_3=None)")
    weights = prompt_embeds.new_zeros(1, clip_len + 1)
    weights[0, -1] = math.log(m)
    return prompt_embeds[:, : clip_len + 1], weights


def _trained_parameters(transformer, text_encoder, text_encoder_2) -> list[torch.nn.Parameter]:
    """The parameters training updates (and the EMA follows), in a fixed order: all but the text
    encoders' token embeddings, which keep the UNet toy's trained word embeddings (frozen)."""
    for enc in (text_encoder, text_encoder_2):
        enc.get_input_embeddings().weight.requires_grad_(False)
    return [p for m in (transformer, text_encoder, text_encoder_2) for p in m.parameters() if p.requires_grad]


class _SD3Trainer:
    """Networks, optimiser and EMA of an SD3-toy run; the interface :func:`~.train.run_loop` drives.

    The Flux toy's trainer (:mod:`~.train_flux`) subclasses it: it overrides the model-specific
    methods (``build``, ``new_models``, ``assemble``, ``save``, ``flow_loss``, ``stock_processor``)."""

    name = "toy-sd3"
    config_class: type = SD3TrainConfig

    def build(self, config: SD3TrainConfig, vae) -> None:
        """Set ``vae``, ``text_encoder``, ``text_encoder_2``, ``transformer`` and ``pipe`` (training processors)."""
        from .model import load_toy_pipeline

        toy = load_toy_pipeline()  # the UNet toy: its VAE (frozen) and text encoder (initialisation)
        self.vae, self.text_encoder, self.text_encoder_2, self.transformer = build_sd3_models(
            config.model, seed=config.seed, vae=vae if vae is not None else toy.vae, init_text=toy.text_encoder
        )
        self.pipe = self.assemble((self.vae, self.text_encoder, self.text_encoder_2, self.transformer))
        self.transformer.set_attn_processor(MultiplicityJointProcessor())
        self.clip_len = self.pipe.tokenizer_max_length

    @staticmethod
    def load_exported(folder: str | Path):
        """The pipeline exported to ``folder`` (what ``init_from`` starts from)."""
        from .sd3 import load_sd3_pipeline

        return load_sd3_pipeline(folder)

    def init_from_exported(self, folder: str | Path) -> None:
        """Start from the weights exported to ``folder``: transformer and text encoders (the VAE is
        this run's, frozen), the EMA restarting from them. The architecture must be this config's;
        a mismatch, or a folder without the exported files, is refused."""
        pipe = self.load_exported(folder)
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            mine, theirs = getattr(self, name).state_dict(), getattr(pipe, name).state_dict()
            if {k: v.shape for k, v in mine.items()} != {k: v.shape for k, v in theirs.items()}:
                raise ValueError(f"init_from={str(folder)!r}: its {name} is not this run's architecture "
                                 "(train with the model config it was exported with)")
            getattr(self, name).load_state_dict(theirs)
        self.ema = [p.detach().clone() for p in self.params]

    def new_models(self):
        """Fresh (vae, text_encoder, text_encoder_2, transformer) of this run's config (this run's VAE)."""
        return build_sd3_models(self.config.model, seed=self.config.seed, vae=self.vae)

    def assemble(self, models):
        return assemble_sd3_pipeline(*models, scheduler_config=self.config.model.scheduler)

    def save(self, models, folder: str | Path) -> dict[str, int]:
        return save_sd3_weights(models, folder, self.config.model, sd3_token_ids())

    @staticmethod
    def stock_processor():
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        return JointAttnProcessor2_0()

    def __init__(self, config: SD3TrainConfig, vae=None):
        self.config = config
        self.build(config, vae)
        self.data = ToyShapesDataset(seed=config.seed, length=2**62)
        self.params = _trained_parameters(self.transformer, self.text_encoder, self.text_encoder_2)
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.params]
        self.step = 0
        self.total = config.steps
        self.history: list[tuple[int, float]] = []  # (step, loss)

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        b = self.config.batch_size
        images, captions, _ = collate([self.data[i] for i in range(step * b, (step + 1) * b)])
        return images, captions  # (B, 3, 32, 32), B captions

    def flow_loss(self, images: torch.Tensor, captions: list[str], g: torch.Generator) -> torch.Tensor:
        b = images.shape[0]
        with torch.no_grad():
            mean = self.vae.encode(images).latent_dist.mean  # (B, 4, 8, 8)
            x0 = (mean - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        drop = torch.rand(b, generator=g) < self.config.cond_drop  # (B,)
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        noise = torch.randn(x0.shape, generator=g)  # (B, 4, 8, 8)
        sigma = torch.sigmoid(self.config.logit_mean + self.config.logit_std * torch.randn(b, generator=g))  # (B,)
        xt = (1.0 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            captions, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )  # (B, 77 + 256, D), (B, P)
        embeds, weights = compress_zero_tail(embeds, self.clip_len)  # (B, 78, D), (1, 78)
        pred = self.transformer(hidden_states=xt, timestep=sigma * 1000.0, encoder_hidden_states=embeds,
                                pooled_projections=pooled, joint_attention_kwargs={"key_log_weight": weights}).sample
        return F.mse_loss(pred, noise - x0)

    def train_step(self) -> tuple[str, float]:
        s = self.step
        g = step_generator(self.config.seed, s)
        images, captions = self.batch(s)
        for m in (self.transformer, self.text_encoder, self.text_encoder_2):
            m.train()
        loss = self.flow_loss(images, captions, g)
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
        return "flow", float(loss.detach())

    @torch.no_grad()
    def eval_loss(self, num_batches: int = 2) -> float:
        """Loss of the current weights on fixed held-out data and noise (for comparisons)."""
        for m in (self.transformer, self.text_encoder, self.text_encoder_2):
            m.eval()
        return held_out_loss(self.flow_loss, self.config.seed, self.config.batch_size, num_batches)

    def state(self) -> dict:
        return dict(
            config=dataclasses.asdict(self.config),
            step=self.step,
            vae=self.vae.state_dict(),
            vae_config=dict(self.vae.config),
            transformer=self.transformer.state_dict(),
            text_encoder=self.text_encoder.state_dict(),
            text_encoder_2=self.text_encoder_2.state_dict(),
            opt=self.opt.state_dict(),
            ema=self.ema,
            history=self.history,
        )

    def load_state(self, state: dict) -> None:
        self.step = int(state["step"])
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            getattr(self, name).load_state_dict(state[name])
        self.opt.load_state_dict(state["opt"])
        for e, saved in zip(self.ema, state["ema"]):
            e.copy_(saved)
        self.history = list(state["history"])

    def ema_models(self):
        """(vae, text_encoder, text_encoder_2, transformer) with the EMA weights (copies, stock processors)."""
        vae, te1, te2, transformer = self.new_models()
        for name, m in (("text_encoder", te1), ("text_encoder_2", te2), ("transformer", transformer)):
            m.load_state_dict(getattr(self, name).state_dict())
        trained = _trained_parameters(transformer, te1, te2)
        with torch.no_grad():
            for p, e in zip(trained, self.ema):
                p.copy_(e)
        return vae, te1.eval(), te2.eval(), transformer.eval()


def _vae_from_state(state: dict):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config({k: v for k, v in state["vae_config"].items() if not k.startswith("_")})
    vae.load_state_dict(state["vae"])
    return vae


def _trainer_from_state(cls: type, state: dict, **overrides) -> _SD3Trainer:
    config = cls.config_class(**state["config"])  # its model dict becomes the model config
    trainer = cls(dataclasses.replace(config, **overrides), vae=_vae_from_state(state))
    trainer.load_state(state)
    return trainer


def train_flow(cls: type, config, out: str | Path, progress: bool = True, stop_after: int | None = None):
    """:func:`train_sd3` for a trainer class (``_SD3Trainer`` or a subclass)."""
    out = Path(out)
    state = load_state_file(out)
    if state is not None:
        trainer = _trainer_from_state(cls, state, steps=config.steps, ckpt_every=config.ckpt_every)
    else:
        trainer = cls(config)
        if config.init_from is not None:  # a fresh fine-tuning stage (a resumed one has its weights)
            trainer.init_from_exported(config.init_from)
    return run_loop(trainer, out, trainer.config.ckpt_every, progress=progress, stop_after=stop_after)


def load_flow_checkpoint(cls: type, out: str | Path):
    """The trainer of class ``cls`` stored in ``out/checkpoint.pt``."""
    state = load_state_file(out)
    if state is None:
        raise FileNotFoundError(f"no checkpoint at {Path(out) / CHECKPOINT}")
    return _trainer_from_state(cls, state)


def export_flow_checkpoint(trainer, folder: str | Path, ema: bool = True) -> dict[str, int]:
    """Write a trainer's (EMA) weights as safetensors + config.json."""
    models = trainer.ema_models() if ema else (trainer.vae, trainer.text_encoder, trainer.text_encoder_2, trainer.transformer)
    return trainer.save(models, folder)


def flow_pipeline_from_trainer(trainer, ema: bool = True):
    """The trainer's pipeline (EMA weights: copies; else its own networks), with the stock processors."""
    if ema:
        return trainer.assemble(trainer.ema_models())
    trainer.transformer.set_attn_processor(trainer.stock_processor())
    return trainer.pipe


def train_sd3(config: SD3TrainConfig, out: str | Path, progress: bool = True, stop_after: int | None = None) -> _SD3Trainer:
    """Train (or resume, when ``out`` holds a checkpoint) until ``config.steps`` steps are done.

    On resume the checkpoint's config (and VAE) is used, except ``steps`` and ``ckpt_every``.
    ``stop_after``: stop (with a checkpoint) after this many steps of this call.
    """
    return train_flow(_SD3Trainer, config, out, progress=progress, stop_after=stop_after)


def load_sd3_checkpoint(out: str | Path) -> _SD3Trainer:
    """The trainer state stored in ``out/checkpoint.pt``."""
    return load_flow_checkpoint(_SD3Trainer, out)


def export_sd3_checkpoint(out: str | Path, folder: str | Path, ema: bool = True) -> dict[str, int]:
    """Write a checkpoint's (EMA) weights as safetensors + config.json (see :func:`~.sd3.save_sd3_weights`)."""
    return export_flow_checkpoint(load_sd3_checkpoint(out), folder, ema=ema)


def sd3_pipeline_from_checkpoint(out: str | Path, ema: bool = True):
    """A ``StableDiffusion3Pipeline`` straight from a checkpoint (EMA weights, stock processors)."""
    return flow_pipeline_from_trainer(load_sd3_checkpoint(out), ema=ema)


def flow_main(description: str, config_class: type, train_fn, export_fn, argv: list[str] | None = None) -> None:
    """The training command of a flow-matching toy (SD3 or Flux): ``config_class`` is its train config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="run folder (checkpoint.pt); resumes when it holds one")
    parser.add_argument("--steps", type=int, default=config_class.steps, help="steps in total")
    parser.add_argument("--batch-size", type=int, default=config_class.batch_size)
    parser.add_argument("--lr", type=float, default=config_class.lr)
    parser.add_argument("--seed", type=int, default=config_class.seed)
    parser.add_argument("--ckpt-every", type=int, default=config_class.ckpt_every, help="steps between checkpoints")
    parser.add_argument("--warmup-steps", type=int, default=config_class.warmup_steps)
    parser.add_argument("--init-from", default=None,
                        help="an exported weights folder to start from (a fine-tuning stage: new optimiser and EMA)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of the default")
    parser.add_argument("--export", default=None, help="after training, export the EMA weights to this folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    model = config_class.model_class.tiny() if args.tiny else config_class.model_class()
    config = config_class(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          ckpt_every=args.ckpt_every, warmup_steps=args.warmup_steps, init_from=args.init_from,
                          model=model)
    run_cli(train_fn, export_fn, config, args)


def main(argv: list[str] | None = None) -> None:
    flow_main(__doc__.split("\n\n")[0], SD3TrainConfig, train_sd3, export_sd3_checkpoint, argv)


if __name__ == "__main__":
    main()
