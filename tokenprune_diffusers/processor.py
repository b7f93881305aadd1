"""``TokenPruneProcessor``: prompt-token pruning inside diffusers' cross-attention.

Reading order: ``__call__`` (self-attention goes to the stock processor, cross-attention to
``_cross_attention``, whose skeleton is ``AttnProcessor2_0``'s with four additions marked
``# ---``: gating, pruning, K/V reuse, scoring); then ``on_call``, which the clock calls at every
denoiser call and which reads the generation's plan from :mod:`~tokenprune_diffusers.schedule`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from .clock import CallInfo, GenerationClock
from .config import TokenPruneConfig
from .generation import GenerationFollower, text_signature
from .report import add_cross_attention_flops
from .schedule import CallPlan
from .scoring import additive_mask, gather_mask, gather_rows

__all__ = ["TokenPruneProcessor"]

_STOCK = (AttnProcessor2_0,)  # the processor whose maths the skeleton below reproduces


class TokenPruneProcessor(GenerationFollower):
    r"""Cross-attention processor that drops the prompt tokens the image no longer looks at.

    For the warm-up share of a generation's steps every token is kept and each token's
    cross-attention probability mass is accumulated (over heads, image positions and layers). At the
    end of the warm-up each row of the batch (negative prompts of CFG included) keeps its start and
    end-of-text tokens plus the candidates its rule selects; from then on the pruned tokens are
    removed from the cross-attention keys and values (the encoder states are gathered before the
    K/V projections, so the work is really saved). Self-attention is computed by the stock
    ``AttnProcessor2_0``.

    Example:
        >>> pipe.unet.set_attn_processor(TokenPruneProcessor(threshold=0.1, warmup=0.2))
        >>> image = pipe("a cat wearing a red hat", num_inference_steps=25).images[0]

    Args:
        config: a :class:`~tokenprune_diffusers.TokenPruneConfig`; or give its options by name
            (``threshold``, ``warmup``, ``keep_ratio``, ``top_k``, ``min_tokens``, ``padding``,
            ``num_steps``, ``reuse_kv``, ``gate``, ...; their defaults and meaning are documented
            there, once).

    Installed by hand, the processor finds the running pipeline call itself (see
    :mod:`tokenprune_diffusers.clock`); :func:`~tokenprune_diffusers.apply_token_pruning` gives it
    the UNet's clock instead, which also counts calls on which no cross-attention runs. In a
    hand-written loop pass ``num_steps`` or call :meth:`begin_generation` before the loop.

    After (or during) a generation, :attr:`report` is a :class:`~tokenprune_diffusers.PruneReport`.
    """

    def __init__(self, config: TokenPruneConfig | None = None, /, **options: Any) -> None:
        if config is not None and not isinstance(config, TokenPruneConfig):
            raise TypeError(
                f"expected a TokenPruneConfig, got {config!r}; give the options by name, "
                "e.g. TokenPruneProcessor(threshold=0.1, warmup=0.2)"
            )
        if config is not None and options:
            raise TypeError(f"give a config or its options, not both (got options {sorted(options)})")
        super().__init__(config if config is not None else TokenPruneConfig.from_options(**options))
        self.originals: dict[str, Any] | None = None  # processors this one replaced (apply_token_pruning)
        self.clock = self._own_clock()  # replaced by the UNet's clock when applied
        self._stock = AttnProcessor2_0()
        self._classic = AttnProcessor()  # diffusers' choice for layers with scale_qk=False
        self._inner: weakref.WeakKeyDictionary[Attention, Any] = weakref.WeakKeyDictionary()
        self._probe: weakref.ref | None = None  # an attention module: is this processor still installed?

    # ------------------------------------------------------------------ public API
    def wrap(self, originals: dict[str, Any], modules: dict[str, Attention]) -> None:
        """Remember the processors this one replaces, per attention module. Stock processors are run
        by the skeleton below; any other (IP-Adapter and the like) is called with the pruned states."""
        self.originals = dict(originals)
        self._inner = weakref.WeakKeyDictionary()
        for name, proc in originals.items():
            if not isinstance(proc, TokenPruneProcessor):
                self._inner[modules[name]] = proc

    def use_clock(self, clock: GenerationClock | None, probe: Attention | None = None) -> None:
        """Follow ``clock`` (a denoiser's), idle whenever ``probe`` no longer runs this processor;
        ``None``: back to a clock of its own."""
        self.clock.unsubscribe(self)
        self.clock = clock if clock is not None else self._own_clock()
        self.clock.subscribe(self)
        self._probe = weakref.ref(probe) if probe is not None else None
        self._gen = None

    def _own_clock(self) -> GenerationClock:
        """A clock of its own, driven by this processor's cross-attention layers (installed by hand)."""
        clock = GenerationClock(num_steps=self.config.num_steps)
        clock.subscribe(self)
        return clock

    def begin_generation(self, num_steps: int, token_ids: torch.Tensor | None = None) -> None:
        """Start a generation in a hand-written loop (see :meth:`GenerationClock.begin_generation`)."""
        self.clock.begin_generation(num_steps, token_ids)

    def reset(self) -> None:
        """Forget the running generation (the next call starts a new one)."""
        self._gen = None
        self.clock.reset()

    # ------------------------------------------------------------------ the processor
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if getattr(attn, "add_q_proj", None) is not None:
            raise TypeError(
                "TokenPruneProcessor prunes UNet cross-attention; this is an MM-DiT joint attention layer (SD3, Flux): "
                "use apply_token_pruning(pipe, ...), which shortens the transformer's text stream"
            )
        inner = self._inner.get(attn)
        if inner is None:  # what diffusers itself installs on such a layer
            inner = self._stock if attn.scale_qk else self._classic
        if ip_adapter_masks is not None:  # named so that Attention.forward passes it on
            kwargs["ip_adapter_masks"] = ip_adapter_masks
        if encoder_hidden_states is None or not attn.is_cross_attention:
            return inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return self._cross_attention(inner, attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    @torch.compiler.disable
    def _cross_attention(self, inner, attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs):
        text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states  # (B, L, D)
        plan, index, valid = self._layer_plan(attn, text)
        if self._gen is None:  # not following any generation (idle): as stock
            return inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        n_query = hidden_states.shape[-2] * hidden_states.shape[-1] if hidden_states.ndim == 4 else hidden_states.shape[1]
        if plan.gated and id(attn) in self._gen.out:  # --- gating: cross-attention has converged; reuse its output
            self._count(attn, text.shape[0], n_query, text.shape[1], text.shape[1], gated=True)
            return self._kept_output(attn, text.shape[0])
        if type(inner) not in _STOCK:  # subclasses may change the maths: delegate to them
            out = self._delegate(inner, plan, index, valid, attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        else:
            out = self._skeleton(plan, index, valid, attn, hidden_states, text, attention_mask, temb, n_query)
        if plan.fill or plan.gated:  # gated but not kept (a layer skipped by DeepCache when filling): keep now
            self._gen.out[id(attn)] = out
        return out

    def _skeleton(self, plan, index, valid, attn, hidden_states, encoder_hidden_states, attention_mask, temb, n_query):
        """``AttnProcessor2_0.__call__`` with the marked additions."""
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
        query, key, value, attention_mask, reused = self._project(plan, index, valid, attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch_size, head_dim = query.shape[0], query.shape[-1]

        # --- scoring (warm-up calls only): the probabilities the fused kernel never materialises
        if plan.score:
            self._gen.accumulate(query, key, attention_mask, self.config)  # SDPA's default scale, as AttnProcessor2_0
        self._count(attn, batch_size, n_query, encoder_hidden_states.shape[1], key.shape[-2], scored=plan.score, kv_reused=reused)

        # the output of sdp = (batch, num_heads, seq_len, head_dim)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )  # (B, H, N, d)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (B, N, C)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _project(self, plan, index, valid, attn, hidden_states, encoder_hidden_states, attention_mask, temb, need_value=True):
        """The skeleton's front half: (query, key, value, mask, K/V reused); value is None unless needed."""
        text = encoder_hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        if hidden_states.ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, N, C)

        batch_size, sequence_length, _ = encoder_hidden_states.shape  # (B, L, D)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])  # (B, H, 1|N, L)
            attention_mask = additive_mask(attention_mask, hidden_states.dtype)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, N, C)

        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        # --- pruning: drop the pruned tokens before the K/V projections (the work saved)
        if index is not None:
            attention_mask = gather_mask(attention_mask, index, valid, ndim=4)  # (B, H|1, 1|N, K)
            if attention_mask is not None:
                attention_mask = attention_mask.to(query.dtype)

        # --- reuse: the prompt does not change during a generation; project it once per layer
        kv = self._reused_kv(attn, text, index) if need_value else None
        if kv is None:
            if index is not None:
                encoder_hidden_states = gather_rows(encoder_hidden_states, index)  # (B, K, D)

            key = attn.to_k(encoder_hidden_states)  # (B, K, C)
            value = attn.to_v(encoder_hidden_states) if need_value else None  # (B, K, C)

            head_dim = key.shape[-1] // attn.heads

            key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, K, d)
            if value is not None:
                value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, K, d)

            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if need_value and self.config.reuse_kv:
                self._gen.kv[id(attn)] = (text, self._gen.text_sig, index, key, value)
        else:
            key, value = kv

        head_dim = key.shape[-1]

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, d)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        return query, key, value, attention_mask, kv is not None

    def _delegate(self, inner, plan, index, valid, attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs):
        """A custom processor (IP-Adapter and the like): score with the skeleton's front half, then
        call it with the pruned text states and mask. Extra encoder inputs (IP-Adapter image tokens)
        are untouched."""
        extra = encoder_hidden_states[1:] if isinstance(encoder_hidden_states, tuple) else None
        text = encoder_hidden_states[0] if extra is not None else encoder_hidden_states  # (B, L, D)
        length = text.shape[1]
        if plan.score:
            query, key, _, mask, _ = self._project(plan, None, None, attn, hidden_states, text, attention_mask, temb, need_value=False)
            self._gen.accumulate(query, key, mask, self.config, scale=attn.scale)
        if index is not None:
            text = gather_rows(text, index)  # (B, K, D)
            if attention_mask is not None:
                attention_mask = additive_mask(attention_mask, hidden_states.dtype)
            attention_mask = gather_mask(attention_mask, index, valid, ndim=3)  # (B, 1, K)
            if attention_mask is not None:
                attention_mask = attention_mask.to(hidden_states.dtype)
        n_query = hidden_states.shape[-2] * hidden_states.shape[-1] if hidden_states.ndim == 4 else hidden_states.shape[1]
        self._count(attn, text.shape[0], n_query, length, text.shape[1], scored=plan.score)
        states = (text, *extra) if extra is not None else text
        return inner(attn, hidden_states, states, attention_mask, temb, **kwargs)

    # ------------------------------------------------------------------ caches
    def _reused_kv(self, attn: Attention, text: torch.Tensor, index: torch.Tensor | None):
        """(key, value) projected on an earlier call of this generation from the same prompt
        tensor with the same kept tokens, or None."""
        if not self.config.reuse_kv:
            return None
        gen = self._gen
        hit = gen.kv.pop(id(attn), None) if gen.last_call else gen.kv.get(id(attn))  # freed on the last call
        if hit is None:
            return None
        src, sig, kept, key, value = hit
        return (key, value) if src is text and sig == gen.text_sig and kept is index else None

    def _kept_output(self, attn: Attention, batch: int) -> torch.Tensor:
        """The layer's output kept at the last computed call; after guidance collapse (half the
        rows), the positive (prompt) rows' outputs. T-GATE averages the negative and positive rows
        instead; on the trained toy model that cost far more prompt adherence (gate 0.4 + collapse,
        one-object prompts: 61% all-correct with the mean, 97% with the positive rows, stock 98%)."""
        gen = self._gen
        last = gen.last_call
        out = gen.out.pop(id(attn)) if last else gen.out[id(attn)]  # (2B or B, ...); freed on the last call
        if out.shape[0] == batch:
            return out
        if out.shape[0] != 2 * batch:
            raise RuntimeError(f"gated call with {batch} rows, but {out.shape[0]} rows were kept")
        positive = out[batch:].clone()  # (B, ...): the negative rows come first; the clone frees them
        if not last:
            gen.out[id(attn)] = positive
        return positive

    # ------------------------------------------------------------------ per denoiser call (the clock calls these)
    def on_call(self, info: CallInfo, args: tuple = (), kwargs: dict | None = None) -> None:
        """A denoiser call starts: take its plan from the generation's schedule."""
        probe = self._probe() if self._probe is not None else None
        if self._probe is not None and (probe is None or probe.processor is not self):
            return  # replaced by set_attn_processor(): idle
        self._follow(info)

    def on_call_end(self, info: CallInfo) -> None:
        """A denoiser call ended: the layers that did not run (skipped by DeepCache) are credited to it."""
        gen = self._gen
        if gen is None or gen.info is not info or not gen.report.steps:
            return
        for layer, (dims, queries, tokens) in gen.layers.items():
            if layer not in gen.ran:
                add_cross_attention_flops(gen.report.steps[-1], dims, gen.batch, info.batch, queries, tokens, tokens, skipped=True)

    def _layer_plan(self, attn: Attention, text: torch.Tensor) -> tuple[CallPlan, torch.Tensor | None, torch.Tensor | None]:
        """Called by every cross-attention layer: the call's plan and kept indices for these rows."""
        if not self.clock.hooked:  # installed by hand: a layer seen twice means a new call
            self.clock.layer_call(id(attn), text.shape[0])
        gen = self._gen
        if gen is None:
            return CallPlan(0, 0), None, None
        if gen.report.roles is None and not gen.bind_text(text, self.tokenizer) and gen.info.num_calls is not None:
            self._warn_once(
                "roles",
                "TokenPruneProcessor does not know the token ids of this batch (prompt_embeds given, no "
                "tokenizer, or an unusual pipeline), so it cannot tell words from end-of-text and padding: only "
                "position 0 (the start token) is protected. Pass token_ids to begin_generation().",
            )
        if gen.text_sig is None:
            gen.text_sig = text_signature(text)
        gen.ran.add(id(attn))
        return (gen.plan, *gen.kept(text.shape[0]))

    # ------------------------------------------------------------------ accounting
    def _count(self, attn, batch, queries, full_len, kept_len, *, scored=False, kv_reused=False, gated=False) -> None:
        dims = dict(query_dim=getattr(attn.to_q, "in_features", attn.inner_dim), cross_dim=attn.cross_attention_dim,
                    inner=attn.inner_dim, out_dim=attn.out_dim)
        self._gen.layers.setdefault(id(attn), (dims, queries, full_len))
        add_cross_attention_flops(self._gen.report.steps[-1], dims, self._gen.batch, batch, queries, full_len, kept_len,
                                  scored=scored, kv_reused=kv_reused, gated=gated)
