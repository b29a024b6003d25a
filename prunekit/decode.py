"""Greedy decoding with a preallocated KV cache and (optionally) a compiled one-token step.

At batch 1 a decode step multiplies each weight matrix by one vector; on a CPU those matrix-vector products are
bounded by memory bandwidth and shrink with the matrices, but what a decoder layer does besides them does not:
Hugging Face ``generate`` with its ``DynamicCache`` concatenates every layer's keys and values at every step,
runs its logits processors and stopping criteria, and dispatches some 30 small eager operators per layer (norms,
rotary, views, residual adds). That fixed cost is why a model cut to half its width decodes well short of the
ideal speed-up at batch 1 (``prunekit bench``; README, Benchmark). Three decode paths, the same for every model:

- ``generate``: transformers' ``generate`` (greedy, ``DynamicCache``): the reference.
- ``static``: this module's loop: one prefill forward into a transformers ``StaticCache`` (keys and values
  written in place into buffers allocated once per batch size and cache length), then one forward per new token
  and an argmax; no logits processors, no concatenation. Eager: no compile time.
- ``compiled``: the same loop with the one-token step compiled by ``torch.compile`` (Inductor; one graph, static
  shapes): the pointwise operators fuse into a few generated kernels, so per layer little more than the
  matrix products is left. One compilation per model, batch size and cache length (tens of seconds on a CPU;
  Inductor's on-disk cache makes a repeated one quicker), reported apart by ``Decoder.compile_s``. Each
  compiled step is its own code object with one cache entry, so its guards are not evaluated per token
  (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, safe here because nothing else can match).

The tokens are those of greedy ``generate`` (tests: every supported family, with and without left padding;
``compiled`` may differ where two logits tie to float rounding, as any change of kernel can). Usage on a
folder ``prunekit prune`` wrote::

    import prunekit
    model = prunekit.load_pruned("runs/flap-50")
    ids = prunekit.fast_generate(model, input_ids, max_new_tokens=64)   # mode="compiled" by default

Supported: models whose transformers class can compile its full graph (``_can_compile_fullgraph``: Llama,
Mistral, Qwen, Gemma 3, OPT, GPT-2, GPT-NeoX, ...), cut or not. Not supported (``PrunekitError`` naming
``generate`` instead): models with a prunekit runtime installed (GRIFFIN, ShadowLLM, DejaVu select weights per
sequence inside ``generate``) and routed plan sets (SEAP's experts), which are not a single transformers model.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import types
from collections.abc import Sequence

import torch
from torch import nn

from prunekit.errors import PrunekitError

DECODE_MODES = ("generate", "static", "compiled")
DECODE_HINT = ("prunekit.fast_generate(prunekit.load_pruned(FOLDER), input_ids, max_new_tokens=N) (greedy; static KV "
               "cache and a compiled one-token step, as prunekit bench --decode compiled measures)")


def unsupported(model: nn.Module, mode: str) -> str | None:
    """Why ``mode`` cannot decode ``model`` (None if it can)."""
    if mode not in DECODE_MODES:
        return f"unknown decode mode {mode!r}; choose one of {', '.join(DECODE_MODES)}"
    if mode == "generate":
        return None if callable(getattr(model, "generate", None)) else f"{type(model).__name__} has no generate"
    from prunekit.realize.runtime import runtime_of

    if runtime_of(model) is not None:
        return (f"the model carries a prunekit runtime ({type(runtime_of(model)).__name__}), which selects weights "
                "per sequence inside transformers' generate; decode it with mode 'generate'")
    if not getattr(type(model), "_can_compile_fullgraph", False) or not hasattr(model, "config"):
        return (f"{type(model).__name__} is not a transformers model that supports a static KV cache and a "
                "compiled graph (_can_compile_fullgraph); decode it with mode 'generate'")
    return None


def _fresh(fn):
    """``fn`` with a code object of its own: Dynamo keeps compiled graphs per code object, so each compiled step
    holds exactly one entry (no recompilation limit shared between models, no guards that must tell them apart)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _step_of(model: nn.Module, with_positions: bool):
    """One decode step: the next token's id for each sequence (argmax of the last logits)."""
    if with_positions:
        def step(input_ids, cache, attention_mask, position_ids):
            return model(input_ids=input_ids, past_key_values=cache, use_cache=True, attention_mask=attention_mask,
                         position_ids=position_ids).logits[:, -1].argmax(-1)
    else:
        def step(input_ids, cache, attention_mask, position_ids):
            return model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
    return step


class Decoder:
    """Greedy decoding of one model along one path (``DECODE_MODES``); caches and compiled steps are kept per
    (batch size, cache length, padded or not) and reused across calls.

    ``compile_s[key]``: seconds the first (compiling) call of that step took; ``last``: the last call's timing
    (``prefill_s``, ``decode_s`` over ``steps`` one-token steps, and the process CPU time of those steps,
    ``decode_cpu_s``).
    """

    def __init__(self, model: nn.Module, mode: str = "compiled") -> None:
        why = unsupported(model, mode)
        if why:
            raise PrunekitError(why)
        self.model, self.mode = model, mode
        self._entries: dict[tuple, tuple] = {}
        self.compile_s: dict[tuple, float] = {}
        self.last: dict[str, float] = {}
        params = inspect.signature(model.forward).parameters
        self._positions = "position_ids" in params
        self._keep = "logits_to_keep" in params

    def _entry(self, batch: int, max_len: int, padded: bool, attention_mask, position_ids):
        from transformers import StaticCache

        key = (batch, max_len, padded)
        if key not in self._entries:
            cache = StaticCache(config=self.model.config, max_cache_len=max_len)
            step = _step_of(self.model, padded and self._positions)
            if self.mode == "compiled":
                step = torch.compile(_fresh(step), fullgraph=True, dynamic=False)
                # allocate the cache's per-layer buffers eagerly (cut layers differ in heads), then compile on a
                # dummy token; the cache is reset before use
                dummy = torch.zeros(batch, 1, dtype=torch.long, device=self.model.device)
                self.model(input_ids=dummy, past_key_values=cache, use_cache=True)
                start = time.perf_counter()
                try:
                    step(dummy, cache, attention_mask, position_ids)
                except Exception as e:  # Dynamo/Inductor errors, a missing C++ compiler, ...
                    first = (str(e).strip().splitlines() or [""])[0][:300]
                    raise PrunekitError(f"torch.compile could not compile the decode step of "
                                        f"{type(self.model).__name__} ({type(e).__name__}: {first}); decode with mode "
                                        "'static' (the same loop, not compiled) or 'generate'") from e
                self.compile_s[key] = time.perf_counter() - start
            self._entries[key] = (cache, step)
        cache, step = self._entries[key]
        cache.reset()
        return cache, step

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 max_cache_len: int | None = None) -> torch.Tensor:
        """Prompt followed by up to ``max_new_tokens`` greedy tokens, as ``generate(do_sample=False)`` returns
        them: left-padded prompts via ``attention_mask``; a sequence that produced an end token continues with
        ``pad_token_id``, and decoding stops once every sequence has (``eos_token_id``: None never stops)."""
        model = self.model
        batch, prompt = input_ids.shape
        if max_new_tokens < 1:
            return input_ids
        if self.mode == "generate":
            start = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask if attention_mask is not None
                                 else torch.ones_like(input_ids), do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id if pad_token_id is not None
                                 else 0)
            self.last = {"total_s": time.perf_counter() - start}
            return out
        eos = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           dtype=torch.long, device=input_ids.device)
        if eos.numel() and pad_token_id is None:
            raise PrunekitError("fast_generate with an end token needs pad_token_id (what follows a finished sequence)")
        need = prompt + max_new_tokens - 1  # the last token is never fed back
        max_len = max(max_cache_len or need, need)
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = positions = None
        if padded:
            mask = torch.ones(batch, max_len, dtype=attention_mask.dtype, device=input_ids.device)
            mask[:, :prompt] = attention_mask
            positions = attention_mask.long().cumsum(-1) - 1
            positions = positions.masked_fill(attention_mask == 0, 0)
        next_pos = None if positions is None else positions[:, -1:] + 1
        cache, step = self._entry(batch, max_len, padded, mask, next_pos)
        extra = {"logits_to_keep": 1} if self._keep else {}
        if padded and self._positions:
            extra["position_ids"] = positions
        start = time.perf_counter()
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, attention_mask=mask, **extra).logits
        token = logits[:, -1].argmax(-1)
        prefill = time.perf_counter() - start
        tokens = [token]
        done = torch.isin(token, eos) if eos.numel() else None
        start, cpu = time.perf_counter(), time.process_time()
        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if self.mode == "compiled" \
            else contextlib.nullcontext()
        with stance:
            for i in range(max_new_tokens - 1):
                if done is not None and bool(done.all()):
                    break
                pos = None if next_pos is None else next_pos + i
                token = step(token[:, None], cache, mask, pos)
                if done is not None:
                    token = token.masked_fill(done, pad_token_id)
                    done = done | torch.isin(token, eos)
                tokens.append(token)
        self.last = {"prefill_s": prefill, "decode_s": time.perf_counter() - start,
                     "decode_cpu_s": time.process_time() - cpu, "steps": len(tokens) - 1}
        return torch.cat([input_ids, torch.stack(tokens, 1)], 1)


def _shapes(model: nn.Module) -> int:
    return hash(tuple((name, tuple(p.shape), p.dtype, p.device.type) for name, p in model.named_parameters()))


def decoder_for(model: nn.Module, mode: str = "compiled") -> Decoder:
    """The model's ``Decoder`` for ``mode``, kept on the model (not a submodule: never saved) and made anew when
    its parameters change shape, dtype or device (a further cut, ``.to(...)``): a compiled step is only ever
    called on the model it was compiled for."""
    decoders = model.__dict__.setdefault("_prunekit_decoders", {})
    shapes = _shapes(model)
    if mode not in decoders or decoders[mode][0] != shapes:
        decoders[mode] = (shapes, Decoder(model, mode))
    return decoders[mode][1]


def fast_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32,
                  attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                  pad_token_id: int | None = None, mode: str = "compiled",
                  max_cache_len: int | None = None) -> torch.Tensor:
    """Greedy generation along a fast path (module docstring): ``generate(do_sample=False)``'s tokens.

    ``eos_token_id``/``pad_token_id`` default to the model's generation config. ``max_cache_len``: keys and values
    kept (default prompt + new tokens); a fixed value (e.g. 2048) lets prompts of different lengths share one
    compiled step, at the cost of attending over the whole buffer (masked) at every step. The first call per
    batch size and cache length compiles (``mode="compiled"``); later calls reuse it.
    """
    config = getattr(model, "generation_config", None)
    if eos_token_id is None and config is not None:
        eos_token_id = config.eos_token_id
    if pad_token_id is None and config is not None:
        pad_token_id = config.pad_token_id
    if pad_token_id is None and eos_token_id is not None:
        pad_token_id = eos_token_id if isinstance(eos_token_id, int) else list(eos_token_id)[0]
    return decoder_for(model, mode).generate(input_ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id,
                                             max_cache_len)
