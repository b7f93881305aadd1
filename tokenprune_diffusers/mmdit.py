"""Token pruning on MM-DiT transformers (SD3): the text stream itself gets shorter.

In an MM-DiT the prompt is part of the sequence: every joint block runs its text stream's Q/K/V,
output projection and MLP on every text position, and joint attention is quadratic in image + text
positions; SD3 pads the text to 77 CLIP + 256 T5 positions whatever the prompt (zeros when
``text_encoder_3=None``). So from the first pruned call :class:`MMDiTTokenPruning` (a subscriber
of the transformer's clock) hands the transformer only the kept text positions: it gathers
``encoder_hidden_states`` before the transformer's first layer, and every block runs on the kept
tokens. During the warm-up :class:`JointTokenPruneProcessor` (``JointAttnProcessor2_0``'s skeleton
with two marked additions) scores each text position by the attention mass that the image queries
give it, with the same normalisation, rules and padding policies as on the UNet. Rows that keep
different numbers of positions are gathered to the longest and their padded slots are masked as
keys in every block (diffusers' joint processors take no mask; this one does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from .clock import CallInfo, attach_clock, detach_clock, get_clock
from .config import TokenPruneConfig
from .generation import GenerationFollower
from .scoring import gather_rows

__all__ = ["MMDiTTokenPruning", "JointTokenPruneProcessor", "SUPPORTED_MMDIT_PIPELINES", "apply_mmdit", "remove_mmdit", "get_mmdit"]

SUPPORTED_MMDIT_PIPELINES = ("StableDiffusion3Pipeline",)
_STOCK_JOINT = (JointAttnProcessor2_0,)


class MMDiTTokenPruning(GenerationFollower):
    """Token pruning installed on an SD3 transformer (what :func:`~tokenprune_diffusers.apply_token_pruning`
    returns for such a pipeline): :attr:`config`, :attr:`report`, :attr:`schedule` as for the UNet."""

    def __init__(self, config: TokenPruneConfig) -> None:
        if config.gate is not None:
            raise ValueError(f"gate is a UNet cross-attention option; MM-DiT pruning takes gate=None, got {config.gate!r}")
        super().__init__(config)
        self.originals: dict[str, Any] | None = None
        self.clock = None

    # ------------------------------------------------------------------ per transformer call (the clock calls these)
    def on_call(self, info: CallInfo, args: tuple = (), kwargs: dict | None = None) -> None:
        """A transformer call starts: take its plan; from the first pruned call on, shorten its text
        stream in ``kwargs`` (the transformer is called with them)."""
        gen = self._follow(info)
        text = kwargs.get("encoder_hidden_states") if kwargs is not None else None  # (B, L, D)
        if not isinstance(text, torch.Tensor):
            if len(args) > 1:
                self._warn_once("positional", "the transformer was called with encoder_hidden_states by position: "
                                              "token pruning needs it by name (as diffusers' pipelines pass it) and prunes nothing")
            return
        if gen.report.roles is None and not gen.bind_text(text, self.tokenizer, zero_tail=True) and info.num_calls is not None:
            self._warn_once("roles", "token pruning does not know the token ids of this batch (prompt_embeds given?): "
                                     "only position 0 (the start token) is protected")
        index, valid = gen.kept(text.shape[0])
        if index is None:
            return
        kwargs["encoder_hidden_states"] = gather_rows(text, index)  # (B, K, D): every block runs on K text positions
        if valid is not None:
            extra = dict(kwargs.get("joint_attention_kwargs") or {})
            extra["text_key_mask"] = valid  # (B, K) False on the padded slots of shorter rows
            kwargs["joint_attention_kwargs"] = extra

    def on_call_end(self, info: CallInfo) -> None:
        pass

    def score(self, image_query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Warm-up: add the mass the image queries (B, H, N, d) give each text key; ``key`` is
        (B, H, N + L, d), image keys first."""
        self._gen.accumulate(image_query, key, bias, self.config, text_from=image_query.shape[2])


class JointTokenPruneProcessor:
    """``JointAttnProcessor2_0`` with two marked additions: the text key mask of padded slots, and
    scoring on the warm-up calls. One instance serves every joint attention layer."""

    def __init__(self, pruning: MMDiTTokenPruning) -> None:
        self.pruning = pruning

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        text_key_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        residual = hidden_states

        batch_size = hidden_states.shape[0]

        # `sample` projections.
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # `context` projections.
        if encoder_hidden_states is not None:
            encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
            encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
            encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)

            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)

            image_query = query
            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)

            # --- masking: the padded text slots of rows that keep fewer tokens are no keys
            bias = None
            if text_key_mask is not None:
                image_keys = torch.ones(batch_size, residual.shape[1], dtype=torch.bool, device=query.device)
                keys = torch.cat([image_keys, text_key_mask.to(query.device)], dim=1)  # (B, N + K)
                bias = torch.zeros(keys.shape, dtype=query.dtype, device=query.device).masked_fill(~keys, float("-inf"))
                bias = bias[:, None, None, :]  # (B, 1, 1, N + K)

            # --- scoring (warm-up calls only): the mass image queries give each text key
            plan = self.pruning.current_plan
            if plan is not None and plan.score:
                self.pruning.score(image_query, key, bias)
        else:
            bias = None

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            # Split the attention outputs.
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


# ------------------------------------------------------------------ wiring
def check_supported(pipe: Any) -> None:
    """Refuse, with the reason, a transformer pipeline this module cannot prune."""
    name = type(pipe).__name__
    if name not in SUPPORTED_MMDIT_PIPELINES:
        raise TypeError(
            f"token pruning does not support {name} yet; it supports UNet pipelines (Stable Diffusion 1.x / 2.x, "
            f"SDXL and their img2img / inpainting variants) and {', '.join(SUPPORTED_MMDIT_PIPELINES)}"
        )
    if getattr(pipe, "text_encoder_3", None) is not None:
        raise TypeError(
            f"token pruning on {name} follows the roles of the CLIP tokens and the zero T5 positions of a pipeline "
            "built with text_encoder_3=None; with T5 loaded the T5 token roles are not followed yet"
        )
    processors = pipe.transformer.attn_processors
    odd = sorted({type(p).__name__ for p in processors.values() if not isinstance(p, (*_STOCK_JOINT, JointTokenPruneProcessor))})
    if odd:
        raise TypeError(f"token pruning on {name} replaces JointAttnProcessor2_0; the transformer has {', '.join(odd)}")


def get_mmdit(transformer: Any) -> MMDiTTokenPruning | None:
    clock = get_clock(transformer)
    return next((x for x in clock.listeners if isinstance(x, MMDiTTokenPruning)), None) if clock is not None else None


def apply_mmdit(pipe: Any, config: TokenPruneConfig) -> MMDiTTokenPruning:
    """Install token pruning on ``pipe.transformer`` (applying twice replaces the first)."""
    check_supported(pipe)
    transformer = pipe.transformer
    previous = get_mmdit(transformer)
    originals = previous.originals if previous is not None else transformer.attn_processors
    remove_mmdit(transformer)
    pruning = MMDiTTokenPruning(config)
    pruning.originals = dict(originals)
    pruning.clock = attach_clock(transformer, pruning, pipeline=pipe, num_steps=config.num_steps)
    pruning.tokenizer = getattr(pipe, "tokenizer", None)
    transformer.set_attn_processor(JointTokenPruneProcessor(pruning))
    return pruning


def remove_mmdit(transformer: Any) -> None:
    """Put back the processors :func:`apply_mmdit` replaced; a no-op when none is installed."""
    installed = get_mmdit(transformer)
    if installed is None:
        return
    detach_clock(transformer, installed)
    transformer.set_attn_processor(dict(installed.originals))
