"""Token pruning on MM-DiT transformers (SD3, Flux): the text stream itself gets shorter.

In an MM-DiT the prompt is part of the sequence: every joint block runs its text stream's Q/K/V,
output projection and MLP on every text position, and joint attention is quadratic in image + text
positions. The pipelines pad the text to a fixed length whatever the prompt: SD3 to 77 CLIP + 256
T5 positions (zeros when ``text_encoder_3=None``), Flux to 512 T5 positions. So from the first
pruned call :class:`MMDiTTokenPruning` (a subscriber of the transformer's clock) hands the
transformer only the kept text positions: it gathers ``encoder_hidden_states`` (and Flux's
``txt_ids``, from which the rotary embeddings are computed) before the transformer's first layer,
and every block runs on the kept tokens. During the warm-up the joint processors of
:mod:`~tokenprune_diffusers.joint` score each text position by the attention mass that the image
queries give it, with the same normalisation, rules and padding policies as on the UNet. Rows that
keep different numbers of positions are gathered to the longest and their padded slots are masked
as keys in every block (diffusers' joint processors take no such mask; these do).

What differs per pipeline family is written once, in :data:`FAMILIES`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry

from .clock import CallInfo, attach_clock, detach_clock, get_clock
from .config import RULES, TokenPruneConfig
from .generation import GenerationFollower
from .joint import FluxTokenPruneProcessor, JointTokenPruneProcessor
from .merge import TextStream, identical_groups, kept_groups, similar_groups, text_stream
from .report import JointDims, add_text_stream_flops
from .scoring import PADDING

__all__ = [
    "MMDiTTokenPruning",
    "JointTokenPruneProcessor",
    "FluxTokenPruneProcessor",
    "MMDiTFamily",
    "FAMILIES",
    "SUPPORTED_MMDIT_PIPELINES",
    "apply_mmdit",
    "remove_mmdit",
    "get_mmdit",
]


@dataclass(frozen=True)
class MMDiTFamily:
    """What token pruning needs to know about one MM-DiT pipeline family."""

    stock: tuple[str, ...]  # class names of the stock processors that ours replace
    processor: type  # ours
    text: tuple[str, str]  # (tokenizer, text encoder) whose ids make the text stream
    zero_tail: bool  # the positions after those ids are zeros the pipeline added (SD3 without T5)
    scored_blocks: str  # where the warm-up scores, for the docs
    dims: Callable[[Any], JointDims]  # the transformer's config -> what its FLOPs depend on
    image_tokens: Callable[[torch.Tensor, Any], int]  # (hidden_states, config) -> image tokens per row
    threshold: float | None = None  # the threshold when no rule is given (None: the library's, config.DEFAULT_THRESHOLD)
    merge_padding: float | None = None  # merge_padding when not given (None: no merge)


def _sd3_dims(c: Any) -> JointDims:
    p = c.patch_size
    return JointDims(width=c.num_attention_heads * c.attention_head_dim, text_in=c.joint_attention_dim, double=c.num_layers,
                     pre_only_last=True, dual=len(getattr(c, "dual_attention_layers", ()) or ()), image_in=p * p * c.in_channels,
                     image_out=p * p * (c.out_channels or c.in_channels), cond_in=256 + c.pooled_projection_dim)


def _flux_dims(c: Any) -> JointDims:
    guidance = bool(getattr(c, "guidance_embeds", False))
    return JointDims(width=c.num_attention_heads * c.attention_head_dim, text_in=c.joint_attention_dim, double=c.num_layers,
                     single=c.num_single_layers, image_in=c.in_channels,
                     image_out=c.patch_size ** 2 * (c.out_channels or c.in_channels),
                     cond_in=256 * (1 + guidance) + c.pooled_projection_dim, cond_mlps=2 + guidance)


FAMILIES = {
    "StableDiffusion3Pipeline": MMDiTFamily(
        stock=("JointAttnProcessor2_0",), processor=JointTokenPruneProcessor, text=("tokenizer", "text_encoder"),
        zero_tail=True, scored_blocks="every joint block", dims=_sd3_dims,
        image_tokens=lambda x, c: (x.shape[-2] // c.patch_size) * (x.shape[-1] // c.patch_size),  # (B, C, H, W)
        # measured on the trained SD3 toy (benchmarks/results/toy_sd3_adherence.md): every setting that
        # drops tokens costs prompt adherence (threshold 0.1: 96.5 -> 88.0% / 87.0 -> 70.5%), and under CFG
        # the empty negative prompt keeps the stream long anyway: by default keep every token; merge_padding
        # 0.8, chosen on validation prompts (seed 20000): 0.9-0.7 within a point or two of stock, 0.5 breaks
        # one-object prompts; the middle of the flat range, 88-91% of the text sequence gone on every call
        threshold=0.0,
        merge_padding=0.8,
    ),
    "FluxPipeline": MMDiTFamily(
        stock=("FluxAttnProcessor",), processor=FluxTokenPruneProcessor, text=("tokenizer_2", "text_encoder_2"),
        zero_tail=False, scored_blocks="the double-stream blocks", dims=_flux_dims,
        image_tokens=lambda x, c: x.shape[1],  # (B, N, C), packed
        # measured on the trained Flux toy (benchmarks/results/toy_flux_adherence.md): FluxPipeline runs T5
        # unmasked, so the padding carries the prompt (padding="drop": 79.0 -> 1.0% one-object adherence),
        # and threshold 0.1 removes nothing of it (78.0%): by default keep every token; merge_padding 0.9,
        # chosen on validation prompts (seed 20000): its padding positions are near-identical (0.9 and 0.5
        # merge them alike, every checker score equal to stock's), 81-88% of the text sequence gone
        threshold=0.0,
        merge_padding=0.9,
    ),
}
SUPPORTED_MMDIT_PIPELINES = tuple(FAMILIES)


class MMDiTTokenPruning(GenerationFollower):
    """Token pruning installed on an SD3 or Flux transformer (what
    :func:`~tokenprune_diffusers.apply_token_pruning` returns for such a pipeline): :attr:`config`,
    :attr:`report`, :attr:`schedule` as for the UNet."""

    def __init__(self, config: TokenPruneConfig, family: MMDiTFamily | None = None) -> None:
        if config.gate is not None:
            raise ValueError(f"gate is a UNet cross-attention option; MM-DiT pruning takes gate=None, got {config.gate!r}")
        super().__init__(config)
        self.family = family or FAMILIES["StableDiffusion3Pipeline"]
        self.originals: dict[str, Any] | None = None
        self.clock = None
        self.text_length: int | None = None  # text positions of the running call (after pruning)
        self.stream: TextStream | None = None  # the running call's gathered text positions (None: all)
        self._stream_cache: tuple | None = None  # (key, stream) of the running phase of the generation
        self.denoiser: weakref.ref | None = None  # the transformer (its cache hooks are reset when the text shortens)
        self._text: tuple | None = None  # (generation, identity of its text tensor)
        self.dims: JointDims | None = None  # the transformer's FLOP dimensions (set by apply_mmdit)
        self.transformer_config: Any = None
        self._merged_length: int | None = None  # text positions of the running call with the merges alone (no pruning)

    # ------------------------------------------------------------------ per transformer call (the clock calls these)
    def on_call(self, info: CallInfo, args: tuple = (), kwargs: dict | None = None) -> None:
        """A transformer call starts: take its plan; shorten its text stream in ``kwargs`` (the
        transformer is called with them): merged from the first call, pruned from the first pruned one."""
        gen = self._follow(info)
        text = kwargs.get("encoder_hidden_states") if kwargs is not None else None  # (B, L, D)
        self.text_length = text.shape[1] if isinstance(text, torch.Tensor) else None
        self.stream, self._merged_length = None, self.text_length
        if not isinstance(text, torch.Tensor):
            if len(args) > 1:
                self._warn_once("positional", "the transformer was called with encoder_hidden_states by position: "
                                              "token pruning needs it by name (as diffusers' pipelines pass it) and prunes nothing")
            return
        self._shorten(gen, info, text, kwargs)
        self._count(gen, text, kwargs)

    def _shorten(self, gen: Any, info: CallInfo, text: torch.Tensor, kwargs: dict) -> None:
        """Gather the call's text stream (and what goes with it) in ``kwargs``, from the plan."""
        if self._other_text(info, text, kwargs):
            gen.stop()
            return
        if gen.report.roles is None and not gen.bind_text(text, self.tokenizer, zero_tail=self.family.zero_tail) \
                and info.num_calls is not None:
            self._warn_once("roles", "token pruning does not know the token ids of this batch (prompt_embeds given?): "
                                     "only position 0 (the start token) is protected")
        stream = self._stream(gen, text)
        self.stream = stream
        if stream is None:
            return
        index = stream.index
        txt_ids = kwargs.get("txt_ids")  # (L, 3) Flux's text positions for the rotary embedding
        if isinstance(txt_ids, torch.Tensor):
            if not bool((txt_ids == txt_ids[:1]).all()) and not bool((index == index[:1]).all()):
                self._warn_once("txt_ids", "the text positions (txt_ids) differ and the rows keep different tokens: "
                                           "token pruning cannot shorten one txt_ids for every row and prunes nothing")
                gen.stop()
                self.stream, self._merged_length = None, text.shape[1]
                return
            kwargs["txt_ids"] = txt_ids[index[0].to(txt_ids.device)]  # (K, 3)
        kwargs["encoder_hidden_states"] = stream.gather(text)  # (B, K, D): every block runs on K text positions
        self.text_length = index.shape[1]
        if stream.bias is not None:
            extra = dict(kwargs.get("joint_attention_kwargs") or {})
            extra["text_key_bias"] = stream.bias  # (B, K): -inf on padded slots, log(m) on merged positions
            kwargs["joint_attention_kwargs"] = extra

    def _count(self, gen: Any, text: torch.Tensor, kwargs: dict) -> None:
        """The call's transformer FLOPs against stock, by cause, in its record of the report."""
        x = kwargs.get("hidden_states")
        if self.dims is None or not isinstance(x, torch.Tensor) or not gen.report.steps:
            return
        gen.report.flops_scope = "transformer"
        scored = self.dims.double if gen.plan.score and not gen.stopped else 0
        add_text_stream_flops(gen.report.steps[-1], self.dims, text.shape[0], self.family.image_tokens(x, self.transformer_config),
                              text.shape[1], self._merged_length, self.text_length, scored_blocks=scored)

    def _stream(self, gen: Any, text: torch.Tensor) -> TextStream | None:
        """The text positions this call runs on (None: all of them, as stock): the kept ones (before
        the decision, with ``padding="drop"``, every position but the padding, which the decision
        drops anyway), with SD3's identical zero T5 positions merged into one (``merge_zeros``) and
        near-identical padding positions into groups (``merge_padding``)."""
        B, L = text.shape[:2]
        if gen.stopped or gen.schedule is None:  # an unforeseen or unknown generation computes as stock
            return None
        index, _ = gen.kept(B)
        key = (gen, index, text.data_ptr(), tuple(text.shape))  # the same on every call of a phase
        cached = self._stream_cache
        if cached is None or cached[0][0] is not gen or cached[0][1] is not index or cached[0][2:] != key[2:]:
            cached = self._stream_cache = (key, *self._new_stream(gen, text, index))
        self._merged_length = cached[2]
        return cached[1]

    def _new_stream(self, gen: Any, text: torch.Tensor, index: torch.Tensor | None) -> tuple[TextStream | None, int]:
        """(stream, length): the stream, and the text length that the merges alone would run."""
        B, L = text.shape[:2]
        keep = None
        if index is not None:
            keep = gen.report.keep[-B:].to(text.device)  # (B, L) the decision's kept positions
        elif self.config.padding == "drop" and gen.schedule.prune_start is not None and gen.report.roles is not None:
            keep = gen.report.roles[-B:].to(text.device) != PADDING  # padding is dropped anyway: from the first call
        alone = torch.arange(L, device=text.device).expand(B, L)  # (B, L) every position standing for itself
        rep = alone
        zeros = torch.zeros(B, L, dtype=torch.bool, device=text.device)
        if self.family.zero_tail and self.config.merge_zeros:
            zeros = (text == 0).all(dim=-1)  # (B, L)
            rep = identical_groups(zeros)
        if self.config.merge_padding is not None and gen.schedule.prune_start is not None and gen.report.roles is not None:
            # from the first call, as the zero merge (the warm-up scores each group's slot, spread over its members)
            padding = (gen.report.roles[-B:].to(text.device) == PADDING) & ~zeros  # (B, L)
            rep = torch.where(padding, similar_groups(text, padding, self.config.merge_padding), rep)
        merged = int((rep == alone).sum(1).max())  # what the merges alone would run: the batch runs its longest row
        if keep is not None:
            rep = kept_groups(rep, keep)  # the decision never splits a group: it runs <= merged slots
        elif bool((rep == alone).all()):
            return None, merged
        return text_stream(rep, keep), merged

    def on_call_end(self, info: CallInfo) -> None:
        """After the last warm-up call, decide the kept tokens; when the text stream shortens, reset
        the transformer's stateful cache hooks (diffusers' ``enable_cache`` configs: FirstBlockCache,
        ...): what they hold has the full text length, and the next call, the first pruned one, then
        computes in full and fills them afresh."""
        gen, denoiser = self._gen, self.denoiser() if self.denoiser is not None else None
        if denoiser is None or gen is None or gen.stopped or gen.schedule is None:
            return
        if gen.schedule[info.call + 1].decide and gen.report.roles is not None:
            gen.decide(self.config)  # the scores are complete: decide now, to know whether the text shortens
            if gen.index is not None:
                HookRegistry.check_if_exists_or_initialize(denoiser).reset_stateful_hooks(recurse=True)

    def score(self, image_query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None,
              text_from: int, text_to: int | None = None, lse: torch.Tensor | None = None) -> None:
        """Warm-up: add the mass the image queries (B, H, N, d) give each text key; ``key`` is
        (B, H, S, d) over the joint sequence, its text keys ``text_from:text_to``; ``lse`` (B, H, N)
        the image queries' log-sum-exp over every key, where the attention kernel returned it."""
        spread = self.stream.scatter if self.stream is not None else None
        self._gen.accumulate(image_query, key, bias, self.config, text_from=text_from, text_to=text_to, spread=spread,
                             lse=lse)

    def _other_text(self, info: CallInfo, text: torch.Tensor, kwargs: dict) -> bool:
        """The transformer got another text tensor in the middle of a generation (FluxPipeline's true
        CFG calls it with the negative prompt), or an attention mask: compute as stock (warned)."""
        if (kwargs.get("joint_attention_kwargs") or {}).get("attention_mask") is not None:
            self._warn_once("mask", "the transformer was called with an attention_mask: token pruning prunes nothing")
            return True
        identity = (info.generation, text.data_ptr(), tuple(text.shape))
        if info.num_calls is None:  # calls outside a known generation compute as stock anyway
            return False
        if info.call == 0 or self._text is None or self._text[0] != info.generation:
            self._text = identity
            return False
        if identity != self._text:
            self._warn_once("text", "the transformer got another prompt tensor in the middle of a generation (true "
                                    "classifier-free guidance with a negative prompt?): token pruning computes this "
                                    "generation as stock from here on")
            return True
        return False


# ------------------------------------------------------------------ wiring
def family_of(pipe: Any) -> MMDiTFamily:
    """The pipeline's family; refuses, with the reason, a transformer pipeline this module cannot prune."""
    name = type(pipe).__name__
    family = FAMILIES.get(name)
    if family is None:
        raise TypeError(
            f"token pruning does not support {name} yet; it supports UNet pipelines (Stable Diffusion 1.x / 2.x, "
            f"SDXL and their img2img / inpainting variants) and {', '.join(SUPPORTED_MMDIT_PIPELINES)}"
        )
    if getattr(pipe, "text_encoder_3", None) is not None:
        raise TypeError(
            f"token pruning on {name} follows the roles of the CLIP tokens and the zero T5 positions of a pipeline "
            "built with text_encoder_3=None; with T5 loaded the T5 token roles are not followed yet"
        )
    ours = tuple(f.processor.__name__ for f in FAMILIES.values())
    odd = sorted({type(p).__name__ for p in pipe.transformer.attn_processors.values()} - set(family.stock) - set(ours))
    if odd:
        raise TypeError(f"token pruning on {name} replaces {', '.join(family.stock)}; the transformer has {', '.join(odd)}")
    return family


def mmdit_config(pipe: Any, options: dict) -> TokenPruneConfig:
    """The options of ``apply_token_pruning`` on this pipeline: without a rule, the family's
    threshold (:attr:`MMDiTFamily.threshold`) where it has one; without ``merge_padding``, the
    family's (:attr:`MMDiTFamily.merge_padding`)."""
    family = family_of(pipe)
    if family.threshold is not None and not any(options.get(rule) is not None for rule in RULES):
        options = {**options, "threshold": family.threshold}
    if "merge_padding" not in options:
        options = {**options, "merge_padding": family.merge_padding}
    return TokenPruneConfig.from_options(**options)


def check_supported(pipe: Any) -> None:
    """Refuse, with the reason, a transformer pipeline this module cannot prune."""
    family_of(pipe)


def get_mmdit(transformer: Any) -> MMDiTTokenPruning | None:
    clock = get_clock(transformer)
    return next((x for x in clock.listeners if isinstance(x, MMDiTTokenPruning)), None) if clock is not None else None


def apply_mmdit(pipe: Any, config: TokenPruneConfig) -> MMDiTTokenPruning:
    """Install token pruning on ``pipe.transformer`` (applying twice replaces the first)."""
    family = family_of(pipe)
    transformer = pipe.transformer
    previous = get_mmdit(transformer)
    originals = previous.originals if previous is not None else transformer.attn_processors
    remove_mmdit(transformer)
    pruning = MMDiTTokenPruning(config, family)
    pruning.originals = dict(originals)
    pruning.denoiser = weakref.ref(transformer)
    pruning.dims, pruning.transformer_config = family.dims(transformer.config), transformer.config
    pruning.clock = attach_clock(transformer, pruning, pipeline=pipe, num_steps=config.num_steps, text=family.text)
    pruning.tokenizer = getattr(pipe, family.text[0], None)
    transformer.set_attn_processor(family.processor(pruning))
    return pruning


def remove_mmdit(transformer: Any) -> None:
    """Put back the processors :func:`apply_mmdit` replaced; a no-op when none is installed."""
    installed = get_mmdit(transformer)
    if installed is None:
        return
    detach_clock(transformer, installed)
    transformer.set_attn_processor(dict(installed.originals))
