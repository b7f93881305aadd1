"""The Flux-shaped toy model: a tiny Flux transformer on the toy's 8x8x4 latents, in a ``FluxPipeline``.

- ``FluxTransformer2DModel`` on the 8x8x4 latents packed 2x2 as Flux packs them (16 image tokens of
  16 channels), double-stream (joint) and single-stream blocks in Flux's 1:2 ratio, no guidance
  embedding (``guidance_embeds=False``: nothing to distil a guidance scale from; the pipeline then
  ignores ``guidance_scale``, and the toy is sampled without classifier-free guidance);
- the text stream is a small ``T5EncoderModel`` (gated-GELU, relative position buckets as T5 v1.1)
  over :func:`~tokenprune_diffusers.models.t5_shaped_tokenizer` (T5's id layout: the words,
  ``</s>``, then ``<pad>`` up to ``max_sequence_length``); ``FluxPipeline`` runs it WITHOUT an
  attention mask, as it runs T5-XXL, so the padding outputs can carry the prompt. The toy is trained
  and meant to be run at ``max_sequence_length=``:data:`FLUX_MAX_SEQUENCE_LENGTH` (Flux pads to 512;
  the toy's captions are at most ~25 T5 tokens, so most of the sequence is padding, as on Flux);
- the pooled prompt is the UNet toy's ``CLIPTextModel`` (``pooler_output``), trained on from it;
  the T5 word embeddings are the UNet toy's CLIP word embeddings (same width), frozen;
- the trained UNet toy's VAE, frozen (``shift_factor`` 0.0);
- ``FlowMatchEulerDiscreteScheduler`` (rectified flow, shift 1.0, no dynamic shifting: the
  latents are tiny), as the SD3 toy's.

The pipeline's ``default_sample_size`` is set to 8, so ``pipe(prompt)`` makes 32 px images.
:func:`save_flux_weights` / :func:`load_flux_pipeline` store and load it as safetensors plus a JSON
config (only the touched token-embedding rows); ``load_toy_pipeline(kind="flux")`` calls the latter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._atomic import atomic_path, atomic_write_text
from .model import (
    WEIGHTS_DIR,
    data_texts,
    data_token_ids,
    default_text_config,
    expand_embeddings,
    seeded,
    shrink_embeddings,
)
from .sd3 import default_flow_scheduler, read_weights_folder

__all__ = [
    "FluxToyConfig",
    "FLUX_WEIGHTS_DIR",
    "FLUX_MAX_SEQUENCE_LENGTH",
    "build_flux_models",
    "assemble_flux_pipeline",
    "flux_token_ids",
    "save_flux_weights",
    "load_flux_pipeline",
]

FLUX_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights_flux"  # the committed, trained weights
FLUX_MAX_SEQUENCE_LENGTH = 128  # T5 positions the toy is trained and run with (Flux: 512)
_T5_EMBEDDING = "shared.weight"  # T5EncoderModel's token embedding (encoder.embed_tokens is tied to it)
_T5_TIED = "encoder.embed_tokens.weight"
_FILES = ("vae", "transformer", "text_encoder", "text_encoder_2")


def _default_transformer() -> dict:
    return dict(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2: 16 image tokens
        num_layers=2,  # double-stream (joint) blocks
        num_single_layers=4,  # single-stream blocks (Flux: 19 and 38)
        attention_head_dim=24,
        num_attention_heads=4,  # inner width 96
        joint_attention_dim=64,  # = the T5 width
        pooled_projection_dim=64,  # = the CLIP width
        guidance_embeds=False,
        axes_dims_rope=(4, 10, 10),  # sums to attention_head_dim
    )


def _default_t5() -> dict:
    return dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


@dataclass
class FluxToyConfig:
    """Constructor arguments of the transformer, the two text encoders and the scheduler (JSON-serialisable)."""

    transformer: dict = field(default_factory=_default_transformer)  # FluxTransformer2DModel(**transformer)
    text: dict = field(default_factory=default_text_config)  # CLIPTextConfig(**text): the pooled prompt
    t5: dict = field(default_factory=_default_t5)  # T5Config(vocab_size=len(tokenizer_2), **t5): the text stream
    scheduler: dict = field(default_factory=default_flow_scheduler)  # FlowMatchEulerDiscreteScheduler(**scheduler)
    max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH

    def __post_init__(self) -> None:
        t = self.transformer
        if sum(t["axes_dims_rope"]) != t["attention_head_dim"]:
            raise ValueError(f"transformer axes_dims_rope {t['axes_dims_rope']} must sum to attention_head_dim "
                             f"({t['attention_head_dim']})")
        if t["joint_attention_dim"] != self.t5["d_model"]:
            raise ValueError(f"transformer joint_attention_dim ({t['joint_attention_dim']}) must equal the T5 width "
                             f"({self.t5['d_model']})")
        if t["pooled_projection_dim"] != self.text["hidden_size"]:
            raise ValueError(f"transformer pooled_projection_dim ({t['pooled_projection_dim']}) must equal the CLIP "
                             f"width ({self.text['hidden_size']})")
        if self.t5["d_model"] != self.text["hidden_size"]:
            raise ValueError(f"T5 d_model ({self.t5['d_model']}) must equal the CLIP width ({self.text['hidden_size']}): "
                             "the T5 word embeddings are the CLIP toy's")
        if isinstance(self.max_sequence_length, bool) or not isinstance(self.max_sequence_length, int) \
                or not 32 <= self.max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be an int in [32, 512], got {self.max_sequence_length!r}")

    @classmethod
    def tiny(cls) -> FluxToyConfig:
        """An even smaller model for tests (a training step in a fraction of a second)."""
        transformer = _default_transformer() | dict(num_layers=1, num_single_layers=2, attention_head_dim=8,
                                                    num_attention_heads=2, axes_dims_rope=(2, 2, 4))
        return cls(transformer=transformer, t5=_default_t5() | dict(num_layers=1, d_ff=32), max_sequence_length=32)


def flux_tokenizer(config: FluxToyConfig):
    """The T5-shaped tokenizer of the toy (word-level over the CLIP vocabulary's words, offline)."""
    from ..models import t5_shaped_tokenizer

    words = [w for text in data_texts() for w in re.findall(r"\w+|[^\w\s]+", text.lower())]
    return t5_shaped_tokenizer(config.max_sequence_length, extra_words=tuple(words))  # e.g. "cyan": no CLIP word


def _t5_from_clip_embeddings(t5, clip, tokenizer) -> None:
    """Copy the CLIP encoder's word embeddings into the T5 rows of the same words (``</s>`` gets
    CLIP's end token, ``<pad>`` its start token, a word that is no CLIP word the sum of its CLIP pieces)."""
    from ..tokenizer import load_clip_tokenizer

    clip_tok = load_clip_tokenizer()
    source = clip.get_input_embeddings().weight  # (V_clip, D)
    target = t5.get_input_embeddings().weight  # (V_t5, D)
    clip_vocab = clip_tok.get_vocab()
    vocab = tokenizer.get_vocab()
    pairs = [(i, clip_vocab[w + "</w>"]) for w, i in vocab.items() if w + "</w>" in clip_vocab]
    pairs += [(tokenizer.eos_token_id, clip_tok.eos_token_id), (tokenizer.pad_token_id, clip_tok.bos_token_id)]
    t5_ids, clip_ids = (torch.tensor(x) for x in zip(*pairs))
    with torch.no_grad():
        target[t5_ids] = source[clip_ids]
        for text in data_texts():
            for w in re.findall(r"\w+|[^\w\s]+", text.lower()):
                if w + "</w>" not in clip_vocab and w in vocab:
                    pieces = clip_tok(w, add_special_tokens=False).input_ids
                    target[vocab[w]] = source[pieces].sum(0)


def build_flux_models(config: FluxToyConfig, seed: int = 0, vae=None, init_text=None):
    """(vae, text_encoder, text_encoder_2, transformer) with seeded random weights.

    Args:
        vae: the (trained) VAE to use; default: the UNet toy's shipped VAE.
        init_text: a ``CLIPTextModel`` (the UNet toy's, for training) whose weights the CLIP encoder
            starts from and whose word embeddings the T5 encoder gets; None keeps both random (loading).
    """
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if vae is None:
        from .model import load_toy_pipeline

        vae = load_toy_pipeline(WEIGHTS_DIR).vae
    vae.register_to_config(shift_factor=0.0)
    tokenizer = flux_tokenizer(config)
    with seeded(seed):
        clip = CLIPTextModel(CLIPTextConfig(**config.text))
        t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **config.t5))
        transformer = FluxTransformer2DModel(**config.transformer)
    if init_text is not None:
        clip.load_state_dict(init_text.state_dict())
        _t5_from_clip_embeddings(t5, clip, tokenizer)
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae.eval(), clip, t5, transformer


def assemble_flux_pipeline(vae, text_encoder, text_encoder_2, transformer, config: FluxToyConfig | None = None):
    """A standard ``FluxPipeline`` around these parts (32 px by default), eval mode, progress bar off."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from ..tokenizer import load_clip_tokenizer

    config = config or FluxToyConfig()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**config.scheduler),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=flux_tokenizer(config),
        transformer=transformer.eval(),
    )
    pipe.default_sample_size = 8  # 8 latent pixels x vae_scale_factor 4 = 32 px
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_token_ids(config: FluxToyConfig | None = None) -> tuple[list[int], list[int]]:
    """(CLIP ids, T5 ids) the toy's captions can contain through the two tokenizers."""
    return data_token_ids(), data_token_ids(flux_tokenizer(config or FluxToyConfig()))


def _t5_state(t5) -> dict:
    return {k: v for k, v in t5.state_dict().items() if k != _T5_TIED}  # the tied copy is not stored


def save_flux_weights(models, folder: str | Path, config: FluxToyConfig) -> dict[str, int]:
    """Write ``{vae,transformer,text_encoder,text_encoder_2}.safetensors`` and ``config.json``.

    Args:
        models: a (vae, text_encoder, text_encoder_2, transformer) tuple, or a pipeline.

    Returns:
        File name -> size in bytes.
    """
    from safetensors.torch import save_file

    if not isinstance(models, tuple):
        models = (models.vae, models.text_encoder, models.text_encoder_2, models.transformer)
    vae, clip, t5, transformer = models
    clip_ids, t5_ids = flux_token_ids(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    states = {"vae": vae.state_dict(), "transformer": transformer.state_dict(),
              "text_encoder": shrink_embeddings(clip.state_dict(), clip_ids),
              "text_encoder_2": shrink_embeddings(_t5_state(t5), t5_ids, key=_T5_EMBEDDING)}
    sizes = {}
    for name, state in states.items():
        with atomic_path(folder / f"{name}.safetensors") as tmp:
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))
        sizes[f"{name}.safetensors"] = (folder / f"{name}.safetensors").stat().st_size
    vae_config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    meta = dict(vae=vae_config, transformer=config.transformer, text=config.text, t5=config.t5,
                scheduler=config.scheduler, max_sequence_length=config.max_sequence_length)
    atomic_write_text(folder / "config.json", json.dumps(meta, indent=2) + "\n")
    sizes["config.json"] = (folder / "config.json").stat().st_size
    return sizes


def load_flux_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The trained Flux toy as a ``FluxPipeline``, loaded offline (run it with
    ``max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH``, as trained).

    Raises:
        FileNotFoundError: when the folder lacks the weights (they have not been trained/exported).
    """
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else FLUX_WEIGHTS_DIR
    meta = read_weights_folder(folder, _FILES, "Flux", "train_flux", FLUX_WEIGHTS_DIR)
    config = FluxToyConfig(**{k: v for k, v in meta.items() if k != "vae"})
    vae = AutoencoderKL.from_config(meta["vae"])
    vae.load_state_dict(load_file(str(folder / "vae.safetensors")))
    vae, clip, t5, transformer = build_flux_models(config, seed=0, vae=vae)
    transformer.load_state_dict(load_file(str(folder / "transformer.safetensors")))
    clip.load_state_dict(expand_embeddings(load_file(str(folder / "text_encoder.safetensors")), config.text["vocab_size"]))
    t5_state = expand_embeddings(load_file(str(folder / "text_encoder_2.safetensors")), t5.config.vocab_size,
                                 key=_T5_EMBEDDING)
    t5.load_state_dict(t5_state | {_T5_TIED: t5_state[_T5_EMBEDDING]})
    pipe = assemble_flux_pipeline(vae, clip, t5, transformer, config)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
