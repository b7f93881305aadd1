"""The toy text-to-image model: a tiny Stable-Diffusion-shaped VAE, UNet and CLIP text encoder.

Shapes (32x32 RGB images, 8x8x4 latents, 77 tokens of width 64):

- ``AutoencoderKL`` 32x32x3 -> 8x8x4 (three encoder blocks, two downsamplings), ~0.24M parameters;
- ``UNet2DConditionModel`` on 8x8x4 latents with cross-attention at both resolutions, ~1.35M;
- ``CLIPTextModel`` of width 64 and 2 layers over the real CLIP vocabulary (49,408 ids), with the
  real CLIP tokenizer (:func:`~tokenprune_diffusers.tokenizer.load_clip_tokenizer`).

:func:`assemble_pipeline` puts them into a standard diffusers ``StableDiffusionPipeline``, so that
token pruning runs on exactly the code path users run. :func:`save_weights` /
:func:`load_toy_pipeline` store and load them as safetensors plus JSON configs; only the rows of
the token-embedding table that training touched (the data set's words) are stored, the others
load as zeros, which keeps the files at a few MB.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._atomic import atomic_path

__all__ = [
    "ToyModelConfig",
    "WEIGHTS_DIR",
    "build_models",
    "assemble_pipeline",
    "data_token_ids",
    "save_weights",
    "load_toy_pipeline",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # the committed, trained weights
EMBEDDING_SUFFIX = "embeddings.token_embedding.weight"  # key prefix differs across transformers versions


def _default_vae() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,  # 32 -> 16 -> 8
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=1.0,  # replaced by 1 / std(latents) after the VAE is trained
    )


def _default_unet() -> dict:
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],  # 8x8, 4x4
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[48, 64],
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=64,  # = text hidden_size
        norm_num_groups=16,
    )


def default_text_config() -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _default_scheduler() -> dict:
    # Stable Diffusion's noise schedule (training and sampling share it)
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@dataclass
class ToyModelConfig:
    """Constructor arguments of the three networks and the noise schedule (JSON-serialisable)."""

    vae: dict = field(default_factory=_default_vae)  # diffusers AutoencoderKL(**vae)
    unet: dict = field(default_factory=_default_unet)  # diffusers UNet2DConditionModel(**unet)
    text: dict = field(default_factory=default_text_config)  # transformers CLIPTextConfig(**text)
    scheduler: dict = field(default_factory=_default_scheduler)  # DDPM (training) / DPM-Solver (sampling)

    def __post_init__(self) -> None:
        if self.unet["cross_attention_dim"] != self.text["hidden_size"]:
            raise ValueError(
                f"unet cross_attention_dim ({self.unet['cross_attention_dim']}) must equal "
                f"text hidden_size ({self.text['hidden_size']})"
            )
        if self.unet["in_channels"] != self.vae["latent_channels"]:
            raise ValueError(
                f"unet in_channels ({self.unet['in_channels']}) must equal vae latent_channels ({self.vae['latent_channels']})"
            )

    @classmethod
    def tiny(cls) -> ToyModelConfig:
        """An even smaller model for tests (trains a few steps in about a second)."""
        vae = _default_vae() | dict(block_out_channels=[8, 8, 8], norm_num_groups=4)
        unet = _default_unet() | dict(block_out_channels=[16, 16], norm_num_groups=8, cross_attention_dim=16)
        text = default_text_config() | dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        return cls(vae=vae, unet=unet, text=text)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed module initialisation without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_models(config: ToyModelConfig, seed: int = 0):
    """(vae, text_encoder, unet) with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with seeded(seed):
        vae = AutoencoderKL(**config.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**config.text))
        unet = UNet2DConditionModel(**config.unet)
    return vae, text_encoder, unet


def assemble_pipeline(vae, text_encoder, unet, scheduler_config: dict | None = None, tokenizer=None):
    """A standard ``StableDiffusionPipeline`` (DPM-Solver++ sampler, no safety checker), eval mode."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ..tokenizer import load_clip_tokenizer

    scheduler = DPMSolverMultistepScheduler(**(scheduler_config or _default_scheduler()))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer if tokenizer is not None else load_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def data_texts() -> list[str]:
    """Every word and phrase the toy data set's captions are made of."""
    from .data import COLORS, DISTRACTORS, POSITION_PHRASES, SHAPES, SIZES

    words = ["a", "and", ","] + list(COLORS) + list(SHAPES) + list(SIZES) + list(POSITION_PHRASES.values())
    return [*words, *DISTRACTORS, ", ".join(DISTRACTORS)]


def data_token_ids(tokenizer=None) -> list[int]:
    """Every token id the toy data set's captions (and the empty prompt) can contain, sorted."""
    from ..tokenizer import load_clip_tokenizer

    tok = tokenizer if tokenizer is not None else load_clip_tokenizer()
    ids: set[int] = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}
    for text in data_texts():
        ids.update(tok(text).input_ids)
    return sorted(ids)


def embedding_key(state: dict) -> str:
    keys = [k for k in state if k.endswith(EMBEDDING_SUFFIX)]
    if len(keys) != 1:
        raise KeyError(f"expected one token-embedding key ending in {EMBEDDING_SUFFIX!r}, found {keys}")
    return keys[0]


def shrink_embeddings(text_state: dict, token_ids: list[int], key: str | None = None) -> dict:
    """A copy of a text encoder's state dict keeping only the ``token_ids`` rows of its token
    embedding (``key``; default: the CLIP one, see :func:`embedding_key`) plus ``stored_token_ids``;
    :func:`expand_embeddings` undoes it (other rows zero)."""
    state = {k: v.detach().clone().contiguous() for k, v in text_state.items()}
    key = key or embedding_key(state)
    ids = torch.tensor(token_ids, dtype=torch.int64)  # (V_used,)
    state[key] = state[key][ids].contiguous()  # (V_used, hidden)
    state["stored_token_ids"] = ids
    return state


def expand_embeddings(stored: dict, vocab_size: int, key: str | None = None) -> dict:
    """The full state dict from :func:`shrink_embeddings`' output: rows not stored are zeros."""
    state = dict(stored)
    ids = state.pop("stored_token_ids")  # (V_used,)
    key = key or embedding_key(state)
    rows = state[key]  # (V_used, hidden)
    full = torch.zeros(vocab_size, rows.shape[1], dtype=rows.dtype)  # (V, hidden)
    full[ids] = rows
    state[key] = full
    return state

def save_weights(pipe_or_models, folder: str | Path, config: ToyModelConfig, token_ids: list[int]) -> dict[str, int]:
    """Write ``{vae,unet,text_encoder}.safetensors`` and ``config.json`` into ``folder``.

    Args:
        pipe_or_models: a pipeline, or a (vae, text_encoder, unet) tuple.
        config: the model config (the VAE's ``scaling_factor`` is taken from the VAE itself).
        token_ids: the embedding rows to store (see :func:`data_token_ids`); the rest load as zeros.

    Returns:
        File name -> size in bytes.
    """
    from safetensors.torch import save_file

    if isinstance(pipe_or_models, tuple):
        vae, text_encoder, unet = pipe_or_models
    else:
        vae, text_encoder, unet = pipe_or_models.vae, pipe_or_models.text_encoder, pipe_or_models.unet
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_state = shrink_embeddings(text_encoder.state_dict(), token_ids)
    states = {
        "vae.safetensors": vae.state_dict(),
        "unet.safetensors": unet.state_dict(),
        "text_encoder.safetensors": text_state,
    }
    sizes = {}
    for name, state in states.items():
        with atomic_path(folder / name) as tmp:
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))
        sizes[name] = (folder / name).stat().st_size
    meta = dict(
        vae=dict(config.vae, scaling_factor=float(vae.config.scaling_factor)),
        unet=config.unet,
        text=config.text,
        scheduler=config.scheduler,
    )
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    sizes["config.json"] = (folder / "config.json").stat().st_size
    return sizes


def load_toy_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32, kind: str = "unet"):
    """The trained toy model, loaded offline: a ``StableDiffusionPipeline`` (``kind="unet"``, the
    default), the SD3-shaped MM-DiT toy as a ``StableDiffusion3Pipeline`` (``kind="sd3"``, see
    :mod:`~tokenprune_diffusers.toy.sd3`) or the Flux-shaped one as a ``FluxPipeline``
    (``kind="flux"``, see :mod:`~tokenprune_diffusers.toy.flux`).

    Args:
        folder: a folder written by :func:`save_weights` (or :func:`~.sd3.save_sd3_weights`);
            default: the weights of that kind shipped in the package.
        dtype: parameter dtype of the returned pipeline.
        kind: "unet", "sd3" or "flux".

    Raises:
        FileNotFoundError: when the folder lacks the weights (they have not been trained/exported).
        ValueError: for another ``kind``.
    """
    from safetensors.torch import load_file

    if kind == "sd3":
        from .sd3 import load_sd3_pipeline

        return load_sd3_pipeline(folder, dtype=dtype)
    if kind == "flux":
        from .flux import load_flux_pipeline

        return load_flux_pipeline(folder, dtype=dtype)
    if kind != "unet":
        raise ValueError(f"unknown toy kind {kind!r}; expected 'unet', 'sd3' or 'flux'")

    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    needed = ["config.json", "vae.safetensors", "unet.safetensors", "text_encoder.safetensors"]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"toy model weights missing in {folder}: {', '.join(missing)}. Train and export them with "
            "`python -m tokenprune_diffusers.toy.train --out DIR --steps N --export "
            f"{WEIGHTS_DIR}`"
        )
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = ToyModelConfig(vae=meta["vae"], unet=meta["unet"], text=meta["text"], scheduler=meta["scheduler"])
    vae, text_encoder, unet = build_models(config, seed=0)
    vae.load_state_dict(load_file(str(folder / "vae.safetensors")))
    unet.load_state_dict(load_file(str(folder / "unet.safetensors")))
    text_encoder.load_state_dict(expand_embeddings(load_file(str(folder / "text_encoder.safetensors")), config.text["vocab_size"]))
    pipe = assemble_pipeline(vae, text_encoder, unet, scheduler_config=config.scheduler)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
