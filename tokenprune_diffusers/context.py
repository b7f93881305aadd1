"""Finding out, from inside an attention processor, which generation is running.

A processor is called with tensors only: no timestep, no step index, no prompt. Every diffusers
pipeline, however, sets ``self._num_timesteps`` before its denoising loop and calls
``scheduler.set_timesteps`` (which makes a new ``scheduler.timesteps`` tensor) once per call. So,
once per UNet call, we walk up the Python stack to the running ``DiffusionPipeline.__call__`` and
read:

* the number of UNet calls of this generation (``_num_timesteps``: one per loop iteration, which
  for every SD/SDXL pipeline is one UNet call, also for schedulers such as Heun that visit a
  timestep twice);
* a key that changes with every new generation (the ``scheduler.timesteps`` object);
* the token ids of each batch row, re-tokenised from the call's ``prompt``, ``negative_prompt``
  and ``num_images_per_prompt`` with the pipeline's tokenizer, in the row order of SD/SDXL
  pipelines (negative prompts first under classifier-free guidance);
* the latent size, for the aspect ratio of attention maps.

Everything here is best effort and says so: when a value cannot be found it is ``None`` and the
processor falls back (and warns once).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from .scoring import PADDING, SPECIAL, WORD

__all__ = ["PipelineCall", "find_pipeline_call", "token_roles"]

_MAX_DEPTH = 64


@dataclass
class PipelineCall:
    """What the running pipeline call tells us."""

    pipeline: Any  # the DiffusionPipeline instance
    key: Any  # changes with every generation (the scheduler's timesteps tensor)
    num_calls: int | None  # UNet calls of this generation
    prompts: list[str] | None  # text of each UNet batch row, or None when unknown
    latent_hw: tuple[int, int] | None  # (h, w) of the latents


def find_pipeline_call() -> PipelineCall | None:
    """The innermost running ``DiffusionPipeline.__call__`` on the stack, or None."""
    from diffusers import DiffusionPipeline

    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__":
            local = frame.f_locals
            pipe = local.get("self")
            if isinstance(pipe, DiffusionPipeline):
                return _describe(pipe, local)
        frame = frame.f_back
    return None


def _describe(pipe: Any, local: dict) -> PipelineCall:
    scheduler = getattr(pipe, "scheduler", None)
    num = getattr(pipe, "_num_timesteps", None)
    latents = local.get("latents")
    latent_hw = tuple(latents.shape[-2:]) if isinstance(latents, torch.Tensor) and latents.ndim == 4 else None
    return PipelineCall(
        pipeline=pipe,
        key=getattr(scheduler, "timesteps", None),
        num_calls=int(num) if isinstance(num, int) else None,
        prompts=_row_prompts(pipe, local),
        latent_hw=latent_hw,
    )


def _as_list(x: Any, n: int | None = None) -> list[str] | None:
    if isinstance(x, str):
        return [x] * (n or 1)
    if isinstance(x, (list, tuple)) and all(isinstance(p, str) for p in x):
        return list(x)
    return None


def _row_prompts(pipe: Any, local: dict) -> list[str] | None:
    """Prompt text of each UNet batch row (negatives first under CFG), None when unknown."""
    prompts = _as_list(local.get("prompt"))
    if prompts is None:
        return None  # prompt_embeds were given: no text to re-tokenise
    nipp = local.get("num_images_per_prompt") or 1
    cfg = getattr(pipe, "do_classifier_free_guidance", False)
    # (negative_prompt_embeds given without negative_prompt cannot be told apart here from the default
    # empty negative prompt: those rows are laid out as "" would be; with padding="score" their
    # tokens are still scored, only their end-of-text is not protected)
    negative = local.get("negative_prompt")
    negatives = [""] * len(prompts) if negative is None else _as_list(negative, len(prompts))
    if negatives is None or len(negatives) != len(prompts):
        return None
    cond = [p for p in prompts for _ in range(nipp)]
    if cfg:
        return [q for q in negatives for _ in range(nipp)] + cond
    return cond


def token_roles(token_ids: torch.Tensor, bos_id: int | None, eos_id: int | None) -> torch.Tensor:
    """Role of each position: start / end-of-text are SPECIAL, the words between them WORD, the
    rest PADDING.

    Args:
        token_ids: (B, L) ids.
        bos_id, eos_id: the tokenizer's start and end-of-text ids.

    Returns:
        (B, L) int8 roles.
    """
    B, L = token_ids.shape
    pos = torch.arange(L, device=token_ids.device).expand(B, L)  # (B, L)
    is_eos = token_ids == eos_id if eos_id is not None else torch.zeros_like(token_ids, dtype=torch.bool)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((B,), L, device=token_ids.device))  # (B,)
    roles = torch.full((B, L), WORD, dtype=torch.int8, device=token_ids.device)
    roles[pos > first_eos[:, None]] = PADDING
    roles[pos == first_eos[:, None]] = SPECIAL
    if bos_id is not None:
        roles[(pos == 0) & (token_ids == bos_id)] = SPECIAL
    return roles


def unknown_roles(batch: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """Roles when no token ids are known: position 0 (the start token) is kept, the rest are words."""
    roles = torch.full((batch, length), WORD, dtype=torch.int8, device=device)
    roles[:, 0] = SPECIAL
    return roles
