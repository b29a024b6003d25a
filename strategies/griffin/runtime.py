"""The GRIFFIN runtime: per-sequence feed-forward experts chosen in the prompt phase, used in generation.

GRIFFIN (Dong, Chen, Chi, 2024, "Prompt-prompted Adaptive Structured Pruning for Efficient LLM Generation";
reference code hdong920/GRIFFIN). For every decoder layer and every sequence, over the prompt tokens:

    z_t = the input of the MLP's consumer projection (down_proj / fc2) at token t
          (GLU families: act(x W_gateᵀ) ⊙ (x W_upᵀ); fc1 families: act(fc1(x)), fc1's bias included)
    Z̄_t = z_t / max(‖z_t‖₂, ε)                        (each token normalised across neurons)
    s_j = ‖Z̄_{·,j}‖₂ over the prompt's real tokens      (padding excluded)
    E   = top-k(s), k = int(density · width)

The prompt is run by the dense model (its logits, its KV cache and so the first generated token are the dense
model's); every later token uses only W_gate[E], W_up[E], W_down[:, E] (fc1 rows and bias[E], fc2 columns;
fc2's bias is kept), gathered once per sequence at its first generation step.

How it is wired (no copied modelling files): the producer projections (gate/up or fc1) and the consumer
(down or fc2) of every layer, found through ``prunekit.arch`` adapters, get a replacement ``forward`` on the
instance; everything else — attention, norms, the activation function — is the family's own code, which only
ever sees narrower tensors. A forward pre-hook on the decoder stack reads each call's KV cache: an empty cache
(or none) means a prompt; a filled cache means generation. The experts chosen in a prompt are attached to the
cache object that call returns, so they live exactly as long as the sequence's keys and values: a new
``generate`` starts a new cache and new experts; nothing is carried between calls in the runtime itself.

Differences from the reference code, each deliberate:
- batches: every sequence gets its own experts (the reference asserts batch size 1). At generation a padded
  batch runs on the union U of its sequences' experts, gathered once, and each sequence's z is masked to its
  own E before the consumer: the output is each sequence's own (what it gets alone, to float rounding), at
  the weight traffic of |U| ≤ B·k columns read once per step. ``batch_rule="shared"`` is the paper's batching
  rule instead: s = Σ_i s_i / √S_i (S_i = prompt tokens of sequence i), one expert set for the batch.
- the phase is read from the KV cache, not from the input's length: the reference re-selects only when more
  than one token arrives, so a one-token prompt reuses the previous sequence's experts. Here a one-token
  prompt is a prompt: its experts come from that token alone (s_j = |z_j| / ‖z‖).
- ε = 1e-12 guards a token whose z is all zeros (the reference divides by its norm unguarded).
- experts are sorted ascending before gathering (the reference keeps top-k order): the same set, and at
  density 1 the gathered weights equal the originals. A layer whose k equals its width is left dense.
- ``topk_sample`` takes the top ⌊k/2⌋ and samples the other k − ⌊k/2⌋ ∝ s from the rest (the reference samples
  ⌊k/2⌋ more, so an odd k gives k − 1 experts). ``sample``/``topk_sample``/``random`` draw without replacement
  from a generator seeded by (seed, layer, the sequence's prompt tokens): reproducible, independent of batch
  composition. Neurons with s_j = 0 (ReLU families) get weight 1e-30, so they are drawn only once the positive
  ones run out (``torch.multinomial`` refuses to draw more categories than have positive weight).
- ``magnitude`` (the paper's static baseline) keeps top-k of ‖W_gate,j‖·‖W_up,j‖ (or ‖W_fc1,j‖) for every
  sequence: the prompt is still dense, generation uses that fixed set.

Modes (what a forward without a filled cache does):
- ``gen``: the whole input is prompt (dense); generation with the cache is sparse.
- ``class`` (the reference's scoring of log-likelihood tasks): one forward; s over every real position but the
  last, and only the last position's z restricted to E. With lm-eval, the input is context + continuation
  minus its last token, so only the prediction of the continuation's *last* token is sparse; the other
  continuation tokens are scored by the dense model, and the experts are chosen with the continuation in view.
  For single-token answers (BoolQ, COPA's choice words often) the whole answer is scored sparse.
- ``prefix`` with ``prefix=P``: positions < P dense, experts from tokens < P, positions ≥ P restricted to E —
  teacher-forced scoring that equals prefill of P tokens + cached decode of the rest (to float rounding).
  P counts each sequence's real tokens (left padding is skipped).
- ``auto`` (default): ``gen`` for generation and plain calls, ``prefix`` at half the window for perplexity
  windows, ``class`` for lm-eval log-likelihood requests (``Runtime.scoring``).
"""

from __future__ import annotations

import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.plans import Runtime

VARIANTS = ("topk", "sample", "topk_sample", "random", "magnitude")
MODES = ("auto", "gen", "class", "prefix")
BATCH_RULES = ("per_sequence", "shared")
EPS = 1e-12
CACHE_ATTR = "_prunekit_griffin"
PRODUCERS = ("gate", "up", "fc1")
CONSUMERS = ("down", "fc2")


# ---------------------------------------------------------------------------------------------- the method
def neuron_scores(z: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """s (B, D): per sequence, the ℓ2 norm over its prompt tokens of each neuron's token-normalised activation.

    ``z``: (B, T, D) consumer inputs; ``prompt``: (B, T) bool, the positions that count.
    """
    z = z.float()
    zbar = z / z.norm(dim=-1, keepdim=True).clamp_min(EPS)
    zbar = zbar * prompt.unsqueeze(-1).to(zbar.dtype)
    return zbar.pow(2).sum(1).sqrt()


def shared_scores(s: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """The paper's batch rule: Σ_i s_i / √S_i (S_i = prompt tokens of sequence i), shape (1, D)."""
    counts = prompt.sum(1, keepdim=True).clamp_min(1).to(s.dtype)
    return (s / counts.sqrt()).sum(0, keepdim=True)


def _positive(weights: torch.Tensor) -> torch.Tensor:
    w = weights.double()
    return torch.where(w > 0, w, torch.full_like(w, 1e-30))


def select(s: torch.Tensor, k: int, variant: str, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Expert indices (B, k), each row sorted ascending, from scores ``s`` (B, D).

    ``generators``: one per row for the sampling variants (``None`` entries for ``topk``).
    """
    rows = []
    for b in range(s.shape[0]):
        row, gen = s[b], generators[b]
        if variant == "topk":
            idx = row.topk(k).indices
        elif variant == "sample":
            idx = torch.multinomial(_positive(row), k, replacement=False, generator=gen)
        elif variant == "topk_sample":
            top = row.topk(k // 2).indices
            rest = _positive(row).clone()
            rest[top] = 0
            idx = torch.cat([top, torch.multinomial(rest, k - k // 2, replacement=False, generator=gen)])
        elif variant == "random":
            idx = torch.randperm(row.numel(), generator=gen)[:k]
        else:
            raise PrunekitError(f"unknown GRIFFIN variant {variant!r}; use one of {VARIANTS}")
        rows.append(idx.sort().values)
    return torch.stack(rows) if rows else s.new_zeros((0, k), dtype=torch.long)


def magnitude_scores(producers: dict[str, torch.Tensor]) -> torch.Tensor:
    """The static baseline's neuron scores: ‖W_gate,j‖·‖W_up,j‖ (GLU) or ‖W_fc1,j‖; rows are neurons."""
    if "fc1" in producers:
        return producers["fc1"].float().norm(dim=1)
    return producers["gate"].float().norm(dim=1) * producers["up"].float().norm(dim=1)


# ---------------------------------------------------------------------------------------------- state
@dataclass
class LayerExperts:
    """One layer's experts for a batch: ``rows`` (B, k) per sequence; ``union`` the columns gathered once;
    ``keep`` (B, |U|) which union columns each sequence uses (None when every sequence uses all of them)."""

    rows: torch.Tensor
    union: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def gather(self, refs: dict[str, Any]) -> float:
        """Gather the experts' rows of the producers and columns of the consumer; returns the seconds spent."""
        start = time.perf_counter()
        union = self.rows.unique(sorted=True) if self.rows.shape[0] > 1 else self.rows[0]
        if self.rows.shape[0] > 1 and union.numel() != self.rows.shape[1]:
            self.keep = (self.rows.unsqueeze(-1) == union).any(1)  # (B, |U|)
        self.union = union
        for role, ref in refs.items():
            w, bias = ref.weight, getattr(ref.module, "bias", None)
            if role in PRODUCERS:  # rows: an embedding lookup is the fastest row gather on CPU
                rows = F.embedding(union, w) if w.is_contiguous() else w.index_select(0, union).contiguous()
                self.weights[role] = (rows, None if bias is None else bias.index_select(0, union))
            else:
                self.weights[role] = (w.index_select(1, union).contiguous(), bias)
        return time.perf_counter() - start

    def nbytes(self) -> int:
        """Bytes of the gathered copies (the consumer's bias is the module's own, not copied)."""
        return sum(t.numel() * t.element_size() for role, (w, b) in self.weights.items()
                   for t in ((w, b) if role in PRODUCERS else (w,)) if t is not None)


@dataclass
class SequenceState:
    """What a prompt leaves on its KV cache: the experts of every layer, for this batch."""

    batch: int
    layers: dict[int, LayerExperts] = field(default_factory=dict)
    gather_s: float = 0.0


@dataclass
class _Call:
    """One forward of the decoder stack (set by the pre-hook, cleared by the post-hook)."""

    phase: str  # "prompt" (empty cache) or "generate"
    batch: int
    length: int
    prompt: torch.Tensor | None = None  # (B, T) bool: positions whose z choose the experts
    sparse: torch.Tensor | None = None  # (B, T) bool: positions restricted to the experts in this same call
    tokens: torch.Tensor | None = None  # (B, T) ids, for seeding the sampling variants
    state: SequenceState | None = None


# ---------------------------------------------------------------------------------------------- runtime
class GriffinRuntime(Runtime):
    """GRIFFIN installed in a model (see the module docstring).

    Args:
        density: fraction of each layer's MLP neurons kept in generation, in (0, 1]; one number, or one per
            decoder layer. k = int(density · width), per layer (a statically cut model keeps its own widths).
        variant: ``topk`` (GRIFFIN), ``sample``, ``topk_sample``, ``random``, or the static ``magnitude`` baseline.
        mode: ``auto``, ``gen``, ``class`` or ``prefix`` (module docstring).
        prefix: P for ``mode="prefix"``.
        batch_rule: ``per_sequence`` (every sequence its own experts) or ``shared`` (the paper's batch rule).
        seed: seeds the sampling variants.
    """

    scores_padded_batches: ClassVar[bool] = False  # class mode needs each row's last real token: no right padding

    def __init__(self, density: float | list[float] = 0.5, variant: str = "topk", mode: str = "auto",
                 prefix: int | None = None, batch_rule: str = "per_sequence", seed: int = 0) -> None:
        self.density, self.variant, self.mode = density, variant, mode
        self.prefix, self.batch_rule, self.seed = prefix, batch_rule, int(seed)
        self.check_options()
        self._model: nn.Module | None = None
        self._refs: dict[int, dict[str, Any]] = {}
        self._k: dict[int, int] = {}
        self._static: dict[int, torch.Tensor] = {}  # magnitude: (1, k) experts per layer
        self._hooks: list = []
        self._calls: list[_Call] = []
        self._scoring: list[tuple[str, int | None]] = []
        self.last_gather: dict[str, float] = {}

    # ------------------------------------------------------------------ options
    def check_options(self) -> None:
        densities = self.density if isinstance(self.density, (list, tuple)) else [self.density]
        for d in densities:
            if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 < float(d) <= 1:
                raise PrunekitError(f"GRIFFIN density must be in (0, 1] (the fraction of MLP neurons kept), got {d!r}")
        if self.variant not in VARIANTS:
            raise PrunekitError(f"unknown GRIFFIN variant {self.variant!r}; use one of: {', '.join(VARIANTS)}")
        if self.mode not in MODES:
            raise PrunekitError(f"unknown GRIFFIN mode {self.mode!r}; use one of: {', '.join(MODES)}")
        if self.batch_rule not in BATCH_RULES:
            raise PrunekitError(f"unknown batch_rule {self.batch_rule!r}; use one of: {', '.join(BATCH_RULES)}")
        if self.mode == "prefix" and (self.prefix is None or int(self.prefix) < 1):
            raise PrunekitError(f"mode 'prefix' needs prefix P >= 1 (dense positions before the experts apply), "
                                f"got {self.prefix!r}")
        if self.prefix is not None and self.mode != "prefix":
            raise PrunekitError(f"prefix={self.prefix} only applies with mode 'prefix' (mode is {self.mode!r})")

    def configure(self, **options: Any) -> None:
        """Change options of an installed runtime (``prunekit eval --runtime '{mode: class}'``)."""
        unknown = sorted(set(options) - set(self.state()))
        if unknown:
            raise PrunekitError(f"GRIFFIN has no option {', '.join(unknown)}; options: {', '.join(self.state())}")
        if "mode" in options and options["mode"] != "prefix" and "prefix" not in options:
            options["prefix"] = None
        before = self.state()
        for key, value in options.items():
            setattr(self, key, value)
        try:
            self.check_options()
        except PrunekitError:
            for key, value in before.items():
                setattr(self, key, value)
            raise
        if self._model is not None and any(before[k] != self.state()[k] for k in ("density", "variant")):
            model = self._model
            self.remove(model)
            self.install(model)

    def state(self) -> dict[str, Any]:
        return {"density": self.density, "variant": self.variant, "mode": self.mode, "prefix": self.prefix,
                "batch_rule": self.batch_rule, "seed": self.seed}

    def describe(self) -> dict[str, Any]:
        ks = list(self._k.values())
        widths = [self._width(i) for i in self._k] if self._model is not None else []
        out = {"runtime": "griffin", **{k: v for k, v in self.state().items() if v is not None}}
        if ks:
            out["experts_per_layer"] = f"{min(ks)}-{max(ks)} of {min(widths)}-{max(widths)}" \
                if min(ks) != max(ks) or min(widths) != max(widths) else f"{ks[0]} of {widths[0]}"
        return out

    def notes(self, seq_len: int | None = None) -> list[str]:
        if self.mode == "auto" and seq_len:
            return [f"GRIFFIN perplexity: each {seq_len}-token window's first {seq_len // 2} tokens are its prompt "
                    "(scored by the dense model, by design); the rest are scored with the experts (prefix mode)"]
        return []

    # ------------------------------------------------------------------ install
    def install(self, model: nn.Module) -> None:
        if self._model is not None:
            raise PrunekitError("this GRIFFIN runtime is already installed in a model")
        adapter = adapter_for(model)
        layers = adapter.layers(model)
        densities = self.density if isinstance(self.density, (list, tuple)) else [self.density] * len(layers)
        if len(densities) != len(layers):
            raise PrunekitError(f"{len(densities)} per-layer densities for a model with {len(layers)} decoder layers")
        refs: dict[int, dict[str, Any]] = {}
        for ref in adapter.linears(model):
            if ref.role in PRODUCERS + CONSUMERS:
                refs.setdefault(ref.layer, {})[ref.role] = ref
        if len(refs) != len(layers) or any(not any(r in roles for r in CONSUMERS) for roles in refs.values()):
            raise PrunekitError(f"GRIFFIN needs an MLP (gate/up/down or fc1/fc2) in every decoder layer; the "
                                f"{adapter.family} adapter does not provide one")
        self._model, self._refs = model, refs
        self._k = {i: int(float(densities[i]) * self._width(i)) for i in refs}
        empty = [i for i, k in self._k.items() if k < 1 and self._width(i) > 0]
        if empty:
            i, width = empty[0], self._width(empty[0])
            self._model, self._refs, self._k = None, {}, {}
            raise PrunekitError(f"GRIFFIN density {densities[i]} keeps no neuron of layer {i} (int(density · "
                                f"{width}) = 0); raise the density to at least {1 / width:.3g}")
        stack = model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])
        self._hooks = [stack.register_forward_pre_hook(self._before, with_kwargs=True),
                       stack.register_forward_hook(self._after, with_kwargs=True, always_call=True)]
        for i, roles in refs.items():
            if self._k[i] == self._width(i):
                continue  # density 1 (or rounding to the full width): the layer stays dense
            for role, ref in roles.items():
                ref.module.forward = self._wrap(ref.module, i, role)
        if self.variant == "magnitude":
            for i, roles in refs.items():
                scores = magnitude_scores({r: ref.weight for r, ref in roles.items() if r in PRODUCERS})
                self._static[i] = scores.topk(self._k[i]).indices.sort().values.unsqueeze(0)

    def remove(self, model: nn.Module) -> None:
        for h in self._hooks:
            h.remove()
        for roles in self._refs.values():
            for ref in roles.values():
                ref.module.__dict__.pop("forward", None)
        self._hooks, self._refs, self._k, self._static, self._model = [], {}, {}, {}, None
        self._calls = []

    def _width(self, layer: int) -> int:
        roles = self._refs[layer]
        consumer = next(roles[r] for r in CONSUMERS if r in roles)
        return consumer.in_features

    # ------------------------------------------------------------------ scoring protocols
    @contextmanager
    def scoring(self, purpose: str, seq_len: int | None = None):
        """``auto`` mode's protocol for a purpose: ``perplexity`` → prefix at half the window, ``loglikelihood`` →
        class, ``generate`` → gen. A fixed mode is used for every purpose."""
        self._scoring.append((purpose, seq_len))
        try:
            yield
        finally:
            self._scoring.pop()

    def _mode(self) -> tuple[str, int | None]:
        if self.mode != "auto":
            return self.mode, self.prefix
        if self._scoring:
            purpose, seq_len = self._scoring[-1]
            if purpose == "perplexity" and seq_len:
                return "prefix", seq_len // 2
            if purpose == "loglikelihood":
                return "class", None
        return "gen", None

    # ------------------------------------------------------------------ hooks
    def _before(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shaped = ids if ids is not None else embeds
        if shaped is None:
            raise PrunekitError("GRIFFIN could not find input_ids or inputs_embeds in the model call")
        batch, length = shaped.shape[:2]
        cache = kwargs.get("past_key_values")
        past = 0 if cache is None else int(cache.get_seq_length())
        if past > 0:
            state = getattr(cache, CACHE_ATTR, None)
            if state is None:
                raise PrunekitError("GRIFFIN got a KV cache its prompt phase did not fill (no experts on it): "
                                    "run the prompt through this model first (generate does)")
            if state.batch != batch:
                raise PrunekitError(f"GRIFFIN's experts were chosen for a batch of {state.batch} sequences, but "
                                    f"this step has {batch} (a reordered or resized cache is not supported)")
            self._calls.append(_Call("generate", batch, length, state=state))
            return None
        mask = kwargs.get("attention_mask")
        real = mask[:, -length:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else \
            torch.ones(batch, length, dtype=torch.bool, device=shaped.device)
        counts = real.sum(1)
        if bool((counts == 0).any()):
            raise PrunekitError("GRIFFIN got a sequence with no real token (attention_mask all zeros)")
        mode, prefix = self._mode()
        order = real.long().cumsum(1) - 1  # index among each row's real tokens
        prompt, sparse = real, None
        if mode == "class":
            if bool((counts < 2).any()):
                raise PrunekitError("GRIFFIN class mode needs at least 2 tokens per sequence (the experts come from "
                                    "every token but the last)")
            last = real & (order == (counts - 1).unsqueeze(1))
            prompt, sparse = real & ~last, last
        elif mode == "prefix":
            if bool((counts <= prefix).any()):
                raise PrunekitError(f"GRIFFIN prefix P={prefix} is beyond the sequence: every sequence needs more "
                                    f"than P real tokens (the shortest has {int(counts.min())}); lower P")
            prompt, sparse = real & (order < prefix), real & (order >= prefix)
        self._calls.append(_Call("prompt", batch, length, prompt, sparse, ids, SequenceState(batch)))
        return None

    def _after(self, module, args, kwargs, output):
        call = self._calls.pop() if self._calls else None
        if call is None or call.phase != "prompt" or output is None:
            return None
        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            setattr(cache, CACHE_ATTR, call.state)
        return None

    # ------------------------------------------------------------------ the projections
    def _wrap(self, module: nn.Module, layer: int, role: str):
        dense = type(module).forward.__get__(module)

        def forward(x, *args, **kwargs):
            call = self._calls[-1] if self._calls else None
            if call is None:
                return dense(x, *args, **kwargs)
            if call.phase == "prompt":
                if role in PRODUCERS:
                    return dense(x, *args, **kwargs)
                return dense(self._choose(call, layer, x), *args, **kwargs)
            return self._sparse(call, layer, role, x)

        return forward

    def _generators(self, call: _Call, layer: int) -> list[torch.Generator | None]:
        if self.variant == "topk":
            return [None] * call.batch
        rows = range(call.batch) if self.batch_rule == "per_sequence" else [None]
        gens = []
        for b in rows:
            if call.tokens is None:
                key = 0
            else:
                toks = call.tokens[call.prompt] if b is None else call.tokens[b][call.prompt[b]]
                key = zlib.crc32(toks.cpu().numpy().astype("int64").tobytes())
            gens.append(torch.Generator().manual_seed((self.seed * 1_000_003 + layer * 7919 + key) % 2**63))
        return gens

    def _choose(self, call: _Call, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Prompt phase at the consumer: choose this layer's experts; restrict the call's sparse positions."""
        flat = z.dim() == 2  # OPT flattens (B·T, D)
        z3 = z.view(call.batch, call.length, -1) if flat else z
        k = self._k[layer]
        if self.variant == "magnitude":
            rows = self._static[layer].expand(call.batch, -1)
        else:
            s = neuron_scores(z3, call.prompt)
            if self.batch_rule == "shared":
                s = shared_scores(s, call.prompt)
            rows = select(s, k, self.variant, self._generators(call, layer))
            if self.batch_rule == "shared":
                rows = rows.expand(call.batch, -1)
        call.state.layers[layer] = LayerExperts(rows)
        if call.sparse is None:
            return z
        keep = torch.zeros(call.batch, z3.shape[-1], dtype=torch.bool, device=z.device)
        keep.scatter_(1, rows.to(z.device), True)
        drop = call.sparse.unsqueeze(-1) & ~keep.unsqueeze(1)
        z3 = z3.masked_fill(drop, 0)
        return z3.reshape(z.shape) if flat else z3

    def _experts(self, call: _Call, layer: int) -> LayerExperts:
        experts = call.state.layers[layer]  # gathered per sequence, from the weights as they are now
        if not experts.weights:  # first generation step of this batch
            call.state.gather_s += experts.gather(self._refs[layer])
            self.last_gather = {"seconds": call.state.gather_s, "batch": call.batch,
                                "mb": sum(e.nbytes() for e in call.state.layers.values()) / 2**20}
        return experts

    def _sparse(self, call: _Call, layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        """Generation: the experts' rows of a producer, or the consumer over the experts' columns."""
        experts = self._experts(call, layer)
        weight, bias = experts.weights[role]
        if role in PRODUCERS or experts.keep is None:
            return F.linear(x, weight, bias)
        flat = x.dim() == 2
        x3 = x.view(call.batch, -1, x.shape[-1]) if flat else x
        x3 = x3 * experts.keep.unsqueeze(1).to(x3.dtype)
        out = F.linear(x3, weight, bias)
        return out.reshape(-1, out.shape[-1]) if flat else out

    # ------------------------------------------------------------------ reporting
    def experts_of(self, cache) -> dict[int, torch.Tensor]:
        """The experts (B, k) per layer that a prompt left on ``cache`` (for analysis: overlap, Jaccard)."""
        state = getattr(cache, CACHE_ATTR, None)
        if state is None:
            raise PrunekitError("this cache holds no GRIFFIN experts (was the prompt run through the GRIFFIN model "
                                "with use_cache=True?)")
        return {i: e.rows for i, e in state.layers.items()}

    def decode_macs(self, model: nn.Module) -> int:
        """Weights multiplied per generated token (one sequence): decoder projections at the experts' width."""
        total = 0
        for ref in adapter_for(model).linears(model):
            n = ref.weight.numel()
            if ref.role in PRODUCERS + CONSUMERS and ref.layer in self._k:
                n = int(n * self._k[ref.layer] / max(self._width(ref.layer), 1))
            total += n
        return total


__all__ = ["BATCH_RULES", "GriffinRuntime", "LayerExperts", "MODES", "VARIANTS", "magnitude_scores", "neuron_scores",
           "select", "shared_scores"]
