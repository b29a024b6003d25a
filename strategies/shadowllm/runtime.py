"""The ShadowLLM / DejaVu runtime: per-input attention heads and MLP neurons, chosen by a predictor.

For every sequence, after decoder layer 0 (which stays dense, as in the reference):

- ``design="shadowllm"``: ONE predictor reads the layer-0 feature — the attention context (o_proj's input) of
  layer 0 at the selection token, min-max normalised — and predicts the importance of every head and neuron of
  layers 1…L−1; ``scope="global"`` keeps the top (1 − p) of all heads and of all neurons ranked together (the
  predictor's targets are min-max normalised per layer, so its outputs share one scale), ``local`` the top
  (1 − p) of each layer.
- ``design="dejavu"``: one predictor per layer ℓ ≥ 1 reads the hidden state entering layer ℓ at the selection
  token (min-max normalised, by the predictor itself) and predicts that layer's heads and neurons; local only (a layer's choice is made
  when the layer is reached).

A dropped head's context (o_proj's input) is zeroed — the same function as removing its o_proj columns and its
q rows; a dropped neuron's consumer input z (down_proj/fc2 input) is zeroed — the same as cutting the neuron.
Under grouped-query attention the unit is the query head (K and V are computed for every group either way).

Selection token and phases (the KV cache tells a prompt from a generation step, as in GRIFFIN's runtime):
- a prompt (a forward with an empty cache) selects once per sequence, at its selection token: the last real
  token (``gen``, ``class``) or token P − 1 (``prefix``). With ``prompt="sparse"`` (the reference: every
  position of the forward runs on the selection) all of the prompt's positions use it; with ``prompt="dense"``
  (GRIFFIN-style) the prompt is dense and only what follows the selection token is sparse — in ``class`` mode
  the selection is then made at the second-to-last token and the last position is sparse.
- generation steps reuse the sequence's selection (kept on its KV cache) and run on gathered weights: the kept
  heads' o_proj columns, the kept neurons' producer rows and consumer columns (a padded batch runs on the union
  of its sequences' choices, each sequence masked to its own).
- ``auto`` (default): perplexity windows use ``prefix`` at half the window, lm-eval log-likelihood requests
  ``class``, everything else ``gen``.

Differences from the reference, each deliberate: the reference predicts per forward inside a forked lm-eval for
OPT only; here the selection lives in the model (any family, ``generate`` with the KV cache, save/reload) and is
made once per sequence; generation reuses it (the reference's latency runs re-predict per token). Inputs of the
predictors are min-max normalised for both designs (DejaVu feeds raw hidden states). The selection token under
``prompt="sparse"`` sees the whole prompt, so every prompt position is computed with a choice informed by the
prompt's last token — as the reference's single forward does; use ``prompt="dense"`` for strictly causal scoring.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.plans import Runtime
from prunekit.strategies.shadowllm.select import check_scope, check_sparsity, keep_dynamic

DESIGNS = ("shadowllm", "dejavu")
MODES = ("auto", "gen", "class", "prefix")
PROMPTS = ("sparse", "dense")
CACHE_ATTR = "_prunekit_shadowllm"
PRODUCERS = ("gate", "up", "fc1")
CONSUMERS = ("down", "fc2")


# ---------------------------------------------------------------------------------------------- state
@dataclass
class LayerChoice:
    """One layer's kept units for a batch: ``heads`` (B, H) and ``neurons`` (B, D) bool; gathered weights once a
    generation step needs them."""

    heads: torch.Tensor
    neurons: torch.Tensor
    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    head_keep: torch.Tensor | None = None  # (B, |U_dims|) per sequence over the gathered head dims; None = all
    neuron_keep: torch.Tensor | None = None
    head_dims: torch.Tensor | None = None
    neuron_union: torch.Tensor | None = None

    def gather(self, refs: dict[str, Any], head_dim: int) -> float:
        start = time.perf_counter()
        heads = self.heads.any(0)
        self.head_dims = (heads.nonzero().flatten().unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()
        if self.heads.shape[0] > 1 and not bool((self.heads == heads).all()):
            self.head_keep = self.heads[:, heads].repeat_interleave(head_dim, dim=1)
        union = self.neurons.any(0)
        self.neuron_union = union.nonzero().flatten()
        if self.neurons.shape[0] > 1 and not bool((self.neurons == union).all()):
            self.neuron_keep = self.neurons[:, union]
        for role, ref in refs.items():
            w, bias = ref.weight, getattr(ref.module, "bias", None)
            if role == "o":
                self.weights[role] = (w.index_select(1, self.head_dims.to(w.device)).contiguous(), bias)
            elif role in PRODUCERS:
                idx = self.neuron_union.to(w.device)
                self.weights[role] = (w.index_select(0, idx).contiguous(),
                                      None if bias is None else bias.index_select(0, idx))
            else:
                self.weights[role] = (w.index_select(1, self.neuron_union.to(w.device)).contiguous(), bias)
        return time.perf_counter() - start

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for role, (w, b) in self.weights.items()
                   for t in ((w, b) if role in PRODUCERS else (w,)) if t is not None)


@dataclass
class SequenceState:
    batch: int
    layers: dict[int, LayerChoice] = field(default_factory=dict)
    gather_s: float = 0.0


@dataclass
class _Call:
    phase: str  # "prompt" or "generate"
    batch: int
    length: int
    select: torch.Tensor | None = None  # (B,) position of each row's selection token
    sparse: torch.Tensor | None = None  # (B, T) bool: positions that run on the selection in this call
    feature: torch.Tensor | None = None
    state: SequenceState | None = None


# ---------------------------------------------------------------------------------------------- runtime
class ShadowRuntime(Runtime):
    """Predictor-driven dynamic head and neuron pruning (see the module docstring).

    Args:
        predictor: ``design="shadowllm"``: the layer-0 predictor (``prunekit.strategies.shadowllm.predictor``),
            outputs in ``blocks`` order; ``design="dejavu"``: ``{layer: predictor}`` for layers 1…L−1.
        blocks: output blocks ``[("<layer>.heads", H), ("<layer>.neurons", D), …]`` (for dejavu: per layer, its
            own predictor's blocks, in that order).
        sparsity: fraction of the heads and neurons of layers 1…L−1 dropped per input, in [0, 1).
        scope: ``global`` or ``local`` (dejavu: local only).
        prompt: ``sparse`` (reference) or ``dense``.
        mode / prefix: ``auto``, ``gen``, ``class`` or ``prefix`` (with P).
    """

    scores_padded_batches: ClassVar[bool] = False  # the selection token is each row's last real token

    def __init__(self, predictor: nn.Module | dict[int, nn.Module], blocks: list[tuple[str, int]],
                 design: str = "shadowllm", sparsity: float = 0.5, scope: str = "global", prompt: str = "sparse",
                 mode: str = "auto", prefix: int | None = None, report: dict | None = None) -> None:
        self.predictor, self.blocks = predictor, [(str(n), int(s)) for n, s in blocks]
        self.report = dict(report or {})  # how the predictor was trained and how well it ranks (held-out ρ)
        self.design, self.sparsity, self.scope, self.prompt = design, sparsity, scope, prompt
        self.mode, self.prefix = mode, prefix
        self.check_options()
        self._model: nn.Module | None = None
        self._refs: dict[int, dict[str, Any]] = {}
        self._hooks: list = []
        self._calls: list[_Call] = []
        self._scoring: list[tuple[str, int | None]] = []
        self._head_dim = 0
        self.last_gather: dict[str, float] = {}

    # ------------------------------------------------------------------ options
    def check_options(self) -> None:
        if self.design not in DESIGNS:
            raise PrunekitError(f"unknown design {self.design!r}; use one of: {', '.join(DESIGNS)}")
        check_sparsity(self.sparsity)
        check_scope(self.scope)
        if self.design == "dejavu" and self.scope != "local":
            raise PrunekitError("design 'dejavu' predicts each layer when it is reached: scope must be 'local'")
        if self.prompt not in PROMPTS:
            raise PrunekitError(f"prompt must be 'sparse' (the reference) or 'dense' (GRIFFIN-style), got {self.prompt!r}")
        if self.mode not in MODES:
            raise PrunekitError(f"unknown mode {self.mode!r}; use one of: {', '.join(MODES)}")
        if self.mode == "prefix" and (self.prefix is None or int(self.prefix) < 1):
            raise PrunekitError(f"mode 'prefix' needs prefix P >= 1, got {self.prefix!r}")
        if self.prefix is not None and self.mode != "prefix":
            raise PrunekitError(f"prefix={self.prefix} only applies with mode 'prefix' (mode is {self.mode!r})")

    def configure(self, **options: Any) -> None:
        allowed = ("sparsity", "scope", "prompt", "mode", "prefix")  # the predictor stays as trained
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise PrunekitError(f"the ShadowLLM runtime has no evaluation option {', '.join(unknown)}; options: "
                                f"{', '.join(allowed)}")
        if "mode" in options and options["mode"] != "prefix" and "prefix" not in options:
            options["prefix"] = None
        before = {k: getattr(self, k) for k in allowed}
        for key, value in options.items():
            setattr(self, key, value)
        try:
            self.check_options()
        except PrunekitError:
            for key, value in before.items():
                setattr(self, key, value)
            raise

    def state(self) -> dict[str, Any]:
        from prunekit.strategies.shadowllm.predictor import to_state

        if self.design == "shadowllm":
            config = to_state(self.predictor)[0]
        else:
            config = {str(i): to_state(p)[0] for i, p in self.predictor.items()}
        return {"design": self.design, "sparsity": self.sparsity, "scope": self.scope, "prompt": self.prompt,
                "mode": self.mode, "prefix": self.prefix, "blocks": [list(b) for b in self.blocks],
                "predictor": config, "report": self.report}

    def tensors(self) -> dict[str, torch.Tensor]:
        from prunekit.strategies.shadowllm.predictor import to_state

        if self.design == "shadowllm":
            return {f"predictor.{k}": v for k, v in to_state(self.predictor)[1].items()}
        return {f"layer{i}.{k}": v for i, p in self.predictor.items() for k, v in to_state(p)[1].items()}

    @classmethod
    def from_state(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "ShadowRuntime":
        from prunekit.strategies.shadowllm.predictor import from_state

        state = dict(state)
        config = state.pop("predictor")
        if state["design"] == "shadowllm":
            predictor = from_state(config, {k[len("predictor."):]: v for k, v in tensors.items()
                                            if k.startswith("predictor.")})
        else:
            predictor = {int(i): from_state(c, {k[len(f"layer{i}."):]: v for k, v in tensors.items()
                                                 if k.startswith(f"layer{i}.")}) for i, c in config.items()}
        blocks = [tuple(b) for b in state.pop("blocks")]
        return cls(predictor, blocks, **state)

    def describe(self) -> dict[str, Any]:
        out = {"runtime": self.design, "sparsity": self.sparsity, "scope": self.scope, "prompt": self.prompt,
               "mode": self.mode}
        if self.prefix is not None:
            out["prefix"] = self.prefix
        nets = [self.predictor] if self.design == "shadowllm" else list(self.predictor.values())
        out["predictor_parameters"] = sum(p.numel() for n in nets for p in n.parameters())
        if "spearman" in self.report:
            out["held_out_spearman"] = {k: round(v, 4) for k, v in self.report["spearman"].items()}
        return out

    def notes(self, seq_len: int | None = None) -> list[str]:
        if self.mode == "auto" and seq_len:
            how = "sparse too" if self.prompt == "sparse" else "dense"
            return [f"{self.design} perplexity: each {seq_len}-token window selects its heads and neurons at token "
                    f"{seq_len // 2 - 1} (prefix mode); the first {seq_len // 2} tokens are {how}"]
        return []

    # ------------------------------------------------------------------ install
    def _layer_blocks(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for name, size in self.blocks:
            layer, kind = name.split(".")
            out.setdefault(int(layer), {})[kind] = size
        return out

    def install(self, model: nn.Module) -> None:
        if self._model is not None:
            raise PrunekitError("this ShadowLLM runtime is already installed in a model")
        adapter = adapter_for(model)
        layers = adapter.layers(model)
        n_q, _, d = adapter.attention_shape(model.config)
        refs: dict[int, dict[str, Any]] = {}
        for ref in adapter.linears(model):
            if ref.role in ("o",) + PRODUCERS + CONSUMERS:
                refs.setdefault(ref.layer, {})[ref.role] = ref
        expected = {i: {"heads": n_q, "neurons": next(r for k, r in refs.get(i, {}).items() if k in CONSUMERS).in_features}
                    for i in range(1, len(layers)) if any(k in CONSUMERS for k in refs.get(i, {}))}
        given = self._layer_blocks()
        if given != expected:
            raise PrunekitError(f"the predictor was trained for other layer shapes than this model's (predictor: "
                                f"{_shape_text(given)}; model: {_shape_text(expected)}): train it on this model")
        if self.design == "dejavu" and sorted(self.predictor) != sorted(expected):
            raise PrunekitError(f"dejavu needs one predictor per layer 1-{len(layers) - 1}, got layers "
                                f"{sorted(self.predictor)}")
        self._model, self._refs, self._head_dim = model, refs, d
        stack = model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])
        self._hooks = [stack.register_forward_pre_hook(self._before, with_kwargs=True),
                       stack.register_forward_hook(self._after, with_kwargs=True, always_call=True)]
        if self.design == "shadowllm":
            self._hooks.append(refs[0]["o"].module.register_forward_pre_hook(self._feature))
        else:
            for i in expected:
                self._hooks.append(layers[i].register_forward_pre_hook(self._layer_input(i), with_kwargs=True))
        for i in expected:
            for role, ref in refs[i].items():
                ref.module.forward = self._wrap(ref.module, i, role)

    def remove(self, model: nn.Module) -> None:
        for h in self._hooks:
            h.remove()
        for i, roles in self._refs.items():
            for ref in roles.values():
                ref.module.__dict__.pop("forward", None)
        self._hooks, self._refs, self._model, self._calls = [], {}, None, []

    # ------------------------------------------------------------------ scoring protocols
    @contextmanager
    def scoring(self, purpose: str, seq_len: int | None = None):
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
        shaped = ids if ids is not None else kwargs.get("inputs_embeds")
        if shaped is None:
            raise PrunekitError("the ShadowLLM runtime could not find input_ids or inputs_embeds in the model call")
        batch, length = shaped.shape[:2]
        cache = kwargs.get("past_key_values")
        past = 0 if cache is None else int(cache.get_seq_length())
        if past > 0:
            state = getattr(cache, CACHE_ATTR, None)
            if state is None:
                raise PrunekitError("the ShadowLLM runtime got a KV cache its prompt phase did not fill: run the "
                                    "prompt through this model first (generate does)")
            if state.batch != batch:
                raise PrunekitError(f"the heads and neurons were chosen for a batch of {state.batch} sequences, but "
                                    f"this step has {batch} (a reordered or resized cache is not supported)")
            self._calls.append(_Call("generate", batch, length, state=state))
            return None
        mask = kwargs.get("attention_mask")
        real = mask[:, -length:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else \
            torch.ones(batch, length, dtype=torch.bool, device=shaped.device)
        counts = real.sum(1)
        if bool((counts == 0).any()):
            raise PrunekitError("the ShadowLLM runtime got a sequence with no real token (attention_mask all zeros)")
        order = real.long().cumsum(1) - 1
        mode, prefix = self._mode()
        dense_prompt = self.prompt == "dense"
        if mode == "prefix":
            if bool((counts <= prefix).any()):
                raise PrunekitError(f"prefix P={prefix} is beyond the sequence: every sequence needs more than P real "
                                    f"tokens (the shortest has {int(counts.min())}); lower P")
            chosen = torch.full_like(counts, prefix - 1)
            sparse = real & (order >= prefix) if dense_prompt else real
        elif mode == "class" and dense_prompt:
            if bool((counts < 2).any()):
                raise PrunekitError("class mode with a dense prompt needs at least 2 tokens per sequence")
            chosen = counts - 2
            sparse = real & (order == (counts - 1).unsqueeze(1))
        else:
            chosen = counts - 1
            sparse = None if dense_prompt else real
        select = (real & (order == chosen.unsqueeze(1))).float().argmax(1)
        self._calls.append(_Call("prompt", batch, length, select, sparse, state=SequenceState(batch)))
        return None

    def _after(self, module, args, kwargs, output):
        call = self._calls.pop() if self._calls else None
        if call is None or call.phase != "prompt" or output is None:
            return None
        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            setattr(cache, CACHE_ATTR, call.state)
        return None

    def _feature(self, module, args):
        call = self._calls[-1] if self._calls else None
        if call is None or call.phase != "prompt":
            return None
        x = args[0]
        x3 = x.view(call.batch, call.length, -1)
        call.feature = x3[torch.arange(call.batch, device=x.device), call.select.to(x.device)]
        return None

    def _layer_input(self, layer: int):
        def hook(module, args, kwargs):
            call = self._calls[-1] if self._calls else None
            if call is None or call.phase != "prompt":
                return None
            h = args[0] if args else kwargs["hidden_states"]
            h3 = h.view(call.batch, call.length, -1)
            feature = h3[torch.arange(call.batch, device=h.device), call.select.to(h.device)]
            net = self.predictor[layer]
            with torch.no_grad():
                scores = net(feature.to(_dtype(net)))
            chosen = self._split(scores, layer)
            keep = {k: keep_dynamic({layer: chosen[k]}, self.sparsity, "local")[layer] for k in ("heads", "neurons")}
            call.state.layers[layer] = LayerChoice(keep["heads"], keep["neurons"])
            return None
        return hook

    def _split(self, scores: torch.Tensor, layer: int | None = None) -> dict:
        blocks = self.blocks if layer is None else [b for b in self.blocks if int(b[0].split(".")[0]) == layer]
        parts = scores.float().split([s for _, s in blocks], dim=1)
        if layer is not None:
            return {name.split(".")[1]: p for (name, _), p in zip(blocks, parts)}
        out: dict = {"heads": {}, "neurons": {}}
        for (name, _), p in zip(blocks, parts):
            i, kind = name.split(".")
            out[kind][int(i)] = p
        return out

    def _choose_all(self, call: _Call) -> None:
        """ShadowLLM: the predictor once per sequence, for every layer."""
        if call.feature is None:
            raise PrunekitError("the layer-0 feature was not captured (layer 0's o_proj did not run)")
        with torch.no_grad():
            scores = self.predictor(call.feature.to(_dtype(self.predictor)))
        tables = self._split(scores)
        heads = keep_dynamic(tables["heads"], self.sparsity, self.scope)
        neurons = keep_dynamic(tables["neurons"], self.sparsity, self.scope)
        for i in tables["heads"]:
            call.state.layers[i] = LayerChoice(heads[i], neurons[i])

    def _choice(self, call: _Call, layer: int) -> LayerChoice:
        if layer not in call.state.layers:
            if self.design != "shadowllm":
                raise PrunekitError(f"no selection was made for layer {layer}")
            self._choose_all(call)
        return call.state.layers[layer]

    # ------------------------------------------------------------------ the projections
    def _wrap(self, module: nn.Module, layer: int, role: str):
        dense = type(module).forward.__get__(module)

        def forward(x, *args, **kwargs):
            call = self._calls[-1] if self._calls else None
            if call is None:
                return dense(x, *args, **kwargs)
            if call.phase == "prompt":
                if role in PRODUCERS or call.sparse is None:
                    if call.sparse is None and role not in PRODUCERS:
                        self._choice(call, layer)  # dense prompt: still choose for generation
                    return dense(x, *args, **kwargs)
                return dense(self._mask(call, layer, role, x), *args, **kwargs)
            return self._sparse(call, layer, role, x)

        return forward

    def _mask(self, call: _Call, layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        choice = self._choice(call, layer)
        flat = x.dim() == 2
        x3 = x.view(call.batch, call.length, -1) if flat else x
        keep = choice.heads.repeat_interleave(self._head_dim, dim=1) if role == "o" else choice.neurons
        drop = call.sparse.to(x.device).unsqueeze(-1) & ~keep.to(x.device).unsqueeze(1)
        x3 = x3.masked_fill(drop, 0)
        return x3.reshape(x.shape) if flat else x3

    def _sparse(self, call: _Call, layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
        choice = call.state.layers[layer]
        if not choice.weights:
            call.state.gather_s += choice.gather(self._refs[layer], self._head_dim)
            self.last_gather = {"seconds": call.state.gather_s, "batch": call.batch,
                                "mb": sum(c.nbytes() for c in call.state.layers.values()) / 2**20}
        weight, bias = choice.weights[role]
        if role in PRODUCERS:
            return F.linear(x, weight, bias)
        flat = x.dim() == 2
        x3 = x.view(call.batch, call.length, x.shape[-1]) if flat else x
        if role == "o":
            x3 = x3.index_select(-1, choice.head_dims.to(x.device))
            if choice.head_keep is not None:
                x3 = x3 * choice.head_keep.unsqueeze(1).to(x3.dtype)
        elif choice.neuron_keep is not None:
            x3 = x3 * choice.neuron_keep.unsqueeze(1).to(x3.dtype)
        out = F.linear(x3, weight, bias)
        return out.reshape(-1, out.shape[-1]) if flat else out

    # ------------------------------------------------------------------ reporting
    def choices_of(self, cache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the (heads, neurons) bool masks (B, ·) a prompt left on ``cache``."""
        state = getattr(cache, CACHE_ATTR, None)
        if state is None:
            raise PrunekitError("this cache holds no ShadowLLM selection (run the prompt with use_cache=True)")
        return {i: (c.heads, c.neurons) for i, c in state.layers.items()}

    def decode_macs(self, model: nn.Module) -> int:
        """Weights multiplied per generated token (one sequence): o_proj at the kept heads' width and the MLP at
        the kept neurons' (the expected fraction 1 − p on layers 1…L−1; a global choice moves units between
        layers but keeps the total when the layers have equal widths)."""
        keep = 1 - self.sparsity
        total = 0
        for ref in adapter_for(model).linears(model):
            n = ref.weight.numel()
            if ref.layer in self._refs and ref.layer > 0 and ref.role in ("o",) + PRODUCERS + CONSUMERS:
                n = int(n * keep)
            total += n
        return total


def _dtype(net: nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


def _shape_text(shapes: dict[int, dict[str, int]]) -> str:
    if not shapes:
        return "no layers"
    first = shapes[min(shapes)]
    return f"layers {min(shapes)}-{max(shapes)}, {first.get('heads')} heads / {first.get('neurons')} neurons"


__all__ = ["DESIGNS", "MODES", "PROMPTS", "ShadowRuntime"]
