"""Installing and removing the processor on a pipeline or UNet: the wiring, no maths."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

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


def get_token_pruning(model: Any) -> TokenPruneProcessor | None:
    """The ``TokenPruneProcessor`` installed on a pipeline / UNet, or None."""
    for proc in _unet(model).attn_processors.values():
        if isinstance(proc, TokenPruneProcessor):
            return proc
    return None


def apply_token_pruning(model: Any, processor: TokenPruneProcessor | None = None, **options: Any) -> TokenPruneProcessor:
    """Install token pruning on every attention layer of a pipeline's UNet (or of a UNet).

    The processors already installed are kept and wrapped: stock ones are reproduced exactly,
    custom ones (IP-Adapter and the like) are called with the pruned text tokens. Applying twice
    replaces the first application (the original processors are still the ones remembered);
    :func:`remove_token_pruning` puts the original processor objects back.

    Args:
        model: a diffusers pipeline (its ``unet`` and ``tokenizer`` are used) or a UNet.
        processor: a configured :class:`TokenPruneProcessor`; or give its options as keywords
            (``threshold``, ``warmup``, ``keep_ratio``, ``top_k``, ``min_tokens``, ``padding``, ...).

    Returns:
        The installed processor; after a call, ``processor.report`` tells what was pruned.
    """
    if processor is not None and options:
        raise TypeError(f"give a processor or its options, not both (got options {sorted(options)})")
    proc = processor if processor is not None else TokenPruneProcessor(**options)
    unet = _unet(model)
    owner = proc._unet_ref() if proc._unet_ref is not None else None
    if owner is not None and owner is not unet:
        raise ValueError("this TokenPruneProcessor already wraps another UNet; give each UNet its own processor")
    installed = get_token_pruning(unet)
    originals = installed.originals if installed is not None and installed.originals is not None else unet.attn_processors
    modules = _attention_modules(unet)
    # a processor installed by hand remembers nothing: what diffusers would install stands in for it
    originals = {k: (_default_processor(modules[k]) if isinstance(p, TokenPruneProcessor) else p) for k, p in originals.items()}
    proc.wrap(originals, modules)
    proc._unet_ref = weakref.ref(unet)
    if getattr(model, "tokenizer", None) is not None:
        proc.tokenizer = model.tokenizer
    unet.set_attn_processor(proc)
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    registry.remove_hook(_CALL_HOOK, recurse=False)
    registry.register_hook(_CallHook(proc, next(iter(modules.values()))), _CALL_HOOK)
    proc._hooked = True
    return proc


_CALL_HOOK = "tokenprune_unet_call"


class _CallHook(ModelHook):
    """Tells the processor that a UNet call starts (with its text states), so that calls in which
    no cross-attention layer runs (DeepCache) are counted too."""

    def __init__(self, processor: TokenPruneProcessor, probe) -> None:
        super().__init__()
        self.processor = processor
        self.probe = weakref.ref(probe)  # an attention module: is the processor still installed?

    def pre_forward(self, module, *args, **kwargs):
        probe = self.probe()
        if probe is None or probe.processor is not self.processor:  # replaced by set_attn_processor(): idle
            return args, kwargs
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)  # (B, L, D)
        if isinstance(text, torch.Tensor) and text.ndim == 3:
            self.processor._unet_call(text)
        return args, kwargs


def _default_processor(attn):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor2_0() if attn.scale_qk else AttnProcessor()


def remove_token_pruning(model: Any) -> None:
    """Put back the processors that :func:`apply_token_pruning` replaced (the same objects).

    A no-op when token pruning is not installed. A processor installed by hand with
    ``unet.set_attn_processor(TokenPruneProcessor(...))`` remembers nothing, so what diffusers
    installs by default (``AttnProcessor2_0``) is put in its place.
    """
    unet = _unet(model)
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(_CALL_HOOK, recurse=False)
    installed = get_token_pruning(unet)
    if installed is None:
        return
    installed._hooked = False
    if installed.originals is not None:
        unet.set_attn_processor(dict(installed.originals))
    else:
        unet.set_attn_processor({k: _default_processor(m) for k, m in _attention_modules(unet).items()})
    installed._unet_ref = None
