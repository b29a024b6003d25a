"""Architecture adapters: where each model family keeps its decoder layers and linear projections.

Strategies never hard-code module paths; they ask the adapter. One adapter per family (SliceGPT-style
accessors). GPT-2 stores its projections as ``Conv1D`` whose weight is (in, out): ``LinearRef.weight`` always
presents weights as (out_features, in_features), the orientation every score formula in the papers assumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.errors import PrunekitError

ATTN_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "down", "fc1", "fc2")
ROLES = ATTN_ROLES + MLP_ROLES


@dataclass
class LinearRef:
    """One prunable projection of one decoder layer."""

    name: str  # full module name inside the model, e.g. "model.layers.3.mlp.down_proj"
    layer: int
    role: str  # one of ROLES
    module: nn.Module
    transposed: bool = False  # True for GPT-2's Conv1D (weight stored as (in, out))

    @property
    def group(self) -> str:
        return "attn" if self.role in ATTN_ROLES else "mlp"

    @property
    def weight(self) -> torch.Tensor:
        """The weight as (out_features, in_features); a view, so in-place edits reach the model."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    def set_weight(self, w: torch.Tensor) -> None:
        """Write a new (out_features, in_features) weight in place, keeping dtype and layout."""
        self.weight.copy_(w.to(self.module.weight.dtype))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True)
class Adapter:
    """Dotted paths of one family's modules, relative to the model and to each decoder layer."""

    family: str
    model_types: tuple[str, ...]
    layers_path: str
    linear_paths: dict[str, str] = field(default_factory=dict)  # role -> path inside a decoder layer
    transposed: bool = False

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def linears(self, model: nn.Module) -> list[LinearRef]:
        """Every projection of every decoder layer, in layer order then role order."""
        refs = []
        for i, layer in enumerate(self.layers(model)):
            for role, path in self.linear_paths.items():
                refs.append(
                    LinearRef(f"{self.layers_path}.{i}.{path}", i, role, layer.get_submodule(path), self.transposed)
                )
        return refs

    def attention_shape(self, config) -> tuple[int, int, int]:
        """(query heads, key/value heads, head_dim) read from the config, never assumed."""
        heads = _first_attr(config, "num_attention_heads", "n_head")
        kv = getattr(config, "num_key_value_heads", None) or heads
        hidden = _first_attr(config, "hidden_size", "n_embd")
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return heads, kv, head_dim


def _first_attr(obj, *names):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    raise PrunekitError(f"config of type {type(obj).__name__} has none of the attributes {names}")


_LLAMA_LIKE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

ADAPTERS: dict[str, Adapter] = {
    a.family: a
    for a in (
        Adapter("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", _LLAMA_LIKE),
        Adapter("gemma3_text", ("gemma3_text",), "model.layers", _LLAMA_LIKE),
        Adapter(
            "opt",
            ("opt",),
            "model.decoder.layers",
            {
                "q": "self_attn.q_proj",
                "k": "self_attn.k_proj",
                "v": "self_attn.v_proj",
                "o": "self_attn.out_proj",
                "fc1": "fc1",
                "fc2": "fc2",
            },
        ),
        Adapter(
            "gpt2",
            ("gpt2",),
            "transformer.h",
            {"qkv": "attn.c_attn", "o": "attn.c_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"},
            transposed=True,
        ),
        Adapter(
            "gpt_neox",
            ("gpt_neox",),
            "gpt_neox.layers",
            {
                "qkv": "attention.query_key_value",
                "o": "attention.dense",
                "fc1": "mlp.dense_h_to_4h",
                "fc2": "mlp.dense_4h_to_h",
            },
        ),
    )
}


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS.values() for t in a.model_types)


def adapter_for(model_or_config) -> Adapter:
    """The adapter of a model (or config); an unsupported family names the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    raise PrunekitError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}. "
        "A new family is one Adapter entry in prunekit/arch.py."
    )


def select_linears(model: nn.Module, modules: list[str], layers: list[int] | None = None) -> list[LinearRef]:
    """The projections named by ``modules`` (roles such as "q", "down", or the groups "attn" / "mlp").

    Embeddings and the LM head are never decoder projections, so they are never selected.
    """
    wanted: set[str] = set()
    for m in modules:
        if m == "attn":
            wanted.update(ATTN_ROLES)
        elif m == "mlp":
            wanted.update(MLP_ROLES)
        elif m in ROLES:
            wanted.add(m)
        else:
            raise PrunekitError(f"unknown module kind {m!r} in `modules`; use 'attn', 'mlp' or any of {ROLES}")
    adapter = adapter_for(model)
    refs = adapter.linears(model)
    n_layers = len(adapter.layers(model))
    if layers is not None:
        bad = [i for i in layers if not -n_layers <= i < n_layers]
        if bad:
            raise PrunekitError(f"layers {bad} out of range: the model has {n_layers} decoder layers")
        keep = {i % n_layers for i in layers}
        refs = [r for r in refs if r.layer in keep]
    refs = [r for r in refs if r.role in wanted]
    if not refs:
        raise PrunekitError(f"`modules` {modules} selects no projection of this {adapter.family} model")
    return refs
