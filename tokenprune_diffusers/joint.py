"""Joint-attention processors of MM-DiT token pruning: diffusers' own skeletons plus marked additions.

:class:`JointTokenPruneProcessor` is ``JointAttnProcessor2_0`` (SD3: image keys first, then text);
:class:`FluxTokenPruneProcessor` is ``FluxAttnProcessor`` (Flux: text keys first, then image). Each
adds two things, marked ``# ---``: the text key bias (``-inf`` on the padded slots of rows that
keep fewer text positions, ``log(m)`` on a position standing for m identical ones; the stock
processors take none), and, on the warm-up calls, the scoring of each
text key by the attention mass the image queries give it (``pruning.score``): on those calls the
attention runs through :func:`~tokenprune_diffusers.scoring.attention_with_lse`, the same kernel
with each query's log-sum-exp, so that scoring computes only the image x text logits (where the
kernel returns none, scoring recomputes the normaliser). ``pruning`` is the
:class:`~tokenprune_diffusers.mmdit.MMDiTTokenPruning` that installed them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb

from .scoring import attention_with_lse

__all__ = ["JointTokenPruneProcessor", "FluxTokenPruneProcessor", "key_bias"]


def key_bias(text_key_bias: torch.Tensor | None, image_len: int, text_first: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive (B, 1, 1, S) bias over the joint sequence's keys; None when there is none.

    Args:
        text_key_bias: (B, K) additive bias of the text keys (``-inf`` on the padded slots of rows
            that keep fewer positions, ``log(m)`` on a position standing for m identical ones), or None.
        image_len: N image positions of the joint sequence (bias 0).
        text_first: the sequence is text then image (Flux), else image then text (SD3).
    """
    if text_key_bias is None:
        return None
    image = torch.zeros(text_key_bias.shape[0], image_len, dtype=dtype, device=text_key_bias.device)
    text = text_key_bias.to(dtype)
    return torch.cat([text, image] if text_first else [image, text], dim=1)[:, None, None, :]


class JointTokenPruneProcessor:
    """``JointAttnProcessor2_0`` with two marked additions: the text key bias, and
    scoring on the warm-up calls. One instance serves every joint attention layer."""

    def __init__(self, pruning: Any) -> None:
        self.pruning = pruning

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        text_key_bias: torch.Tensor | None = None,
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

            # --- text key bias: padded slots of rows that keep fewer tokens are no keys; merged positions count m times
            text_bias = text_key_bias.to(query.device) if text_key_bias is not None else None
            bias = key_bias(text_bias, residual.shape[1], False, query.dtype)  # (B, 1, 1, N + K) or None

            # --- scoring (warm-up calls only): the mass image queries give each text key
            plan = self.pruning.current_plan
            scoring = plan is not None and plan.score
        else:
            bias, scoring = None, False

        if scoring:  # --- the same attention, with each query's log-sum-exp where the kernel returns it
            hidden_states, lse = attention_with_lse(query, key, value, bias)
            n = residual.shape[1]
            self.pruning.score(image_query, key, bias, text_from=n, lse=lse[:, :, :n] if lse is not None else None)
        else:
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


class FluxTokenPruneProcessor:
    """``FluxAttnProcessor`` with two marked additions: the text key bias, and
    scoring on the warm-up calls (in the double-stream blocks, where text and image are separate
    streams). In the single-stream blocks the sequence arrives concatenated, text first; its text
    length is the running call's (``pruning.text_length``). One instance serves every block."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, pruning: Any) -> None:
        self.pruning = pruning

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        text_key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query, key, value, encoder_query, encoder_key, encoder_value = _qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # --- text key bias: padded slots of rows that keep fewer tokens are no keys; merged positions count m times
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.pruning.text_length
        if text_key_bias is not None:
            if attention_mask is not None:
                raise ValueError("token pruning on Flux cannot combine its text key bias with an attention_mask")
            attention_mask = key_bias(text_key_bias.to(query.device), query.shape[1] - text_len, True, query.dtype)

        # --- scoring (warm-up calls, double-stream blocks): the mass image queries give each text key
        plan = self.pruning.current_plan
        scoring = plan is not None and plan.score and encoder_hidden_states is not None
        lse = None
        q, k = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, S, d) views, for scoring
        if scoring and self._attention_backend is None:  # --- the native attention, with each query's log-sum-exp
            hidden_states, lse = attention_with_lse(q, k, value.transpose(1, 2), attention_mask)
            hidden_states = hidden_states.transpose(1, 2)  # (B, S, H, d)
        else:
            hidden_states = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        if scoring:
            self.pruning.score(q[:, :, text_len:], k, attention_mask, text_from=0, text_to=text_len,
                               lse=lse[:, :, text_len:] if lse is not None else None)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


def _qkv_projections(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """Flux's Q/K/V projections of both streams, fused or not (as diffusers' ``_get_qkv_projections``)."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        encoder_query = encoder_key = encoder_value = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            encoder_query, encoder_key, encoder_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, encoder_query, encoder_key, encoder_value
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    encoder_query = encoder_key = encoder_value = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        encoder_query = attn.add_q_proj(encoder_hidden_states)
        encoder_key = attn.add_k_proj(encoder_hidden_states)
        encoder_value = attn.add_v_proj(encoder_hidden_states)
    return query, key, value, encoder_query, encoder_key, encoder_value
