"""Deep-feature reuse across UNet calls (DeepCache), as diffusers hooks on the UNet's blocks.

Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024
(arXiv 2312.00858): the deep features of a UNet change slowly from one denoising step to the next,
while the outer (high-resolution) blocks carry the detail. So on most calls only the outer layers
are computed, down to a chosen *skip branch* (below); the input of the computed up layers from
below is taken from the last full call.

Skip branches. The UNet's down path emits skip connections (``down_block_res_samples``): branch 0
is ``conv_in``'s output, then one per resnet (with its attention) and per downsampler of each down
block, shallowest first; each up resnet consumes one of them, deepest first. With ``branch=k`` a
cached call computes the down layers that emit branches ``0..k`` and the up layers that consume
them; every other layer (and the mid block) returns its output of the last full call. On the
Stable Diffusion layout (two resnets and a downsampler per block) these are the numbers of the
``DeepCache`` package's ``cache_branch_id``; ``depth=d`` is the last branch consumed by the outer
``d`` up blocks (``depth=1``: branch 2 on SD, the default).

Wiring only: every skipped block or layer gets a :class:`diffusers.hooks.ModelHook` whose ``new_forward``
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
from .schedule import NonUniform, deep_cache_plan

__all__ = ["DeepCache", "DeepCacheConfig", "apply_deep_cache", "remove_deep_cache", "get_deep_cache"]

_BLOCK_HOOK = "tokenprune_deep_cache_block"


@dataclass(frozen=True)
class DeepCacheConfig:
    """When to reuse the deep features. Checked at construction."""

    # --- important args ---
    interval: int = 3  # one full UNet call, then interval - 1 cached calls; 1 never reuses (exact)
    start: float = 0.0  # share of a generation's steps computed in full before reuse begins
    # --- args to tinker with ---
    depth: int | None = None  # outer levels (down block + matching up block) computed on every call; None: 1 (unless branch)
    branch: int | None = None  # instead of depth: the deepest skip branch computed on every call (the peer's cache_branch_id)
    schedule: str | NonUniform = "uniform"  # where the full calls fall: "uniform", "nonuniform" (NonUniform()) or a NonUniform
    num_steps: int | None = None  # UNet calls per generation, only for hand-written loops (pipelines report it)

    def __post_init__(self) -> None:
        check_positive_int("interval", self.interval)
        check_unit("start", self.start)
        if self.depth is not None:
            check_positive_int("depth", self.depth)
        if self.branch is not None and (isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0):
            raise ValueError(f"branch must be a non-negative int, got {self.branch!r}")
        if self.depth is not None and self.branch is not None:
            raise ValueError(f"give depth or branch, not both (got depth={self.depth}, branch={self.branch})")
        if not isinstance(self.schedule, NonUniform) and self.schedule not in ("uniform", "nonuniform"):
            raise ValueError(f'schedule must be "uniform", "nonuniform" or a NonUniform, got {self.schedule!r}')
        if self.num_steps is not None:
            check_positive_int("num_steps", self.num_steps)

    @property
    def non_uniform(self) -> NonUniform | None:
        """The non-uniform schedule's settings, or None for the uniform schedule."""
        if isinstance(self.schedule, NonUniform):
            return self.schedule
        return NonUniform() if self.schedule == "nonuniform" else None


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
        self.branch = resolve_branch(unet, config.depth, config.branch)  # the deepest skip branch computed on every call
        self._hooked: list[Any] = []

    def __repr__(self) -> str:
        c = self.config
        return f"DeepCache(interval={c.interval}, start={c.start!r}, branch={self.branch}, schedule={c.schedule!r})"

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
            plan = None if info.num_calls is None else deep_cache_plan(
                info.num_calls, cfg.interval, cfg.start, calls_per_step=info.calls_per_step, schedule=cfg.non_uniform)
            st = self._state = _State(generation=info.generation, plan=plan)
        signature = (tuple(sample.shape), sample.dtype, sample.device)
        planned = st.plan is not None and info.call < len(st.plan) and st.plan[info.call]
        adapters = bool(kwargs.get("down_intrablock_additional_residuals"))  # T2I-Adapter residuals are added in place
        st.reuse = planned and not adapters and st.signature == signature
        if planned and not st.reuse:  # forced full: the plan restarts from this call
            st.full.add(info.call)
            st.plan = deep_cache_plan(info.num_calls, cfg.interval, cfg.start, calls_per_step=info.calls_per_step,
                                      full=st.full, schedule=cfg.non_uniform)
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
        unet = self._unet
        self.clock = attach_clock(unet, self, pipeline=pipeline, num_steps=self.config.num_steps)
        self._hooked = reused_modules(unet, self.branch)
        for module in self._hooked:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_BlockHook(self._state_ref), _BLOCK_HOOK)

    def _state_ref(self) -> _State:
        return self._state

    def _uninstall(self) -> None:
        for module in self._hooked:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(_BLOCK_HOOK, recurse=False)
        self._hooked = []
        detach_clock(self._unet, self)
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


def _layers(block: Any) -> list[list[Any]]:
    """The layers of a down or up block, in call order: ``[resnet, attention]`` pairs, then samplers."""
    attentions = list(getattr(block, "attentions", None) or [])
    pairs = [[r] + ([attentions[j]] if j < len(attentions) else []) for j, r in enumerate(block.resnets)]
    samplers = list(getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None) or [])
    return pairs + [[s] for s in samplers]


def skip_branches(unet: Any) -> int:
    """Number of skip branches of ``unet`` (``len(down_block_res_samples)``: 12 on SD 1.5)."""
    return 1 + sum(len(block.resnets) + len(getattr(block, "downsamplers", None) or []) for block in unet.down_blocks)


def resolve_branch(unet: Any, depth: int | None, branch: int | None) -> int:
    """The deepest skip branch computed on every call, from ``depth`` (default 1) or ``branch``,
    checked against the UNet: something must be reused, so ``depth`` is below its levels."""
    n = skip_branches(unet)
    if sum(len(block.resnets) for block in unet.up_blocks) != n:
        raise TypeError(f"{type(unet).__name__}: its up resnets do not consume its {n} skip branches one each")
    if branch is None:
        depth = 1 if depth is None else depth
        if depth >= len(unet.down_blocks) or depth >= len(unet.up_blocks):
            raise ValueError(
                f"depth must be below the UNet's {len(unet.down_blocks)} levels (something must be reused), got {depth}"
            )
        return sum(len(block.resnets) for block in unet.up_blocks[len(unet.up_blocks) - depth:]) - 1
    if branch >= n:
        raise ValueError(f"branch must be below the UNet's {n} skip branches (0..{n - 1}), got {branch}")
    return branch


def reused_modules(unet: Any, branch: int) -> list[Any]:
    """The modules whose output a cached call takes from the last full call: whole blocks where no
    layer is computed, else the layers past ``branch``; the mid block always."""
    reused, k = [], 1  # k: the branch the next down layer emits (0 is conv_in's output)
    for block in unet.down_blocks:
        layers = _layers(block)
        if k > branch:
            reused.append(block)
        else:
            reused += [m for j, layer in enumerate(layers) if k + j > branch for m in layer]
        k += len(layers)
    if unet.mid_block is not None:
        reused.append(unet.mid_block)
    top = skip_branches(unet)  # up blocks consume the branches from the deepest down
    for block in unet.up_blocks:
        n = len(block.resnets)
        if top - n > branch:  # every branch it consumes is past the boundary
            reused.append(block)
        else:  # resnet j consumes branch top - 1 - j; samplers (after the resnets) are computed
            reused += [m for j, layer in enumerate(_layers(block)[:n]) if top - 1 - j > branch for m in layer]
        top -= n
    return reused


def _unet_of(model: Any, required: bool = True):
    unet = getattr(model, "unet", model)
    if not all(hasattr(unet, name) for name in ("down_blocks", "up_blocks", "mid_block")):
        if not required:
            return None
        raise TypeError(f"expected a UNet2DConditionModel or a pipeline with one, got {type(model).__name__}")
    return unet


def get_deep_cache(model: Any) -> DeepCache | None:
    """The :class:`DeepCache` installed on ``model`` (a pipeline or its UNet), or None (also for a
    model without a UNet, such as an MM-DiT pipeline: nothing can be installed there)."""
    unet = _unet_of(model, required=False)
    clock = get_clock(unet) if unet is not None else None
    return next((x for x in clock.listeners if isinstance(x, DeepCache)), None) if clock is not None else None


def apply_deep_cache(
    model: Any,
    interval: int = 3,
    start: float = 0.0,
    *,
    branch: int | None = None,
    schedule: str | NonUniform = "uniform",
    depth: int | None = None,
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
        branch (int): the deepest skip branch computed on every call (module docstring; on SD
            layouts the ``DeepCache`` package's ``cache_branch_id``): smaller is faster and less
            faithful. Default: the last branch of the outer level (``depth=1``; 2 on SD).
        schedule ("uniform", "nonuniform" or :class:`~tokenprune_diffusers.schedule.NonUniform`):
            where the full calls fall; ``"nonuniform"`` is ``NonUniform()`` (the same number of full
            calls, densest around 30% of the generation).
        depth (int): instead of ``branch``: outer levels computed on every call (down blocks
            ``[:depth]``, up blocks ``[-depth:]``); default 1.
        num_steps (int): UNet calls per generation, for hand-written loops.
    """
    unet = _unet_of(model)
    config = DeepCacheConfig(interval=interval, start=start, depth=depth, branch=branch, schedule=schedule, num_steps=num_steps)
    resolve_branch(unet, config.depth, config.branch)  # refused before anything is removed
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
