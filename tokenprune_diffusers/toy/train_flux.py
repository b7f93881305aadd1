"""Seeded, resumable flow-matching training of the Flux-shaped toy (:mod:`~tokenprune_diffusers.toy.flux`).

    python -m tokenprune_diffusers.toy.train_flux --out runs/toy_flux --steps 2000 \
        --export tokenprune_diffusers/toy/weights_flux

The loop, seeding, EMA, checkpoints and CLI are the SD3 toy's (:mod:`~.train_sd3`; this trainer
subclasses its): the transformer, the CLIP encoder (pooled prompt) and the T5 encoder (text stream)
train jointly on the rectified-flow loss ``x_t = (1 - s) x0 + s e``, ``s = sigmoid(n)``, ``n ~ N(0, 1)``,
the transformer predicting ``e - x0`` on the 2x2-packed latents at timestep ``s`` (Flux's transformer
takes ``t / 1000``). The text is what ``FluxPipeline.encode_prompt`` builds at
``max_sequence_length`` (:data:`~.flux.FLUX_MAX_SEQUENCE_LENGTH` positions: the caption's T5 tokens,
``</s>``, then padding, T5 run without an attention mask), so training sees the padding as
inference does. No caption dropout (``cond_drop`` 0): the toy has no guidance embedding and is
sampled without classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from .flux import FluxToyConfig, assemble_flux_pipeline, build_flux_models, save_flux_weights
from .train_sd3 import (
    SD3TrainConfig,
    _SD3Trainer,
    export_flow_checkpoint,
    flow_main,
    flow_pipeline_from_trainer,
    load_flow_checkpoint,
    train_flow,
)

__all__ = ["FluxTrainConfig", "train_flux", "load_flux_checkpoint", "export_flux_checkpoint",
           "flux_pipeline_from_checkpoint", "main"]


@dataclass
class FluxTrainConfig(SD3TrainConfig):
    """Hyper-parameters of a Flux-toy training run (stored in its checkpoint)."""

    steps: int = 2000
    cond_drop: float = 0.0  # no classifier-free guidance (no guidance embedding, no true CFG)
    model: FluxToyConfig = field(default_factory=FluxToyConfig)
    model_class: ClassVar[type] = FluxToyConfig


class _FluxTrainer(_SD3Trainer):
    """The SD3 toy's trainer with the Flux toy's networks and loss."""

    name = "toy-flux"
    config_class = FluxTrainConfig

    def build(self, config: FluxTrainConfig, vae) -> None:
        from .model import load_toy_pipeline

        toy = load_toy_pipeline()  # the UNet toy: its VAE (frozen) and text encoder (initialisation)
        self.vae, self.text_encoder, self.text_encoder_2, self.transformer = build_flux_models(
            config.model, seed=config.seed, vae=vae if vae is not None else toy.vae, init_text=toy.text_encoder
        )
        self.pipe = self.assemble((self.vae, self.text_encoder, self.text_encoder_2, self.transformer))

    @staticmethod
    def load_exported(folder: str | Path):
        from .flux import load_flux_pipeline

        return load_flux_pipeline(folder)

    def new_models(self):
        return build_flux_models(self.config.model, seed=self.config.seed, vae=self.vae)

    def assemble(self, models):
        return assemble_flux_pipeline(*models, self.config.model)

    def save(self, models, folder: str | Path) -> dict[str, int]:
        return save_flux_weights(models, folder, self.config.model)

    @staticmethod
    def stock_processor():
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return FluxAttnProcessor()

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
        c, h, w = x0.shape[1:]
        pack = self.pipe._pack_latents  # diffusers' own packing (static): (B, C, H, W) -> (B, HW/4, 4C)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)  # (HW/4, 3)
        embeds, pooled, txt_ids = self.pipe.encode_prompt(
            captions, None, device=torch.device("cpu"), max_sequence_length=self.config.model.max_sequence_length,
        )  # (B, L, D), (B, P), (L, 3)
        pred = self.transformer(hidden_states=pack(xt, b, c, h, w), timestep=sigma, pooled_projections=pooled,
                                encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, guidance=None).sample
        return F.mse_loss(pred, pack(noise - x0, b, c, h, w))


def train_flux(config: FluxTrainConfig, out: str | Path, progress: bool = True, stop_after: int | None = None) -> _FluxTrainer:
    """Train (or resume, when ``out`` holds a checkpoint) until ``config.steps`` steps are done.

    On resume the checkpoint's config (and VAE) is used, except ``steps`` and ``ckpt_every``.
    ``stop_after``: stop (with a checkpoint) after this many steps of this call.
    """
    return train_flow(_FluxTrainer, config, out, progress=progress, stop_after=stop_after)


def load_flux_checkpoint(out: str | Path) -> _FluxTrainer:
    """The trainer state stored in ``out/checkpoint.pt``."""
    return load_flow_checkpoint(_FluxTrainer, out)


def export_flux_checkpoint(out: str | Path, folder: str | Path, ema: bool = True) -> dict[str, int]:
    """Write a checkpoint's (EMA) weights as safetensors + config.json (see :func:`~.flux.save_flux_weights`)."""
    return export_flow_checkpoint(load_flux_checkpoint(out), folder, ema=ema)


def flux_pipeline_from_checkpoint(out: str | Path, ema: bool = True):
    """A ``FluxPipeline`` straight from a checkpoint (EMA weights, stock processors)."""
    return flow_pipeline_from_trainer(load_flux_checkpoint(out), ema=ema)


def main(argv: list[str] | None = None) -> None:
    flow_main(__doc__.split("\n\n")[0], FluxTrainConfig, train_flux, export_flux_checkpoint, argv)


if __name__ == "__main__":
    main()
