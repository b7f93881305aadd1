"""Deep-feature reuse across UNet calls (DeepCache), as diffusers hooks on the UNet's blocks.

Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024
(arXiv 2312.00858): the deep features of a UNet change slowly from one denoising step to the next,
while the outer (high-resolution) blocks carry the detail. So on most calls only the outer
``depth`` down blocks and the matching up blocks are computed; the input of those up blocks from
below (the output of the deeper up blocks) is taken from the last full call.

Wiring only: every skipped block gets a :class:`diffusers.hooks.ModelHook` whose ``new_forward``
returns that block's output of the last full call instead of computing it; which calls are cached
is the pure :func:`~tokenprune_diffusers.schedule.deep_cache_plan`, followed on the UNet's clock
(shared with the token-pruning processor). Removing the hooks restores the original forwards exactly.

It composes with :class:`~tokenprune_diffusers.TokenPruneProcessor` (pruning, K/V reuse, gating)
and :class:`~tokenprune_diffusers.CollapseGuidance`: a call whose batch differs from the cached one
(the first call after guidance collapse) is computed in full and starts a new cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook

from .clock import CallInfo, GenerationClock, attach_clock, detach_clock, get_clock
from .config import check_positive_int, check_unit
from .processor import TokenPruneProcessor
from .schedule import deep_cache_plan

__all__ = ["DeepCache", "DeepCacheConfig", "apply_deep_cache", "remove_deep_cache", "get_deep_cache"]

_BLOCK_HOOK = "tokenprune_deep_cache_block"


@dataclass(frozen=True)
class DeepCacheConfig:
    """When to reuse the deep features. Checked at construction."""

    # --- important args ---
    interval: int = 3  # one full UNet call, then interval - 1 cached calls; 1 never reuses (exact)
    start: float = 0.0  # share of a generation's steps computed in full before reuse begins
    # --- args to tinker with ---
    depth: int = 1  # outer levels (down block + matching up block) computed on every call
    num_steps: int | None = None  # UNet calls per generation, only for hand-written loops (pipelines report it)

    def __post_init__(self) -> None:
        check_positive_int("interval", self.interval)
        check_unit("start", self.start)
        check_positive_int("depth", self.depth)
        if self.num_steps is not None:
            check_positive_int("num_steps", self.num_steps)


@dataclass
class _State:
    """The running generation, shared by the clock's calls and the block hooks."""

    generation: int = 0  # the clock's generation number
    plan: tuple[bool, ...] | None = None  # per call: reuse? (deep_cache_plan); None: calls unknown
    full: set[int] = field(default_factory=set)  # calls forced full (the batch changed)
    reuse: bool = False  # the running call reuses the deep features
    signature: tuple | None = None  # (shape, dtype, device) of the sample of the last full call
    outputs: dict[int, Any] = field(default_factory=dict)  # skipped block -> its output of the last full call
    schedule: list[bool] = field(default_factory=list)  # per call of the generation: reused?


class DeepCache:
    """Handle of the deep-feature cache installed on one UNet (see :func:`apply_deep_cache`).

    It follows the UNet's :class:`~tokenprune_diffusers.clock.GenerationClock` and its plan is
    :func:`~tokenprune_diffusers.schedule.deep_cache_plan`; a call whose sample differs from the
    cached one (the first call after guidance collapse) is computed in full and the plan restarts there.

    Attributes:
        config: the :class:`DeepCacheConfig`.
        clock: the UNet's clock.
        schedule: per UNet call of the running (or last) generation, True where the call reused the
            deep features; ``schedule.count(True)`` calls were cached.
    """

    def __init__(self, unet: Any, config: DeepCacheConfig) -> None:
        self.config = config
        self.clock: GenerationClock | None = None
        self._unet = unet
        self._state = _State()

    def __repr__(self) -> str:
        c = self.config
        return f"DeepCache(interval={c.interval}, start={c.start!r}, depth={c.depth})"

    @property
    def schedule(self) -> list[bool]:
        return list(self._state.schedule)

    def begin_generation(self, num_steps: int) -> None:
        """Start a generation in a hand-written loop: ``num_steps`` UNet calls follow."""
        self.clock.begin_generation(num_steps)

    def reset(self) -> None:
        """Forget the running generation and its cached features."""
        self._state = _State()
        self.clock.reset()

    # ------------------------------------------------------------------ per UNet call (the clock calls these)
    def on_call(self, info: CallInfo, args: tuple = (), kwargs: dict | None = None) -> None:
        kwargs = kwargs or {}
        sample = args[0] if args else kwargs["sample"]  # (B, C, h, w)
        cfg, st = self.config, self._state
        if info.generation != st.generation:
            st.outputs.clear()
            plan = None if info.num_calls is None else deep_cache_plan(info.num_calls, cfg.interval, cfg.start, calls_per_step=info.calls_per_step)
            st = self._state = _State(generation=info.generation, plan=plan)
        signature = (tuple(sample.shape), sample.dtype, sample.device)
        planned = st.plan is not None and info.call < len(st.plan) and st.plan[info.call]
        adapters = bool(kwargs.get("down_intrablock_additional_residuals"))  # T2I-Adapter residuals are added in place
        st.reuse = planned and not adapters and st.signature == signature
        if planned and not st.reuse:  # forced full: the plan restarts from this call
            st.full.add(info.call)
            st.plan = deep_cache_plan(info.num_calls, cfg.interval, cfg.start, calls_per_step=info.calls_per_step, full=st.full)
        if not st.reuse:
            st.outputs.clear()
            st.signature = signature if st.plan is not None and cfg.interval > 1 else None
        st.schedule.append(st.reuse)
        if st.plan is None or info.call >= len(st.plan) - 1:
            st.signature = None  # the last call: no later call may reuse; outputs are freed after it

    def on_call_end(self, info: CallInfo) -> None:
        st = self._state
        if st.signature is None:  # nothing may reuse these outputs: free them now
            st.outputs.clear()

    # ------------------------------------------------------------------ wiring
    def _install(self, pipeline: Any) -> None:
        unet, depth = self._unet, self.config.depth
        self.clock = attach_clock(unet, self, pipeline=pipeline, num_steps=self.config.num_steps)
        skipped = list(unet.down_blocks[depth:]) + [unet.mid_block] + list(unet.up_blocks[: len(unet.up_blocks) - depth])
        for block in skipped:
            if block is not None:
                HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(self._state_ref), _BLOCK_HOOK)

    def _state_ref(self) -> _State:
        return self._state

    def _uninstall(self) -> None:
        unet = self._unet
        for module in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(_BLOCK_HOOK, recurse=False)
        detach_clock(unet, self)
        self._state.outputs.clear()  # free the features; the schedule of the last generation stays readable


class _BlockHook(ModelHook):
    """On a cached call, returns the block's output of the last full call instead of computing it."""

    def __init__(self, state) -> None:
        super().__init__()
        self.state = state  # callable returning the running _State

    def new_forward(self, module, *args, **kwargs):
        st = self.state()
        if st.reuse:
            return st.outputs[id(module)]
        out = self.fn_ref.original_forward(*args, **kwargs)
        if st.signature is not None:  # a later call may reuse it
            st.outputs[id(module)] = out
        return out


def _unet_of(model: Any):
    unet = getattr(model, "unet", model)
    if not all(hasattr(unet, name) for name in ("down_blocks", "up_blocks", "mid_block")):
        raise TypeError(f"expected a UNet2DConditionModel or a pipeline with one, got {type(model).__name__}")
    return unet


def get_deep_cache(model: Any) -> DeepCache | None:
    """The :class:`DeepCache` installed on ``model`` (a pipeline or its UNet), or None."""
    clock = get_clock(_unet_of(model))
    return next((x for x in clock.listeners if isinstance(x, DeepCache)), None) if clock is not None else None


def apply_deep_cache(
    model: Any,
    interval: int = 3,
    start: float = 0.0,
    *,
    depth: int = 1,
    num_steps: int | None = None,
) -> DeepCache:
    """Reuse the UNet's deep features on all but one of every ``interval`` calls.

    Applying twice replaces the first cache (no hooks pile up); :func:`remove_deep_cache` restores
    the UNet's original forwards exactly. Approximate: the output differs from stock on cached calls.

    Example:
        >>> cache = apply_deep_cache(pipe, interval=3)
        >>> image = pipe("a red circle on the left").images[0]
        >>> cache.schedule.count(True)  # UNet calls that reused the deep features

    Important args:
        model: a diffusers pipeline with a ``unet``, or a ``UNet2DConditionModel``.
        interval (int, default 3): one full UNet call, then ``interval - 1`` calls that compute only
            the outer blocks. ``1`` computes every call (identical to stock).
        start (float in [0, 1], default 0): share of the generation's UNet calls computed in full
            before reuse begins (the early calls lay out the image).

    Args to tinker with:
        depth (int, default 1): outer levels computed on every call: down blocks ``[:depth]`` and
            up blocks ``[-depth:]``; the rest (and the mid block) are reused.
        num_steps (int): UNet calls per generation, for hand-written loops.
    """
    unet = _unet_of(model)
    config = DeepCacheConfig(interval=interval, start=start, depth=depth, num_steps=num_steps)
    if depth >= len(unet.down_blocks) or depth >= len(unet.up_blocks):
        raise ValueError(
            f"depth must be below the UNet's {len(unet.down_blocks)} levels (something must be reused), got {depth}"
        )
    if any(isinstance(p, TokenPruneProcessor) and not p.clock.hooked for p in unet.attn_processors.values()):
        raise ValueError(
            "a TokenPruneProcessor installed with set_attn_processor() counts UNet calls by its cross-attention "
            "layers, which DeepCache skips; install it with apply_token_pruning(pipe, ...) to combine the two"
        )
    remove_deep_cache(unet)
    cache = DeepCache(unet, config)
    cache._install(model if model is not unet else None)
    return cache


def remove_deep_cache(model: Any) -> None:
    """Remove the deep-feature cache from ``model`` (a no-op when none is installed)."""
    cache = get_deep_cache(model)
    if cache is not None:
        cache._uninstall()
