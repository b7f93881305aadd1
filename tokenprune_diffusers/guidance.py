"""Guidance collapse: once cross-attention is gated, run one batch instead of two.

After the gate (``TokenPruneProcessor(gate=...)``) the text reaches the UNet only through the
cross-attention outputs kept from the last computed call. From then on the pipeline runs the
positive rows alone, without classifier-free guidance, and each gated layer reuses the positive
rows' kept output: half the UNet work for every remaining step. (T-GATE gives both branches the mean
of the negative and positive rows; on the trained toy model that lost much more prompt adherence
than the positive rows: see docs/toy_model.md.) This callback tells the pipeline to do so, through diffusers' own
``callback_on_step_end`` mechanism (as ``diffusers.callbacks.SDCFGCutoffCallback`` does).
"""

from __future__ import annotations

from typing import Any

from diffusers.callbacks import PipelineCallback

from .processor import TokenPruneProcessor

__all__ = ["CollapseGuidance"]

_BATCHED = ("prompt_embeds", "add_text_embeds", "add_time_ids")  # per-row tensors of SD / SDXL pipelines


class CollapseGuidance(PipelineCallback):
    """``callback_on_step_end`` that drops classifier-free guidance from the processor's gate on.

    Example:
        >>> proc = apply_token_pruning(pipe, threshold=0.1, warmup=0.2, gate=0.4)
        >>> image = pipe(prompt, callback_on_step_end=CollapseGuidance(proc, pipe)).images[0]

    Args:
        processor: the installed :class:`TokenPruneProcessor`, configured with ``gate``.
        pipeline: the pipeline it will be passed to (to choose its per-row tensors).
    """

    def __init__(self, processor: TokenPruneProcessor, pipeline: Any) -> None:
        super().__init__(cutoff_step_ratio=1.0)
        if not isinstance(processor, TokenPruneProcessor):
            raise TypeError(f"expected a TokenPruneProcessor, got {type(processor).__name__}")
        if processor.config.gate is None:
            raise ValueError("CollapseGuidance needs a processor with a gate (TokenPruneProcessor(gate=...)), got gate=None")
        unet, vae = getattr(pipeline, "unet", None), getattr(pipeline, "vae", None)
        if getattr(pipeline, "controlnet", None) is not None or (
            unet is not None and vae is not None and unet.config.in_channels != vae.config.latent_channels
        ):
            raise ValueError(
                f"CollapseGuidance supports text-to-image and image-to-image SD / SDXL pipelines; {type(pipeline).__name__} "
                "keeps other doubled inputs (control images, inpainting masks) that it cannot halve"
            )
        available = getattr(pipeline, "_callback_tensor_inputs", [])
        self.processor = processor
        self._inputs = [name for name in _BATCHED if name in available]
        if "prompt_embeds" not in self._inputs:
            raise ValueError(f"{type(pipeline).__name__} does not pass prompt_embeds to step callbacks")

    @property
    def tensor_inputs(self) -> list[str]:
        return self._inputs

    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        plan = self.processor.current_plan  # of the call that just ended
        if plan is None or not plan.fill:  # collapse once, after the call that fills the gate
            return callback_kwargs
        if not getattr(pipeline, "do_classifier_free_guidance", False):
            return callback_kwargs
        for name in self._inputs:
            rows = callback_kwargs[name]
            # the positive rows: negatives come first, except SDXL's time ids, repeated as (neg, pos) pairs
            callback_kwargs[name] = rows[1::2] if name == "add_time_ids" else rows.chunk(2)[1]
        pipeline._guidance_scale = 0.0
        return callback_kwargs
