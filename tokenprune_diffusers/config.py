"""Options of :class:`~tokenprune_diffusers.TokenPruneProcessor`, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TokenPruneConfig", "PADDING_POLICIES"]

PADDING_POLICIES = ("score", "keep", "drop")

DEFAULT_THRESHOLD = 0.1


@dataclass(frozen=True)
class TokenPruneConfig:
    """How, when and what to prune. Every field is checked here, not inside a denoising step.

    Scores. A prompt token's raw score is the cross-attention probability mass it receives,
    averaged over heads and image positions and summed over cross-attention layers and the scored
    UNet calls (the warm-up). Per layer the mass sums to 1 over the 77 positions and the start token
    takes most of it, so the
    rules below use the *normalised* score: raw score divided by the largest raw score among the
    prompt's words (the tokens between start and end-of-text). A word scoring 1.0 is the most
    looked-at word of its prompt; ``threshold=0.1`` drops the words receiving less than a tenth
    of that. The normalisation makes ``threshold`` mean the same for short and long prompts and
    for models whose start token takes 90% or 99% of the mass.

    The start and end-of-text tokens are always kept. Exactly one pruning rule is active.
    """

    # --- important args ---
    threshold: float | None = None  # keep candidates whose normalised score >= threshold; 0.1 if no other rule
    warmup: float = 0.2  # share of the generation's UNet calls that keep every token (and are scored)
    keep_ratio: float | None = None  # instead of threshold: keep this share of candidates, best first
    top_k: int | None = None  # instead of threshold: keep the k best candidates
    # --- speed beyond pruning ---
    reuse_kv: bool = True  # project the (pruned) prompt to K/V once per layer and generation: exact
    gate: float | None = None  # from this share of the UNet calls on, reuse each layer's cached cross-attention output (T-GATE)
    # --- args to tinker with ---
    min_tokens: int = 1  # floor: at least this many words stay per prompt (best first), whatever the rule
    padding: str = "score"  # positions after end-of-text: "score" like words, always "keep", or always "drop"
    num_steps: int | None = None  # UNet calls per generation, only for hand-written loops (pipelines report it)
    score_chunk: int = 1 << 22  # elements of one (B, heads, positions, tokens) probability chunk when scoring
    record_maps: bool = True  # keep per-token spatial maps of the scored calls (for heat maps)

    def __post_init__(self) -> None:
        rules = {k: getattr(self, k) for k in ("threshold", "keep_ratio", "top_k") if getattr(self, k) is not None}
        if len(rules) > 1:
            given = ", ".join(f"{k}={v!r}" for k, v in rules.items())
            raise ValueError(f"give one pruning rule, not several: {given}")
        if self.threshold is not None:
            check_unit("threshold", self.threshold)
        check_unit("warmup", self.warmup)
        if self.gate is not None:
            check_unit("gate", self.gate)
        if not isinstance(self.reuse_kv, bool):
            raise ValueError(f"reuse_kv must be True or False, got {self.reuse_kv!r}")
        if self.keep_ratio is not None:
            check_unit("keep_ratio", self.keep_ratio)
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative int, got {self.top_k!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative int, got {self.min_tokens!r}")
        if self.padding not in PADDING_POLICIES:
            raise ValueError(f"padding must be one of {PADDING_POLICIES}, got {self.padding!r}")
        if self.num_steps is not None:
            check_positive_int("num_steps", self.num_steps)
        if not isinstance(self.score_chunk, int) or self.score_chunk < 1:
            raise ValueError(f"score_chunk must be a positive int, got {self.score_chunk!r}")
        if self.rule == "threshold" and self.threshold is None:
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD)

    @property
    def rule(self) -> str:
        """'threshold', 'keep_ratio' or 'top_k'."""
        if self.keep_ratio is not None:
            return "keep_ratio"
        if self.top_k is not None:
            return "top_k"
        return "threshold"

    def gate_start(self, num_calls: int) -> int | None:
        """Index of the first gated UNet call (cross-attention output reused), or None.

        Calls before it compute cross-attention; the last of them fills the cache. At least one call
        is always computed.
        """
        if self.gate is None:
            return None
        start = min(max(math.ceil(self.gate * num_calls - 1e-9), 1), num_calls)
        return None if start >= num_calls else start

    def prune_start(self, num_calls: int) -> int:
        """Index of the first pruned UNet call of a generation of ``num_calls`` calls.

        Calls ``0 .. prune_start - 1`` keep every token and are scored. At least one call is always
        scored (``warmup=0`` prunes from call 1); ``prune_start == num_calls`` means nothing is pruned.
        """
        start = math.ceil(self.warmup * num_calls - 1e-9)
        return min(max(start, 1), num_calls)


def check_positive_int(name: str, value: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
