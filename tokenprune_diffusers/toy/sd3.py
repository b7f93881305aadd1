"""The SD3-shaped toy model: a tiny MM-DiT on the toy's 8x8x4 latents, in a ``StableDiffusion3Pipeline``.

- ``SD3Transformer2DModel`` on 8x8x4 latents, patch size 1 (64 image tokens), joint attention over
  the image tokens and the text sequence the pipeline builds: 77 CLIP positions plus the zero
  positions it adds for the empty T5 slot (``max_sequence_length``, 256 by default);
- two ``CLIPTextModelWithProjection`` encoders (``text_encoder``, ``text_encoder_2``) of width 64
  over the real CLIP vocabulary with the real CLIP tokenizer (``tokenizer_2`` pads with ``"!"`` as
  SD3's does); their first two layers start from the trained UNet toy's text encoder;
- the trained UNet toy's VAE, frozen (``shift_factor`` 0.0);
- ``FlowMatchEulerDiscreteScheduler`` (rectified flow, shift 1.0: the latents are tiny).

:func:`save_sd3_weights` / :func:`load_sd3_pipeline` store and load it as safetensors plus a JSON
config (only the touched token-embedding rows, as for the UNet toy). ``load_toy_pipeline(kind="sd3")``
calls :func:`load_sd3_pipeline`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._atomic import atomic_path, atomic_write_text
from .model import (
    WEIGHTS_DIR,
    data_token_ids,
    default_text_config,
    expand_embeddings,
    seeded,
    shrink_embeddings,
)

__all__ = [
    "SD3ToyConfig",
    "SD3_WEIGHTS_DIR",
    "build_sd3_models",
    "assemble_sd3_pipeline",
    "sd3_token_ids",
    "save_sd3_weights",
    "load_sd3_pipeline",
]

SD3_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights_sd3"  # the committed, trained weights
_TEXT_NAMES = ("text_encoder", "text_encoder_2")
_FILES = ("vae", "transformer", *_TEXT_NAMES)


def _default_transformer() -> dict:
    return dict(
        sample_size=8,
        patch_size=1,  # 64 image tokens (8x8 latents)
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=24,
        num_attention_heads=4,  # inner width 96
        joint_attention_dim=128,  # the zero "T5" width; the two CLIP widths (64 + 64) fill it
        caption_projection_dim=96,  # = inner width
        pooled_projection_dim=128,  # two projections of 64
        pos_embed_max_size=8,
    )


def _default_sd3_text() -> dict:
    # the UNet toy's text encoder plus a third layer: SD3 reads the penultimate hidden state, which
    # is then the UNet toy's second layer's output
    return default_text_config() | dict(num_hidden_layers=3, projection_dim=64)


def default_flow_scheduler() -> dict:
    return dict(num_train_timesteps=1000, shift=1.0)


@dataclass
class SD3ToyConfig:
    """Constructor arguments of the transformer, the two text encoders and the scheduler (JSON-serialisable)."""

    transformer: dict = field(default_factory=_default_transformer)  # diffusers SD3Transformer2DModel(**transformer)
    text: dict = field(default_factory=_default_sd3_text)  # CLIPTextConfig(**text), both encoders
    scheduler: dict = field(default_factory=default_flow_scheduler)  # FlowMatchEulerDiscreteScheduler(**scheduler)

    def __post_init__(self) -> None:
        t, x = self.transformer, self.text
        inner = t["num_attention_heads"] * t["attention_head_dim"]
        if t["caption_projection_dim"] != inner:
            raise ValueError(f"transformer caption_projection_dim ({t['caption_projection_dim']}) must equal its width ({inner})")
        if t["joint_attention_dim"] < 2 * x["hidden_size"]:
            raise ValueError(
                f"transformer joint_attention_dim ({t['joint_attention_dim']}) must be >= the two CLIP widths "
                f"({2 * x['hidden_size']})"
            )
        if t["pooled_projection_dim"] != 2 * x["projection_dim"]:
            raise ValueError(
                f"transformer pooled_projection_dim ({t['pooled_projection_dim']}) must equal twice the text "
                f"projection_dim ({2 * x['projection_dim']})"
            )
        if x["num_hidden_layers"] < 2:
            raise ValueError(f"text num_hidden_layers must be >= 2 (SD3 reads the penultimate layer), got {x['num_hidden_layers']}")

    @classmethod
    def tiny(cls) -> SD3ToyConfig:
        """An even smaller model for tests (a training step in a fraction of a second)."""
        transformer = _default_transformer() | dict(
            num_layers=2, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16
        )
        return cls(transformer=transformer)


def build_sd3_models(config: SD3ToyConfig, seed: int = 0, vae=None, init_text=None):
    """(vae, text_encoder, text_encoder_2, transformer) with seeded random weights.

    Args:
        vae: the (trained) VAE to use; default: the UNet toy's shipped VAE.
        init_text: a ``CLIPTextModel`` whose weights initialise the first layers of both text
            encoders (the UNet toy's, for training); None keeps them random (loading).
    """
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if vae is None:
        from .model import load_toy_pipeline

        vae = load_toy_pipeline(WEIGHTS_DIR).vae
    vae.register_to_config(shift_factor=0.0)
    with seeded(seed):
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**config.text)) for _ in _TEXT_NAMES]
        transformer = SD3Transformer2DModel(**config.transformer)
    if init_text is not None:
        source = init_text.state_dict()
        for enc in encoders:  # the key prefix of CLIPTextModel differs across transformers versions
            body = enc.text_model
            mine = body.state_dict()
            source = {k.removeprefix("text_model."): v for k, v in source.items()}
            shared = {k: v for k, v in source.items() if k in mine and mine[k].shape == v.shape}
            if not shared:
                raise ValueError("init_text shares no weight with the SD3 toy's text encoders")
            body.load_state_dict(shared, strict=False)
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae.eval(), encoders[0], encoders[1], transformer


def assemble_sd3_pipeline(vae, text_encoder, text_encoder_2, transformer, scheduler_config: dict | None = None):
    """A standard ``StableDiffusion3Pipeline`` with the T5 slot empty, eval mode, progress bar off."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..models import assemble_sd3_pipeline as assemble

    scheduler = FlowMatchEulerDiscreteScheduler(**(scheduler_config or default_flow_scheduler()))
    pipe = assemble(transformer, vae, text_encoder, text_encoder_2, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_token_ids() -> list[int]:
    """The token ids the toy's captions can contain through either SD3 tokenizer (``"!"`` pads the second)."""
    from ..tokenizer import load_clip_tokenizer

    tok2 = load_clip_tokenizer(pad_token="!")
    return sorted(set(data_token_ids()) | set(data_token_ids(tok2)) | {tok2.pad_token_id})


def save_sd3_weights(models, folder: str | Path, config: SD3ToyConfig, token_ids: list[int]) -> dict[str, int]:
    """Write ``{vae,transformer,text_encoder,text_encoder_2}.safetensors`` and ``config.json``.

    Args:
        models: a (vae, text_encoder, text_encoder_2, transformer) tuple, or a pipeline.
        token_ids: the embedding rows to store (see :func:`sd3_token_ids`); the rest load as zeros.

    Returns:
        File name -> size in bytes.
    """
    from safetensors.torch import save_file

    if not isinstance(models, tuple):
        models = (models.vae, models.text_encoder, models.text_encoder_2, models.transformer)
    vae, te1, te2, transformer = models
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    states = {"vae": vae.state_dict(), "transformer": transformer.state_dict()}
    for name, enc in zip(_TEXT_NAMES, (te1, te2)):
        states[name] = shrink_embeddings(enc.state_dict(), token_ids)
    sizes = {}
    for name, state in states.items():
        with atomic_path(folder / f"{name}.safetensors") as tmp:
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))
        sizes[f"{name}.safetensors"] = (folder / f"{name}.safetensors").stat().st_size
    vae_config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    meta = dict(vae=vae_config, transformer=config.transformer, text=config.text, scheduler=config.scheduler)
    atomic_write_text(folder / "config.json", json.dumps(meta, indent=2) + "\n")
    sizes["config.json"] = (folder / "config.json").stat().st_size
    return sizes


def read_weights_folder(folder: Path, files: tuple[str, ...], kind: str, trainer: str, default: Path) -> dict:
    """The exported toy's ``config.json``, after checking that ``folder`` holds it and every
    ``<file>.safetensors``; a missing one is refused naming the files and how to make them."""
    needed = ["config.json", *(f"{n}.safetensors" for n in files)]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{kind} toy weights missing in {folder}: {', '.join(missing)}. Train and export them with "
            f"`python -m tokenprune_diffusers.toy.{trainer} --out DIR --export {default}`"
        )
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def load_sd3_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The trained SD3 toy as a ``StableDiffusion3Pipeline`` (T5 slot empty), loaded offline.

    Raises:
        FileNotFoundError: when the folder lacks the weights (they have not been trained/exported).
    """
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else SD3_WEIGHTS_DIR
    meta = read_weights_folder(folder, _FILES, "SD3", "train_sd3", SD3_WEIGHTS_DIR)
    config = SD3ToyConfig(transformer=meta["transformer"], text=meta["text"], scheduler=meta["scheduler"])
    vae = AutoencoderKL.from_config(meta["vae"])
    vae.load_state_dict(load_file(str(folder / "vae.safetensors")))
    vae, te1, te2, transformer = build_sd3_models(config, seed=0, vae=vae)
    transformer.load_state_dict(load_file(str(folder / "transformer.safetensors")))
    for name, enc in zip(_TEXT_NAMES, (te1, te2)):
        enc.load_state_dict(expand_embeddings(load_file(str(folder / f"{name}.safetensors")), config.text["vocab_size"]))
    pipe = assemble_sd3_pipeline(vae, te1, te2, transformer, scheduler_config=config.scheduler)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)

