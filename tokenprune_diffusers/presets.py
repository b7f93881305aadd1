"""Named speed presets for UNet pipelines: token pruning + gating + guidance collapse + DeepCache,
in one call, with settings read off the measured speed-fidelity frontier.

    >>> speedups = apply_speedups(pipe, "balanced")
    >>> image = pipe("a red circle on the left", **speedups.call_kwargs).images[0]
    >>> remove_speedups(pipe)

Guidance collapse works through the pipeline's ``callback_on_step_end``, which is given at call
time: pass ``**speedups.call_kwargs`` to every call (without it the pipeline keeps both guidance
branches after the gate: slower, still correct).

Where the values come from: the frontier measured by ``benchmarks/deepcache_frontier.py --rows presets``
(SD-1.5 architecture, random weights, 256 px, 20 DDIM steps, CFG 7.5, CPU float32, one thread,
3 interleaved repeats timed in CPU seconds; ``benchmarks/results/<FRONTIER_RUN>.md``) beside the
``DeepCache`` package (``cache_interval`` 2, 3, 5 at ``cache_branch_id=0``) and T-GATE 1.0.0 (gate
at 40%), and prompt adherence on the trained UNet toy (``benchmarks/toy_unet_presets.py``). Each
preset is a row of ours on that frontier, at least as faithful as the peer point beside it and
faster: ``faithful`` against T-GATE (and the package at interval 2, at 1.09x its speed; gate 0.5 +
DeepCache N=2 at branch 1, ``Preset(TokenPruneConfig(threshold=0.1, warmup=0.25, gate=0.5),
DeepCacheConfig(interval=2, branch=1))``, is 1.21x it at 47.4 dB against its 46.0), ``balanced``
against the package at interval 3, ``fast`` against the package at interval 5. On the toy,
``faithful`` and ``balanced`` keep two-object adherence within 3 points of stock (-1.5 and -2.5;
branch 1: -3.0), as the package does at intervals 2 and 3; ``fast`` loses 8, the package at
interval 5 19. The gate sits at 0.5 in the first two
because a gate at 0.4 cost 4-8 points on the toy. Speed-up over stock and latent PSNR against stock
(the peer point in brackets):

PRESET_TABLE

Random weights: the PSNRs say how far from stock a setting moves the latents, not how good the
images look; check on your model (``benchmarks/README.md`` says how).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .config import TokenPruneConfig
from .deepcache import DeepCache, DeepCacheConfig, apply_deep_cache, remove_deep_cache
from .guidance import CollapseGuidance
from .patch import apply_token_pruning, remove_token_pruning
from .processor import TokenPruneProcessor

__all__ = ["Preset", "PRESETS", "Speedups", "apply_speedups", "remove_speedups"]


@dataclass(frozen=True)
class Preset:
    """One preset: the token-pruning options (a gate is required: guidance collapses there) and
    the DeepCache options. ``measured`` is the benchmark's row for it (for the docs)."""

    prune: TokenPruneConfig
    cache: DeepCacheConfig
    measured: str = "not measured"

    def __post_init__(self) -> None:
        if not isinstance(self.prune, TokenPruneConfig) or not isinstance(self.cache, DeepCacheConfig):
            raise TypeError(f"a Preset takes a TokenPruneConfig and a DeepCacheConfig, got "
                            f"{type(self.prune).__name__} and {type(self.cache).__name__}")
        if self.prune.gate is None:
            raise ValueError("a Preset needs a gate (TokenPruneConfig(gate=...)): guidance collapses there")


FRONTIER_RUN = "deepcache_frontier_cpu_sd15-random_256"  # the presets' run (benchmarks/results/<run>.md)


def _preset(gate: float, interval: int, branch: int | None = None, start: float = 0.0, measured: str = "") -> Preset:
    # pruning at the default threshold, scored over the first half of the steps before the gate
    return Preset(TokenPruneConfig(threshold=0.1, warmup=gate / 2, gate=gate),
                  DeepCacheConfig(interval=interval, branch=branch, start=start), measured)


# Rows of the measured frontier (see the module docstring). The branch is explicit: DeepCache's default
# (the outer level) is branch 2 on SD and SDXL but 1 on a UNet of one resnet a level, such as the toy,
# where branch 1 at N=5 cost 4.5 points of two-object adherence and branch 2 2.5.
PRESETS: dict[str, Preset] = {
    "faithful": _preset(0.5, 2, branch=2, measured="2.01x, 48.7 dB (T-GATE: 1.40x, 48.2 dB)"),
    "balanced": _preset(0.5, 5, branch=2, measured="3.17x, 42.9 dB (DeepCache pkg N=3: 2.53x, 40.9 dB)"),
    "fast": _preset(0.4, 4, branch=0, measured="4.46x, 38.1 dB (DeepCache pkg N=5: 4.01x, 37.0 dB)"),
}


@dataclass(frozen=True)
class Speedups:
    """What :func:`apply_speedups` installed; give ``**call_kwargs`` to each pipeline call."""

    preset: Preset
    processor: TokenPruneProcessor
    cache: DeepCache
    collapse: CollapseGuidance

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """The pipeline-call keywords the preset needs: ``callback_on_step_end`` (guidance collapse)."""
        return {"callback_on_step_end": self.collapse}


def apply_speedups(pipe: Any, preset: str | Preset = "balanced") -> Speedups:
    """Install a speed preset on a UNet pipeline (SD / SDXL text-to-image or image-to-image).

    Applying again replaces the previous preset (and any token pruning or DeepCache installed by
    hand); :func:`remove_speedups` restores the stock pipeline exactly. Approximate: see the
    module docstring for what each preset measured.

    Args:
        pipe: a diffusers pipeline with a ``unet`` (MM-DiT pipelines have no DeepCache: refused).
        preset: ``"faithful"``, ``"balanced"`` (default) or ``"fast"`` (:data:`PRESETS`), or a
            :class:`Preset` of your own.

    Returns:
        The installed :class:`Speedups`; pass ``**speedups.call_kwargs`` to the pipeline call.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; the presets are: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    elif not isinstance(preset, Preset):
        raise TypeError(f"preset must be a name ({', '.join(PRESETS)}) or a Preset, got {type(preset).__name__}")
    if getattr(pipe, "unet", None) is None:
        raise TypeError(f"apply_speedups needs a pipeline with a UNet (SD / SDXL), got {type(pipe).__name__}: "
                        "DeepCache and guidance collapse work on UNet pipelines only")
    remove_speedups(pipe)
    processor = apply_token_pruning(pipe, TokenPruneProcessor(preset.prune))
    try:  # a pipeline the collapse cannot halve (ControlNet, inpainting) is refused here: undo the pruning
        collapse = CollapseGuidance(processor, pipe)
        cache = apply_deep_cache(pipe, **{f.name: getattr(preset.cache, f.name) for f in fields(preset.cache)})
    except Exception:
        remove_speedups(pipe)
        raise
    return Speedups(preset, processor, cache, collapse)


def remove_speedups(pipe: Any) -> None:
    """Remove what :func:`apply_speedups` installed (a no-op when nothing is)."""
    remove_deep_cache(pipe)
    remove_token_pruning(pipe)


def preset_table() -> str:
    """The presets as a markdown table: name, settings, measured row (the module docstring's)."""
    rows = ["| preset | gate + collapse | DeepCache | measured (speed-up, latent PSNR) |", "| --- | --- | --- | --- |"]
    for name, p in PRESETS.items():
        c = p.cache
        branch = "default branch" if c.branch is None else f"branch {c.branch}"
        start = f", from {c.start:g}" if c.start else ""
        rows.append(f"| `{name}` | gate {p.prune.gate:g} (pruning t={p.prune.threshold:g}, warm-up {p.prune.warmup:g}) "
                    f"| interval {c.interval}, {branch}{start} | {p.measured} |")
    return "\n".join(rows)


if __doc__ is not None:
    __doc__ = __doc__.replace("PRESET_TABLE", preset_table())
