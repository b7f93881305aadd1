"""Which call of which generation is running: one clock per denoiser, fed by one diffusers hook.

An attention processor is called with tensors only: no timestep, no step index, no prompt. The
clock answers for everything that acts per denoiser call (the pruning processor, DeepCache): a
:class:`diffusers.hooks.ModelHook` on the denoiser (UNet) tells it that a call starts, and it
publishes a :class:`CallInfo` to its subscribers. Where it learns the rest, best source first:

1. ``begin_generation(num_steps, token_ids)`` before a hand-written loop (or ``num_steps`` given
   at construction): that many calls, then a new generation.
2. The pipeline the helper attached: its scheduler's ``timesteps`` (a new tensor at every
   ``set_timesteps``, so its identity keys the generation), ``_num_timesteps`` (denoiser calls; one
   per loop iteration, Heun's doubled calls included), the scheduler's ``order`` (calls per step),
   and the token ids its text encoder was called with (a hook on the text encoder), laid out in
   the pipeline's row order: negative prompts first under classifier-free guidance,
   ``num_images_per_prompt`` copies in place.
3. Last resort, for a processor installed by hand with ``set_attn_processor`` (no pipeline known):
   the running ``DiffusionPipeline.__call__`` found on the Python stack, its prompts re-tokenised.
   This is the only stack walk of the package.

Without a hook (a processor installed by hand), the processor drives its own clock with
:meth:`GenerationClock.layer_call`: a cross-attention layer seen twice means a new call.
"""

from __future__ import annotations

import itertools
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .config import check_positive_int

__all__ = ["CallInfo", "GenerationClock", "attach_clock", "detach_clock", "get_clock"]

_HOOK = "tokenprune_clock"
_TEXT_HOOK = "tokenprune_clock_text"
_MAX_DEPTH = 64
_MAX_RECORDS = 4  # text-encoder calls remembered between two generations


@dataclass(frozen=True)
class CallInfo:
    """One denoiser call, as the clock publishes it."""

    generation: int  # counts the generations this clock has seen, from 1
    call: int  # index of the call in its generation
    num_calls: int | None  # calls in the generation; None when unknown
    calls_per_step: int  # denoiser calls per solver step (the scheduler's order)
    batch: int  # rows of this call (halved after guidance collapse)
    token_ids: torch.Tensor | None  # (B, L) ids of the generation's rows at its first call, when known
    tokenizer: Any  # the pipeline's tokenizer, when known
    latent_hw: tuple[int, int] | None  # (h, w) of the latents
    manual: bool  # started by begin_generation() / num_steps

    @property
    def prompts(self) -> list[str] | None:
        """Text of each row, as the tokenizer reads the ids (special tokens left out)."""
        if self.token_ids is None or self.tokenizer is None:
            return None
        return self.tokenizer.batch_decode(self.token_ids.tolist(), skip_special_tokens=True)


class GenerationClock:
    """The generation and call of one denoiser, published to subscribers at every call.

    A subscriber has ``on_call(info, args, kwargs)`` (before the call; ``args`` / ``kwargs`` are
    the denoiser's inputs) and ``on_call_end(info)`` (after it).
    """

    def __init__(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps  # fallback for hand-written loops
        self.hooked = False  # True when a denoiser hook announces every call
        self.tokenizer = None
        self._pipeline = None
        self._text_encoder = None
        self._now: CallInfo | None = None
        self._key: Any = None
        self._first_batch = 0
        self._manual_over: Any = None  # the attached pipeline's timesteps when a hand-written loop began
        self._pending: tuple[int, torch.Tensor | None] | None = None
        self._listeners: list[Any] = []
        self._encoded: list[torch.Tensor] = []
        self._layers: set[int] = set()
        self._generations = itertools.count(1)
        self._warned: set[str] = set()

    @property
    def now(self) -> CallInfo | None:
        """The running (or last) call."""
        return self._now

    @property
    def pipeline(self) -> Any:
        return self._pipeline() if self._pipeline is not None else None

    @property
    def listeners(self) -> tuple:
        return tuple(self._listeners)

    def subscribe(self, listener: Any) -> None:
        if all(x is not listener for x in self._listeners):
            self._listeners.append(listener)
            self._warned.clear()  # a new installation hears the warnings again

    def unsubscribe(self, listener: Any) -> None:
        self._listeners = [x for x in self._listeners if x is not listener]

    def begin_generation(self, num_steps: int, token_ids: torch.Tensor | None = None) -> None:
        """Start a generation in a hand-written loop: ``num_steps`` denoiser calls follow.

        Args:
            num_steps: denoiser calls in the loop (one per step for most schedulers).
            token_ids: (B, L) token ids of the batch rows, so that start / end-of-text tokens and
                padding are recognised (optional).
        """
        check_positive_int("num_steps", num_steps)
        self._pending = (num_steps, token_ids)
        self._layers.clear()

    def reset(self) -> None:
        """Forget the running generation: the next call starts a new one."""
        self._now, self._key, self._pending = None, None, None
        self._layers.clear()

    # ------------------------------------------------------------------ feeding the clock
    def start_call(self, batch: int, latent_hw: tuple[int, int] | None = None, args: tuple = (), kwargs: dict | None = None) -> CallInfo:
        """A denoiser call of ``batch`` rows starts: publish where it stands."""
        self._now = info = self._next(batch, latent_hw)
        for listener in list(self._listeners):
            listener.on_call(info, args, kwargs if kwargs is not None else {})
        return info

    def end_call(self) -> None:
        for listener in list(self._listeners):
            listener.on_call_end(self._now)

    def layer_call(self, layer: int, batch: int) -> None:
        """For a processor with no denoiser hook: a layer seen twice means a new denoiser call."""
        if not self._layers or layer in self._layers:
            self._layers.clear()
            self.start_call(batch)
        self._layers.add(layer)

    def record_token_ids(self, ids: torch.Tensor) -> None:
        """The pipeline's text encoder was called with these (P, L) ids (the text-encoder hook)."""
        self._encoded = [*self._encoded[-(_MAX_RECORDS - 1) :], ids]

    # ------------------------------------------------------------------ where are we
    def _next(self, batch: int, latent_hw: tuple[int, int] | None) -> CallInfo:
        now = self._now
        if self._pending is not None:
            (num, ids), self._pending = self._pending, None
            return self._begin(object(), num, 1, ids, batch, latent_hw, manual=True)
        run = self._running(batch)
        if run is not None and now is not None and now.manual and run[0] is self._manual_over:
            run = None  # the attached pipeline's state is that of a generation before the hand-written loop
        if run is not None:
            key, num, order, rows, hw = run
            if now is None or key is not self._key:
                return self._begin(key, num, order, rows(), batch, latent_hw or hw)
            return self._advance(batch, latent_hw)
        if now is not None and now.manual:  # a hand-written loop: restart every num_calls calls
            if now.call + 1 >= now.num_calls or batch != self._first_batch:
                ids = now.token_ids if batch == self._first_batch else None
                return self._begin(object(), now.num_calls, 1, ids, batch, latent_hw, manual=True)
            return self._advance(batch, latent_hw)
        if self.num_steps is not None:
            return self._begin(object(), self.num_steps, 1, None, batch, latent_hw, manual=True)
        self._warn_once(
            "steps",
            "tokenprune_diffusers cannot tell how many denoiser calls this generation has (no diffusers pipeline "
            "call found), so it prunes and caches nothing. In a hand-written loop, pass num_steps=N or call "
            "begin_generation(N) before the loop.",
        )
        if now is None or now.num_calls is not None or batch != self._first_batch:
            return self._begin(object(), None, 1, None, batch, latent_hw)
        return self._advance(batch, latent_hw)

    def _begin(self, key, num_calls, order, token_ids, batch, latent_hw, manual=False) -> CallInfo:
        self._key, self._first_batch = key, batch
        if manual:  # a pipeline generation starts only when the pipeline's timesteps change again
            scheduler = getattr(self.pipeline, "scheduler", None)
            self._manual_over = getattr(scheduler, "timesteps", None)
        self._encoded = []
        return CallInfo(next(self._generations), 0, num_calls, order, batch, token_ids, self.tokenizer, latent_hw, manual)

    def _advance(self, batch: int, latent_hw) -> CallInfo:
        now = self._now
        return CallInfo(now.generation, now.call + 1, now.num_calls, now.calls_per_step, batch, now.token_ids,
                        now.tokenizer, latent_hw or now.latent_hw, now.manual)

    def _running(self, batch: int):
        """(key, num_calls, calls per step, row ids (a thunk), latent hw) of the running pipeline call, or None."""
        pipe, local = self.pipeline, None
        if pipe is None:
            found = _pipeline_on_stack()
            if found is None:
                return None
            pipe, local = found
            self.tokenizer = _text_pair(pipe)[0] or self.tokenizer
        num, scheduler = getattr(pipe, "_num_timesteps", None), getattr(pipe, "scheduler", None)
        if not isinstance(num, int) or scheduler is None:
            return None
        order = getattr(scheduler, "order", 1)
        order = order if isinstance(order, int) and order >= 1 else 1
        if local is None:
            rows = lambda: self._encoded_rows(pipe, batch)  # noqa: E731
            hw = None
        else:
            rows = lambda: _stack_rows(pipe, local, batch, self.tokenizer)  # noqa: E731
            latents = local.get("latents")
            hw = tuple(latents.shape[-2:]) if isinstance(latents, torch.Tensor) and latents.ndim == 4 else None
        return scheduler.timesteps, num, order, rows, hw

    def _encoded_rows(self, pipe: Any, batch: int) -> torch.Tensor | None:
        """The text encoder's ids of this generation, in the pipeline's row order."""
        enc = self._encoded
        if not enc:
            return None
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
        if cfg and len(enc) >= 2 and enc[-1].shape == enc[-2].shape:
            pos, neg = enc[-2], enc[-1]
        else:  # no negative encoded: the empty prompt's layout (SDXL's zero negative prompt)
            pos = enc[0]  # the prompt is encoded first (Flux's true CFG encodes a negative after it)
            neg = _tokenize(self.tokenizer, [""] * pos.shape[0], pos.shape[1]) if cfg else None
        return _layout(pos, neg, batch)

    # ------------------------------------------------------------------ wiring (this module only)
    def _attach_pipeline(self, pipeline: Any, text: tuple[str, str] | None = None) -> None:
        self._detach_pipeline()
        self._pipeline = weakref.ref(pipeline)
        self.tokenizer, encoder = _text_pair(pipeline, text)
        if encoder is not None:
            HookRegistry.check_if_exists_or_initialize(encoder).register_hook(_TextIdsHook(self), _TEXT_HOOK)
            self._text_encoder = weakref.ref(encoder)

    def _detach_pipeline(self) -> None:
        encoder = self._text_encoder() if self._text_encoder is not None else None
        registry = getattr(encoder, "_diffusers_hook", None)
        if registry is not None:
            registry.remove_hook(_TEXT_HOOK, recurse=False)
        self._pipeline = self._text_encoder = None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=5)


def get_clock(denoiser: Any) -> GenerationClock | None:
    """The clock installed on a denoiser (UNet), or None."""
    registry = getattr(denoiser, "_diffusers_hook", None)
    hook = registry.get_hook(_HOOK) if registry is not None else None
    return hook.clock if hook is not None else None


def attach_clock(denoiser: Any, listener: Any, pipeline: Any = None, num_steps: int | None = None,
                 text: tuple[str, str] | None = None) -> GenerationClock:
    """The denoiser's clock (installed on first use), with ``listener`` subscribed.

    Args:
        denoiser: the UNet or transformer.
        listener: an object with ``on_call`` / ``on_call_end``.
        pipeline: the pipeline that runs the denoiser (source 2 of the module docstring).
        num_steps: calls per generation for hand-written loops.
        text: names of the pipeline's (tokenizer, text encoder) whose ids the denoiser's text rows
            hold; default the first pair the pipeline has (Flux's text stream is ``tokenizer_2``'s).
    """
    clock = get_clock(denoiser)
    if clock is None:
        clock = GenerationClock()
        clock.hooked = True
        HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(_DenoiserHook(clock), _HOOK)
    if pipeline is not None:
        clock._attach_pipeline(pipeline, text)  # again too: the pipeline's tokenizer may have changed
    if num_steps is not None:
        clock.num_steps = num_steps
    clock.subscribe(listener)
    return clock


def detach_clock(denoiser: Any, listener: Any) -> None:
    """Unsubscribe ``listener``; the last one out removes the clock's hooks."""
    clock = get_clock(denoiser)
    if clock is None:
        return
    clock.unsubscribe(listener)
    if not clock.listeners:
        clock._detach_pipeline()
        denoiser._diffusers_hook.remove_hook(_HOOK, recurse=False)


class _DenoiserHook(ModelHook):
    def __init__(self, clock: GenerationClock) -> None:
        super().__init__()
        self.clock = clock

    def pre_forward(self, module, *args, **kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # (B, C, h, w)
        hw = tuple(sample.shape[-2:]) if sample.ndim == 4 else None
        self.clock.start_call(sample.shape[0], hw, args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        self.clock.end_call()
        return output


class _TextIdsHook(ModelHook):
    def __init__(self, clock: GenerationClock) -> None:
        super().__init__()
        self.clock = weakref.ref(clock)

    def pre_forward(self, module, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)  # (P, L)
        clock = self.clock()
        if clock is not None and isinstance(ids, torch.Tensor) and ids.ndim == 2:
            clock.record_token_ids(ids.detach().cpu())
        return args, kwargs


def _text_pair(pipe: Any, names: tuple[str, str] | None = None) -> tuple[Any, Any]:
    """(tokenizer, text encoder) of a pipeline: the pair named, else the first pair it has."""
    for tok, enc in [names] if names is not None else (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = getattr(pipe, tok, None), getattr(pipe, enc, None)
        if tokenizer is not None:
            return tokenizer, encoder
    return None, None


def _tokenize(tokenizer: Any, texts: list[str], length: int) -> torch.Tensor | None:
    if tokenizer is None:
        return None
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def _layout(pos: torch.Tensor, neg: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Rows of the denoiser batch: ``[neg] + pos``, each prompt repeated in place."""
    groups = [pos] if neg is None else [neg, pos]
    if any(g.shape != pos.shape for g in groups) or batch % (len(groups) * pos.shape[0]):
        return None
    copies = batch // (len(groups) * pos.shape[0])
    return torch.cat([g.repeat_interleave(copies, dim=0) for g in groups])


def _pipeline_on_stack() -> tuple[Any, dict] | None:
    """The innermost running ``DiffusionPipeline.__call__`` and its locals, or None (the only stack walk)."""
    from diffusers import DiffusionPipeline

    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__" and isinstance(frame.f_locals.get("self"), DiffusionPipeline):
            return frame.f_locals["self"], frame.f_locals
        frame = frame.f_back
    return None


def _stack_rows(pipe: Any, local: dict, batch: int, tokenizer: Any) -> torch.Tensor | None:
    """Ids of the batch rows, re-tokenised from the running call's arguments."""
    prompts = _as_list(local.get("prompt"))
    if prompts is None or tokenizer is None:
        return None  # prompt_embeds were given: no text to re-tokenise
    if hasattr(pipe, "maybe_convert_prompt"):  # textual inversion tokens, expanded as the pipeline does
        prompts = pipe.maybe_convert_prompt(prompts, tokenizer)
    length = getattr(tokenizer, "model_max_length", 77)
    neg = None
    if getattr(pipe, "do_classifier_free_guidance", False):
        negative = local.get("negative_prompt")
        negatives = [""] * len(prompts) if negative is None else _as_list(negative, len(prompts))
        if negatives is None or len(negatives) != len(prompts):
            return None
        neg = _tokenize(tokenizer, negatives, length)
    return _layout(_tokenize(tokenizer, prompts, length), neg, batch)


def _as_list(x: Any, n: int | None = None) -> list[str] | None:
    if isinstance(x, str):
        return [x] * (n or 1)
    if isinstance(x, (list, tuple)) and all(isinstance(p, str) for p in x):
        return list(x)
    return None
