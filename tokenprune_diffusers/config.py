"""The options of token pruning: one frozen dataclass, the single source of their defaults,
validation and documentation (the processor, :func:`~tokenprune_diffusers.apply_token_pruning`
and the demo's command line all read them from here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

__all__ = ["TokenPruneConfig", "PADDING_POLICIES", "RULES"]

PADDING_POLICIES = ("score", "keep", "drop")
RULES = ("threshold", "keep_ratio", "top_k")

DEFAULT_THRESHOLD = 0.1


def _opt(default, help: str, group: str = "tinker"):
    return field(default=default, metadata={"help": help, "group": group})


@dataclass(frozen=True)
class TokenPruneConfig:
    """How, when and what to prune. Every field is checked here, not inside a denoising step.

    Scores. A prompt token's raw score is the cross-attention probability mass it receives,
    averaged over heads and image positions and summed over cross-attention layers and the scored
    calls (the warm-up). Per layer the mass sums to 1 over the 77 positions and the start token
    takes most of it, so the rules use the *normalised* score: raw score divided by the largest raw
    score among the prompt's words (the tokens between start and end-of-text). A word scoring 1.0
    is the most looked-at word of its prompt; ``threshold=0.1`` drops the words receiving less than
    a tenth of that. The normalisation makes ``threshold`` mean the same for short and long prompts
    and for models whose start token takes 90% or 99% of the mass.

    The start and end-of-text tokens are always kept. Exactly one pruning rule is active
    (``threshold`` when none is given). The ``help`` of each field (``TokenPruneConfig.help()``) is
    what the README's table and the demo's ``--help`` show.
    """

    threshold: float | None = _opt(None, f"keep candidates whose normalised score is >= this (in [0, 1]; {DEFAULT_THRESHOLD} when no other rule is given)", "rule")
    warmup: float = _opt(0.2, "share of the generation's steps that keep every token and are scored; 1.0 never prunes (and never scores)", "rule")
    keep_ratio: float | None = _opt(None, "instead of threshold: keep this share of the candidates, best first", "rule")
    top_k: int | None = _opt(None, "instead of threshold: keep the k best candidates", "rule")
    reuse_kv: bool = _opt(True, "project the (pruned) prompt to keys and values once per layer and generation: exact", "speed")
    merge_zeros: bool = _opt(True, "MM-DiT (SD3 without T5): the identical zero T5 positions run as one text position with log(n) added to its logit, from the first call: exact up to float rounding", "speed")
    merge_padding: float | None = _opt(None, "MM-DiT: from the first call (unless warmup=1), the positions after end-of-text whose inputs have cosine similarity >= this (in (0, 1]) run as one position, their mean, with log(n) added to its logit: approximate; apply_token_pruning sets the model family's measured value when not given", "speed")
    gate: float | None = _opt(None, "from this share of the steps on, reuse each layer's cross-attention output of the last computed call (T-GATE): approximate", "speed")
    min_tokens: int = _opt(1, "floor: at least this many words stay per prompt (best first), whatever the rule")
    padding: str = _opt("score", "positions after end-of-text: candidates like words (\"score\"), never pruned (\"keep\"), or always pruned (\"drop\"; on MM-DiTs from the first call)")
    num_steps: int | None = _opt(None, "denoiser calls per generation, only for hand-written loops (pipelines report it)")
    score_chunk: int = _opt(1 << 22, "elements of one (batch, heads, positions, tokens) probability chunk while scoring (peak memory)")
    record_maps: bool = _opt(True, "keep per-token spatial maps of the scored calls (for heat maps)")

    def __post_init__(self) -> None:
        rules = {k: getattr(self, k) for k in RULES if getattr(self, k) is not None}
        if len(rules) > 1:
            given = ", ".join(f"{k}={v!r}" for k, v in rules.items())
            raise ValueError(f"give one pruning rule, not several: {given}")
        for name in ("threshold", "keep_ratio", "gate"):
            if getattr(self, name) is not None:
                check_unit(name, getattr(self, name))
        if self.merge_padding is not None:
            check_unit("merge_padding", self.merge_padding)
            if self.merge_padding == 0:
                raise ValueError("merge_padding must be in (0, 1] (None: no merge), got 0")
        check_unit("warmup", self.warmup)
        for name in ("reuse_kv", "merge_zeros", "record_maps"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.top_k is not None and not _is_int(self.top_k, 0):
            raise ValueError(f"top_k must be a non-negative int, got {self.top_k!r}")
        if not _is_int(self.min_tokens, 0):
            raise ValueError(f"min_tokens must be a non-negative int, got {self.min_tokens!r}")
        if self.padding not in PADDING_POLICIES:
            raise ValueError(f"padding must be one of {PADDING_POLICIES}, got {self.padding!r}")
        if self.num_steps is not None:
            check_positive_int("num_steps", self.num_steps)
        check_positive_int("score_chunk", self.score_chunk)
        if self.rule == "threshold" and self.threshold is None:
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD)

    @classmethod
    def from_options(cls, **options) -> TokenPruneConfig:
        """``TokenPruneConfig(**options)``, with an unknown option refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown token-pruning option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(known))}")
        return cls(**options)

    @classmethod
    def help(cls) -> dict[str, tuple[object, str, str]]:
        """Field name -> (default, help text, group), in declaration order."""
        return {f.name: (f.default, f.metadata["help"], f.metadata["group"]) for f in fields(cls)}

    @classmethod
    def markdown_table(cls) -> str:
        """The options as the README's table: option, default, meaning."""
        rows = ["| option | default | meaning |", "| --- | --- | --- |"]
        for name, (default, text, _) in cls.help().items():
            shown = "-" if default is None else f'`"{default}"`' if isinstance(default, str) else f"`{default!r}`"
            rows.append(f"| `{name}` | {shown} | {text} |")
        return "\n".join(rows)

    @property
    def rule(self) -> str:
        """'threshold', 'keep_ratio' or 'top_k'."""
        if self.keep_ratio is not None:
            return "keep_ratio"
        if self.top_k is not None:
            return "top_k"
        return "threshold"

    @property
    def rule_value(self) -> float | int:
        return getattr(self, self.rule)


def _is_int(value, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def check_positive_int(name: str, value: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= 1 (bools refused)."""
    if not _is_int(value, 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_unit(name: str, value: float) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a number in [0, 1] (NaN and bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
