"""Installing and removing the processor on a pipeline or UNet: the wiring, no maths."""

from __future__ import annotations

from typing import Any

from .clock import attach_clock, detach_clock, get_clock
from .mmdit import MMDiTTokenPruning, apply_mmdit, get_mmdit, mmdit_config, remove_mmdit
from .processor import TokenPruneProcessor

__all__ = ["apply_token_pruning", "remove_token_pruning", "get_token_pruning"]


def _unet(model: Any):
    unet = getattr(model, "unet", model)
    if not hasattr(unet, "set_attn_processor") or not hasattr(unet, "attn_processors"):
        raise TypeError(f"expected a diffusers pipeline or UNet with attention processors, got {type(model).__name__}")
    return unet


def _attention_modules(unet) -> dict[str, Any]:
    """Processor key (as in ``unet.attn_processors``) -> attention module."""
    return {f"{name}.processor": m for name, m in unet.named_modules() if hasattr(m, "set_processor")}


def _mmdit(model: Any) -> bool:
    """A pipeline whose denoiser is a transformer (SD3, Flux, ...) rather than a UNet."""
    return getattr(model, "unet", None) is None and getattr(model, "transformer", None) is not None


def get_token_pruning(model: Any) -> TokenPruneProcessor | MMDiTTokenPruning | None:
    """The token pruning installed on a pipeline / UNet, or None."""
    if _mmdit(model):
        return get_mmdit(model.transformer)
    for proc in _unet(model).attn_processors.values():
        if isinstance(proc, TokenPruneProcessor):
            return proc
    return None


def apply_token_pruning(model: Any, processor: TokenPruneProcessor | None = None, **options: Any) -> TokenPruneProcessor | MMDiTTokenPruning:
    """Install token pruning on every attention layer of a pipeline's UNet (or of a UNet), or on
    the joint attention and text stream of an MM-DiT pipeline's transformer
    (:data:`~tokenprune_diffusers.mmdit.SUPPORTED_MMDIT_PIPELINES`: ``StableDiffusion3Pipeline``,
    built with ``text_encoder_3=None``, and ``FluxPipeline``; other transformer pipelines are
    refused with the reason). Without a rule, SD3 keeps every token (its exact zero merge is the
    saving that costs nothing; see :attr:`~tokenprune_diffusers.mmdit.MMDiTFamily.threshold`).

    The processor follows the UNet's clock (one diffusers hook on the UNet, one on the pipeline's
    text encoder, see :mod:`tokenprune_diffusers.clock`). The processors already installed are kept and wrapped: stock ones are reproduced exactly,
    custom ones (IP-Adapter and the like) are called with the pruned text tokens. Applying twice
    replaces the first application (the original processors are still the ones remembered);
    :func:`remove_token_pruning` puts the original processor objects back.

    Args:
        model: a diffusers pipeline (its ``unet`` and ``tokenizer`` are used) or a UNet.
        processor: a configured :class:`TokenPruneProcessor`; or give its options as keywords
            (those of :class:`~tokenprune_diffusers.TokenPruneConfig`: ``threshold``, ``warmup``, ...).

    Returns:
        The installed processor (:class:`~tokenprune_diffusers.mmdit.MMDiTTokenPruning` on an MM-DiT);
        after a call, ``.report`` tells what was pruned.
    """
    if processor is not None and options:
        raise TypeError(f"give a processor or its options, not both (got options {sorted(options)})")
    if _mmdit(model):
        return apply_mmdit(model, processor.config if processor is not None else mmdit_config(model, options))
    proc = processor if processor is not None else TokenPruneProcessor(**options)
    unet = _unet(model)
    if proc.clock.hooked and proc.clock is not get_clock(unet):
        raise ValueError("this TokenPruneProcessor already wraps another UNet; give each UNet its own processor")
    installed = get_token_pruning(unet)
    originals = installed.originals if installed is not None and installed.originals is not None else unet.attn_processors
    modules = _attention_modules(unet)
    # a processor installed by hand remembers nothing: what diffusers would install stands in for it
    originals = {k: (_default_processor(modules[k]) if isinstance(p, TokenPruneProcessor) else p) for k, p in originals.items()}
    proc.wrap(originals, modules)
    _release(unet, keep=proc)
    pipeline = model if model is not unet else None
    clock = attach_clock(unet, proc, pipeline=pipeline, num_steps=proc.config.num_steps)
    proc.use_clock(clock, probe=next(iter(modules.values())))
    if getattr(model, "tokenizer", None) is not None:
        proc.tokenizer = model.tokenizer
    unet.set_attn_processor(proc)
    return proc


def _release(unet, keep: TokenPruneProcessor | None = None) -> None:
    """Unsubscribe from the UNet's clock every token-pruning processor but ``keep`` (the clock's
    hooks go with the last subscriber)."""
    clock = get_clock(unet)
    for listener in clock.listeners if clock is not None else ():
        if isinstance(listener, TokenPruneProcessor) and listener is not keep:
            detach_clock(unet, listener)
            listener.use_clock(None)


def _default_processor(attn):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor2_0() if attn.scale_qk else AttnProcessor()


def remove_token_pruning(model: Any) -> None:
    """Put back the processors that :func:`apply_token_pruning` replaced (the same objects).

    A no-op when token pruning is not installed. A processor installed by hand with
    ``unet.set_attn_processor(TokenPruneProcessor(...))`` remembers nothing, so what diffusers
    installs by default (``AttnProcessor2_0``) is put in its place.
    """
    if _mmdit(model):
        remove_mmdit(model.transformer)
        return
    unet = _unet(model)
    installed = get_token_pruning(unet)
    _release(unet)
    if installed is None:
        return
    if installed.originals is not None:
        unet.set_attn_processor(dict(installed.originals))
    else:
        unet.set_attn_processor({k: _default_processor(m) for k, m in _attention_modules(unet).items()})
