"""Prompt-token pruning for diffusers, honestly measured: UNet cross-attention, and the text stream
of MM-DiT transformers (SD3).

    >>> from tokenprune_diffusers import TokenPruneProcessor
    >>> pipe.unet.set_attn_processor(TokenPruneProcessor(threshold=0.1, warmup=0.2))

or, keeping the processors already installed and the pipeline's tokenizer for readable reports:

    >>> proc = apply_token_pruning(pipe, threshold=0.1, warmup=0.2)
    >>> image = pipe("a cat wearing a red hat").images[0]
    >>> print(proc.report.summary())
    >>> remove_token_pruning(pipe)
"""

from . import _extras  # noqa: F401  (first: a clear ImportError naming the extra on a base install)
from .clock import CallInfo, GenerationClock, get_clock
from .config import TokenPruneConfig
from .deepcache import DeepCache, apply_deep_cache, get_deep_cache, remove_deep_cache
from .guidance import CollapseGuidance
from .mmdit import (
    SUPPORTED_MMDIT_PIPELINES,
    FluxTokenPruneProcessor,
    JointTokenPruneProcessor,
    MMDiTTokenPruning,
)
from .patch import apply_token_pruning, get_token_pruning, remove_token_pruning
from .presets import PRESETS, Preset, Speedups, apply_speedups, remove_speedups
from .processor import TokenPruneProcessor
from .report import PruneReport, StepRecord
from .schedule import CallPlan, NonUniform, Schedule, deep_cache_plan, plan_generation
from .tokenizer import load_clip_tokenizer

__all__ = [
    "TokenPruneProcessor",
    "TokenPruneConfig",
    "CollapseGuidance",
    "MMDiTTokenPruning",
    "JointTokenPruneProcessor",
    "FluxTokenPruneProcessor",
    "SUPPORTED_MMDIT_PIPELINES",
    "DeepCache",
    "apply_deep_cache",
    "remove_deep_cache",
    "get_deep_cache",
    "apply_speedups",
    "remove_speedups",
    "Speedups",
    "Preset",
    "PRESETS",
    "apply_token_pruning",
    "remove_token_pruning",
    "get_token_pruning",
    "PruneReport",
    "StepRecord",
    "GenerationClock",
    "CallInfo",
    "get_clock",
    "Schedule",
    "CallPlan",
    "plan_generation",
    "deep_cache_plan",
    "NonUniform",
    "load_clip_tokenizer",
]

__version__ = "0.1.0"
