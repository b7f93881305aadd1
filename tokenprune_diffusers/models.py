"""Offline pipelines: published Stable Diffusion architectures with seeded random weights.

No weights can be downloaded on our machines, so the demo, tests and speed benchmarks build the
real architectures from their published configs (``runwayml/stable-diffusion-v1-5`` and
``stabilityai/stable-diffusion-xl-base-1.0``) with random weights. Speed and memory do not depend on
the weights; image quality does, so these pipelines are for speed, shapes and plumbing only.

Weight initialisation draws from a forked RNG seeded with ``seed``: building a pipeline never
disturbs the caller's global random state, and the same seed gives the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "SD15_UNET_CONFIG",
    "SD15_VAE_CONFIG",
    "SD15_TEXT_CONFIG",
    "SD15_SCHEDULER_CONFIG",
    "SDXL_UNET_CONFIG",
    "TINY_UNET_CONFIG",
    "build_unet",
    "sd15_pipeline",
    "tiny_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_sd3_pipeline",
    "assemble_sd3_pipeline",
    "tiny_flux_pipeline",
    "t5_shaped_tokenizer",
]

# runwayml/stable-diffusion-v1-5, unet/config.json (860M parameters)
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
)

# runwayml/stable-diffusion-v1-5, vae/config.json
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# openai/clip-vit-large-patch14, text tower (SD-1.x's text encoder)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

# runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json (PNDM). ``clip_sample=False`` is
# in the published file: PNDM ignores it, but a scheduler swapped in with ``from_config`` (DDIM,
# whose own default is True) reads it. Clipping the predicted x0 to [-1, 1] at every step is wrong
# for SD latents, and with random weights (x0 far beyond +-1) it makes any small change to the
# noise prediction (DeepCache, gating) end in unrelated final latents (~8 dB against stock).
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.6B parameters)
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)

# A tiny SD-1.x-shaped UNet in the spirit of diffusers' own tests (~0.4M parameters)
TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=32,
)

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
)

TINY_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed module initialisation without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_unet(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``UNet2DConditionModel`` from a config dict with seeded random weights."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        unet = UNet2DConditionModel(**config)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval()


def _pipeline(unet_cfg: dict, vae_cfg: dict, text_cfg: dict, seed: int, dtype: torch.dtype):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import load_clip_tokenizer

    with _seeded(seed):
        unet = build_unet(unet_cfg, seed=seed)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),  # keeps clip_sample for a swap
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def sd15_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionPipeline`` with the SD-1.5 architecture and seeded random weights.

    UNet, VAE and CLIP text encoder are built from their published configs; the tokenizer is the
    real CLIP tokenizer (:func:`~tokenprune_diffusers.tokenizer.load_clip_tokenizer`). About 1.07B
    parameters (4.3 GB in fp32); building takes ~20 s on 2 CPU cores. Use it for speed and plumbing:
    random weights follow no prompt.
    """
    return _pipeline(SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG, seed, dtype)


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny SD-1.x-shaped ``StableDiffusionPipeline`` (seconds to build and run; for tests)."""
    return _pipeline(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG, seed, dtype)


# A tiny SDXL-shaped UNet (added text/time conditions, two text encoders), as in diffusers' SDXL tests
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled text
    cross_attention_dim=64,  # 32 + 32 from the two text encoders
    norm_num_groups=1,
)


def tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny SDXL-shaped ``StableDiffusionXLPipeline`` (two text encoders, added conditions; for tests)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import load_clip_tokenizer

    text_cfg = CLIPTextConfig(**{**TINY_TEXT_CONFIG, "projection_dim": 32, "hidden_act": "gelu"})
    with _seeded(seed):
        unet = build_unet(TINY_SDXL_UNET_CONFIG, seed=seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        text_encoder = CLIPTextModel(text_cfg)
        text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
        ),
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


TINY_SD3_TRANSFORMER_CONFIG = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    caption_projection_dim=32,
    joint_attention_dim=32,
    pooled_projection_dim=64,  # 32 + 32 pooled from the two CLIP encoders
    out_channels=4,
    pos_embed_max_size=32,
)


def tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny SD3-shaped ``StableDiffusion3Pipeline`` with the T5 slot empty (for tests): the text
    sequence is 77 CLIP positions plus the 256 zero positions the pipeline adds for T5."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_cfg = CLIPTextConfig(**{**TINY_TEXT_CONFIG, "projection_dim": 32, "hidden_act": "gelu"})
    with _seeded(seed):
        transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER_CONFIG)
        vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False})
        text_encoder = CLIPTextModelWithProjection(text_cfg)
        text_encoder_2 = CLIPTextModelWithProjection(text_cfg)
    pipe = assemble_sd3_pipeline(transformer, vae, text_encoder, text_encoder_2, FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def assemble_sd3_pipeline(transformer, vae, text_encoder, text_encoder_2, scheduler):
    """A ``StableDiffusion3Pipeline`` around these parts with the real CLIP tokenizers (offline) and
    the T5 slot empty: the text sequence is 77 CLIP positions plus the pipeline's zero T5 positions."""
    from diffusers import StableDiffusion3Pipeline

    from .tokenizer import load_clip_tokenizer

    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        text_encoder_3=None,
        tokenizer_3=None,
    )


TINY_FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels packed 2x2
    num_layers=1,  # double-stream (joint) blocks
    num_single_layers=2,  # single-stream blocks (text and image concatenated)
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,  # = the T5 width
    pooled_projection_dim=32,  # = the CLIP width
    guidance_embeds=False,
    axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
)

TINY_T5_CONFIG = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                      dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def t5_shaped_tokenizer(max_length: int = 512, extra_words: tuple[str, ...] = ()):
    """A tokenizer with T5's layout, built offline: no start token, ``</s>`` (id 1) after the words,
    ``<pad>`` (id 0) after it. Its vocabulary is the whole words of the CLIP vocabulary (word-level,
    lower-cased), then the ``extra_words`` not among them (after all others: the ids of the CLIP
    words do not change); the real T5 tokenizer is a SentencePiece model that cannot be downloaded
    here. For Flux-shaped test and benchmark pipelines, where only the id layout matters, and the
    Flux toy."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from .tokenizer import load_clip_tokenizer

    words = sorted(w[: -len("</w>")] for w in load_clip_tokenizer().get_vocab() if w.endswith("</w>") and len(w) > 4)
    words = list(dict.fromkeys(words))
    known = set(words)
    words += [w for w in dict.fromkeys(w.lower() for w in extra_words) if w not in known]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, max_sequence_length: int = 512):
    """A tiny Flux-shaped ``FluxPipeline`` (for tests): a CLIP text encoder for the pooled prompt, a
    T5 encoder for the text stream (512 positions, the pipeline's default, T5's id layout from
    :func:`t5_shaped_tokenizer`), one double-stream and two single-stream blocks."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .tokenizer import load_clip_tokenizer

    tokenizer_2 = t5_shaped_tokenizer(max_sequence_length)
    with _seeded(seed):
        transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG)
        vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "shift_factor": 0.1159, "scaling_factor": 0.3611,
                               "use_quant_conv": False, "use_post_quant_conv": False})
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT_CONFIG, "hidden_act": "gelu"}))
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **TINY_T5_CONFIG))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_clip_tokenizer(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
