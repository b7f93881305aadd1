"""The maths of token pruning: tensors in, tensors out. Knows nothing of UNets or pipelines.

Shapes: B prompts (batch rows), H heads, N image positions (queries), L prompt tokens, d head dim.
Token roles (one int per position, see :data:`SPECIAL`, :data:`WORD`, :data:`PADDING`) say which
positions may be pruned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "SPECIAL",
    "WORD",
    "PADDING",
    "attention_mass",
    "attention_with_lse",
    "normalise_scores",
    "select_tokens",
    "kept_index",
    "gather_rows",
    "gather_mask",
    "additive_mask",
    "token_roles",
    "unknown_roles",
]

SPECIAL, WORD, PADDING = 0, 1, 2  # start / end-of-text (always kept), prompt words, positions after end-of-text


def attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_bias: torch.Tensor | None = None,
    chunk_elems: int = 1 << 22,
    with_positions: bool = False,
    scale: float | None = None,
    keys_from: int = 0,
    keys_to: int | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-attention probability mass each token receives, computed in chunks of image positions.

    The fused SDPA kernel never materialises the probabilities, so they are recomputed here, one
    chunk of queries at a time, in fp32: peak memory is ``chunk_elems`` elements, whatever the
    resolution. Given each query's log-sum-exp over every key (``lse``, what
    :func:`attention_with_lse` returns), only the returned keys' logits are computed: in joint
    attention, N x K of them instead of N x (N + K).

    Args:
        query: (B, H, N, d) queries.
        key: (B, H, L, d) keys.
        attn_bias: additive bias broadcastable to (B, H, N, L), or None.
        chunk_elems: size of one (B, H, chunk, L) probability block.
        with_positions: also return the per-position map (summed over heads).
        scale: logit scale; default 1/sqrt(d), what F.scaled_dot_product_attention uses.
        keys_from, keys_to: the softmax runs over every key, but only the keys ``keys_from:keys_to``
            are returned (joint attention: the text keys that are scored, after the image keys in
            SD3, before them in Flux).
        lse: (B, H, N) log-sum-exp of each query's scaled, biased logits over all L keys, or None.

    Returns:
        mass: (B, L') mean probability per token over heads and positions, L' the returned keys
            (each row sums to 1 when every key is returned).
        per_position: (B, N, L') probabilities summed over heads, or None.
    """
    B, H, N, d = query.shape  # (B, H, N, d)
    L = key.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = slice(keys_from, L if keys_to is None else keys_to)
    logit_keys = keys if lse is not None else slice(0, L)  # with the normaliser known, only the returned keys
    if attn_bias is not None:
        attn_bias = attn_bias[..., logit_keys]
    key_t = key[..., logit_keys, :].float().transpose(-1, -2)  # (B, H, d, L'')
    step = max(1, chunk_elems // max(1, B * H * key_t.shape[-1]))
    mass = torch.zeros(B, keys.stop - keys.start, dtype=torch.float32, device=query.device)  # (B, L')
    per_position = [] if with_positions else None
    for s in range(0, N, step):
        logits = (query[:, :, s : s + step].float() @ key_t) * scale  # (B, H, c, L'')
        if attn_bias is not None:
            bias = attn_bias if attn_bias.shape[-2] == 1 else attn_bias[..., s : s + step, :]
            logits = logits + bias.float()  # (B, H, c, L'')
        if lse is None:
            probs = logits.softmax(dim=-1)[..., keys]  # (B, H, c, L')
        else:
            probs = (logits - lse[:, :, s : s + step, None].float()).exp()  # (B, H, c, L')
        probs_h = probs.sum(dim=1)  # (B, c, L')
        mass += probs_h.sum(dim=1)  # (B, L)
        if per_position is not None:
            per_position.append(probs_h)
    mass /= H * N
    return mass, (torch.cat(per_position, dim=1) if per_position is not None else None)


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias)`` and, where the fused
    kernel exposes it, each query's log-sum-exp over the keys, so that scoring need not recompute it.

    On CPU this is the kernel that SDPA itself runs (``aten._scaled_dot_product_flash_attention_for_cpu``:
    the same output, bit for bit); elsewhere, or where that kernel refuses the inputs, the output of
    SDPA and None (then :func:`attention_mass` recomputes the normaliser). Under
    ``sdpa_kernel`` without the flash backend, SDPA chooses as ever.

    Args:
        query, key, value: (B, H, S, d).
        attn_bias: additive bias broadcastable to (B, H, S, S), or None.

    Returns:
        output: (B, H, S, d); lse: (B, H, S) fp32, or None.
    """
    # the fused kernel where SDPA would run it (``torch.nn.attention.sdpa_kernel`` may have ruled it out)
    if query.device.type == "cpu" and _CPU_FLASH is not None and torch.backends.cuda.flash_sdp_enabled():
        try:
            output, lse = _CPU_FLASH(query, key, value, attn_mask=attn_bias)
            return output, lse
        except RuntimeError:  # inputs the fused kernel does not take: SDPA picks another
            pass
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias), None


try:  # the CPU kernel of F.scaled_dot_product_attention, which also returns the log-sum-exp
    _CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # a torch without it: scoring recomputes the normaliser
    _CPU_FLASH = None


def normalise_scores(mass: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """Raw mass divided by the largest mass among the prompt's words, per row.

    Args:
        mass: (B, L) raw scores.
        roles: (B, L) token roles.

    Returns:
        (B, L) normalised scores: 1.0 for the most attended word of each prompt. Rows without
        words are normalised by their largest non-special mass.
    """
    words = roles == WORD  # (B, L)
    ref_words = torch.where(words, mass, torch.zeros_like(mass)).amax(dim=1, keepdim=True)  # (B, 1)
    ref_other = torch.where(roles != SPECIAL, mass, torch.zeros_like(mass)).amax(dim=1, keepdim=True)  # (B, 1)
    ref = torch.where(words.any(dim=1, keepdim=True), ref_words, ref_other)  # (B, 1)
    return mass / ref.clamp_min(torch.finfo(mass.dtype).tiny)  # (B, L)


def select_tokens(
    scores: torch.Tensor,
    roles: torch.Tensor,
    *,
    rule: str,
    value: float,
    min_tokens: int,
    padding: str,
) -> torch.Tensor:
    """Which tokens to keep, per row.

    Args:
        scores: (B, L) normalised scores (:func:`normalise_scores`).
        roles: (B, L) token roles.
        rule: "threshold" (keep candidates scoring >= value), "keep_ratio" (keep ceil(value * n)
            best candidates) or "top_k" (keep the ``int(value)`` best candidates).
        min_tokens: at least this many words are kept per row (best first).
        padding: "score" (padding positions are candidates like words), "keep" or "drop".

    Returns:
        (B, L) bool keep mask. Special tokens are always kept.
    """
    special, words, pad = roles == SPECIAL, roles == WORD, roles == PADDING  # (B, L) each
    cand = words | pad if padding == "score" else words  # (B, L)
    # rank of each candidate within its row, best first (non-candidates rank last)
    masked = torch.where(cand, scores, torch.full_like(scores, -math.inf))  # (B, L)
    order = masked.argsort(dim=1, descending=True, stable=True)  # (B, L)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    n_cand = cand.sum(dim=1, keepdim=True)  # (B, 1)
    if rule == "threshold":
        keep = cand & (scores >= value)
    elif rule == "keep_ratio":
        keep = cand & (rank < torch.ceil(n_cand * value - 1e-9))
    elif rule == "top_k":
        keep = cand & (rank < int(value))
    else:
        raise ValueError(f"unknown rule {rule!r}")
    # floor: the min_tokens best words
    word_scores = torch.where(words, scores, torch.full_like(scores, -math.inf))  # (B, L)
    word_order = word_scores.argsort(dim=1, descending=True, stable=True)
    word_rank = torch.empty_like(word_order).scatter_(
        1, word_order, torch.arange(scores.shape[1], device=scores.device).expand_as(word_order)
    )
    keep |= words & (word_rank < min_tokens)
    keep |= special
    if padding == "keep":
        keep |= pad
    return keep  # (B, L)


def kept_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions to gather for a keep mask, padded to the longest row.

    Args:
        keep: (B, L) bool.

    Returns:
        index: (B, K) kept positions in their original order, K = max kept count; short rows are
            padded with their last kept position.
        valid: (B, K) bool, False on padded slots; None when every row keeps K tokens (no mask needed).
    """
    counts = keep.sum(dim=1)  # (B,)
    K = int(counts.max())
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # (B, L) kept first, in order
    index = order[:, :K]  # (B, K)
    if bool((counts == K).all()):
        return index, None
    valid = torch.arange(K, device=keep.device) < counts[:, None]  # (B, K)
    last = index.gather(1, (counts - 1).clamp_min(0)[:, None])  # (B, 1)
    return torch.where(valid, index, last), valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) -> (B, K, D), the rows named by index (B, K)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def gather_mask(mask: torch.Tensor | None, index: torch.Tensor, valid: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """Gather an additive attention mask along its last (token) axis, and mask padded slots.

    Args:
        mask: (B, ..., L) additive mask, or None.
        index: (B, K) gathered positions.
        valid: (B, K) bool or None (see :func:`kept_index`).
        ndim: number of dims of the mask to build when ``mask`` is None.

    Returns:
        (B, ..., K) additive mask, or None when nothing needs masking.
    """
    pad_bias = None
    if valid is not None:
        dtype = mask.dtype if mask is not None else torch.float32
        pad_bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, -math.inf)  # (B, K)
    if mask is None:
        if pad_bias is None:
            return None
        return pad_bias.view(pad_bias.shape[0], *([1] * (ndim - 2)), -1)  # (B, 1.., K)
    lead = mask.shape[1:-1]
    idx = index.view(index.shape[0], *([1] * len(lead)), -1).expand(mask.shape[0], *lead, -1)  # (B, ..., K)
    out = mask.gather(-1, idx)  # (B, ..., K)
    if pad_bias is not None:
        out = out + pad_bias.view(pad_bias.shape[0], *([1] * len(lead)), -1).to(out.dtype)
    return out


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True = attend) as an additive one (0 / -inf); others unchanged."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)


def token_roles(token_ids: torch.Tensor, bos_id: int | None, eos_id: int | None) -> torch.Tensor:
    """Role of each position: start / end-of-text are SPECIAL, the words between them WORD, the
    rest PADDING.

    The end of the text is found from the positions, not from the first end-of-text id: it is the
    first position of the run of end-of-text ids that ends at the last one (CLIP pads with that id;
    with another padding id the run is the end-of-text token alone). A literal ``<|endoftext|>``
    typed inside the prompt is therefore SPECIAL (kept, never a candidate) and the words after it
    stay words.

    Args:
        token_ids: (B, L) ids.
        bos_id, eos_id: the tokenizer's start and end-of-text ids.

    Returns:
        (B, L) int8 roles.
    """
    B, L = token_ids.shape
    pos = torch.arange(L, device=token_ids.device).expand(B, L)  # (B, L)
    is_eos = token_ids == eos_id if eos_id is not None else torch.zeros_like(token_ids, dtype=torch.bool)
    last_eos = torch.where(is_eos, pos, -1).amax(1)  # (B,), -1 when the row has none
    last_other = torch.where(~is_eos & (pos < last_eos[:, None]), pos, -1).amax(1)  # (B,)
    end = torch.where(last_eos >= 0, last_other + 1, torch.full_like(last_eos, L))  # (B,) end-of-text position
    roles = torch.full((B, L), WORD, dtype=torch.int8, device=token_ids.device)
    roles[pos > end[:, None]] = PADDING
    roles[pos == end[:, None]] = SPECIAL
    roles[is_eos & (pos < end[:, None])] = SPECIAL  # end-of-text ids typed inside the prompt
    if bos_id is not None:
        roles[(pos == 0) & (token_ids == bos_id)] = SPECIAL
    return roles


def unknown_roles(batch: int, length: int, device: torch.device | None = None) -> torch.Tensor:
    """Roles when no token ids are known: position 0 (the start token) is kept, the rest are words."""
    roles = torch.full((batch, length), WORD, dtype=torch.int8, device=device)
    roles[:, 0] = SPECIAL
    return roles
