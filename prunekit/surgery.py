"""Structured surgery: physically remove MLP channels and attention heads so the model gets smaller.

Cutting channel c of a decoder layer's MLP removes output row c of every channel-producing projection
(gate/up, or fc1 with its bias) and input column c of the channel-consuming projection (down / fc2). Cutting
query head h removes its rows of the query projection and its columns of the output projection; a key/value
head goes with its rows of k/v. Either way the result computes exactly what the uncut model computes with
the removed columns of the consumer (down/fc2/o) set to zero. Layers may keep different widths.

Grouped-query attention (``num_key_value_heads`` < ``num_attention_heads``): the unit is explicit. A KV group
is kept when at least one of its query heads is kept, and every kept group must keep the same number of query
heads (so ``num_key_value_groups`` stays one number per layer). That admits both documented units: whole KV
groups with all their query heads, or the same count of query heads within every group.

Empty layers: with ``allow_empty=True`` a layer may lose every MLP channel (its MLP then outputs just the
consumer's bias, or zeros) or every attention head. A headless attention module keeps its (now 0-wide)
projections so weights and names stay the family's own, but its forward is replaced: it returns the output
projection's bias (or zeros), and still appends empty (0-head) keys/values to the KV cache so the cache's
length bookkeeping stays right for ``generate``. Every supported family runs such layers; the tests check
logits and cached generation against the zeroed model.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError

PRODUCERS = ("gate", "up", "fc1")
CONSUMERS = ("down", "fc2")


def _keep_rows(module: nn.Module, keep: torch.Tensor, transposed: bool) -> None:
    """Keep output features ``keep`` of a Linear (or a transposed Conv1D), bias included."""
    w = module.weight.data
    new = w[:, keep] if transposed else w[keep]
    module.weight = nn.Parameter(new.clone(), requires_grad=module.weight.requires_grad)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias.data[keep].clone(), requires_grad=module.bias.requires_grad)
    _update_features(module, transposed)


def _keep_cols(module: nn.Module, keep: torch.Tensor, transposed: bool) -> None:
    """Keep input features ``keep`` of a Linear (or a transposed Conv1D); the bias is unchanged."""
    w = module.weight.data
    new = w[keep] if transposed else w[:, keep]
    module.weight = nn.Parameter(new.clone(), requires_grad=module.weight.requires_grad)
    _update_features(module, transposed)
    if transposed and keep.numel() == 0:
        _swap_forward(module, _inputless_conv1d_forward, "Inputless")


_SWAPPED: dict[tuple[type, str], type] = {}


def _swap_forward(module: nn.Module, forward, prefix: str) -> None:
    """Give one module instance a replacement forward via a cached subclass (names and weights unchanged)."""
    cls = type(module)
    if cls.__name__.startswith(prefix):
        return
    key = (cls, prefix)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"{prefix}{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    module.__class__ = _SWAPPED[key]


def _update_features(module: nn.Module, transposed: bool) -> None:
    if transposed:  # transformers' Conv1D: weight (in, out), attribute nf = out
        module.nf = module.weight.shape[1]
        if hasattr(module, "nx"):
            module.nx = module.weight.shape[0]
    else:
        module.out_features, module.in_features = module.weight.shape


def mlp_width(model: nn.Module, layer: int) -> int:
    """Number of MLP channels of a decoder layer."""
    refs = [r for r in adapter_for(model).linears(model) if r.layer == layer and r.role in CONSUMERS]
    return refs[0].in_features


def cut_mlp_channels(model: nn.Module, layer: int, keep: torch.Tensor | list[int], allow_empty: bool = False) -> None:
    """Keep only MLP channels ``keep`` (sorted, unique indices) of decoder layer ``layer``, in place."""
    refs = [r for r in adapter_for(model).linears(model) if r.layer == layer]
    producers = [r for r in refs if r.role in PRODUCERS]
    consumers = [r for r in refs if r.role in CONSUMERS]
    if not producers or len(consumers) != 1:
        raise PrunekitError(f"layer {layer} has no MLP channel producers/consumer to cut")
    width = consumers[0].in_features
    keep = torch.as_tensor(keep, dtype=torch.long).unique(sorted=True)
    if keep.numel() and (keep.min() < 0 or keep.max() >= width):
        raise PrunekitError(f"MLP channel indices must be in [0, {width}) for layer {layer}")
    if keep.numel() == 0 and not allow_empty:
        raise PrunekitError(f"cannot remove every MLP channel of layer {layer}; keep at least one "
                            "(or let the strategy empty layers: allow_empty=true)")
    for ref in producers:
        _keep_rows(ref.module, keep, ref.transposed)
    _keep_cols(consumers[0].module, keep, consumers[0].transposed)


def _attention(model: nn.Module, layer: int):
    refs = {r.role: r for r in adapter_for(model).linears(model) if r.layer == layer and r.group == "attn"}
    attn = adapter_for(model).layers(model)[layer].get_submodule(
        next(iter(adapter_for(model).linear_paths.values())).rsplit(".", 1)[0]
    )
    return refs, attn


def attention_heads(model: nn.Module, layer: int) -> tuple[int, int]:
    """(query heads, key/value heads) currently in a decoder layer; (0, 0) once it lost all of them."""
    refs, _ = _attention(model, layer)
    _, _, head_dim = adapter_for(model).attention_shape(model.config)
    q = refs["o"].in_features // head_dim
    if "k" in refs:
        return q, refs["k"].out_features // head_dim
    return q, q


def _headless_forward(self, hidden_states, *args, **kwargs):
    """Forward of an attention module without heads: the output projection of nothing, plus cache upkeep."""
    cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
    cache = getattr(cache, "self_attention_cache", cache)  # GPT-2 may wrap it in an encoder-decoder cache
    batch, length = hidden_states.shape[:2]
    if cache is not None:
        empty = hidden_states.new_zeros(batch, 0, length, self._prunekit_head_dim)
        cache.update(empty, empty, self.layer_idx)
    return _nothing_projected(self.get_submodule(self._prunekit_output), hidden_states), None


def _nothing_projected(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """What a projection with no inputs outputs: its bias (or zeros), shaped like ``like``."""
    out = like.new_zeros(like.shape)
    bias = getattr(module, "bias", None)
    return out if bias is None else out + bias


def _inputless_conv1d_forward(self, x):
    """transformers' Conv1D cannot view a 0-wide input; with no inputs the output is the bias."""
    return _nothing_projected(self, x.new_zeros(*x.shape[:-1], self.nf))


def _make_headless(attn: nn.Module, output: str, head_dim: int) -> None:
    _swap_forward(attn, _headless_forward, "Headless")
    attn._prunekit_output, attn._prunekit_head_dim = output, head_dim


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def cut_attention_heads(model: nn.Module, layer: int, keep: torch.Tensor | list[int], allow_empty: bool = False) -> None:
    """Keep only query heads ``keep`` of decoder layer ``layer`` (and the KV heads they use), in place."""
    adapter = adapter_for(model)
    refs, attn = _attention(model, layer)
    _, _, d = adapter.attention_shape(model.config)
    n_q, n_kv = attention_heads(model, layer)
    keep = torch.as_tensor(keep, dtype=torch.long).unique(sorted=True)
    if keep.numel() == 0 and not allow_empty:
        raise PrunekitError(f"cannot remove every attention head of layer {layer}; keep at least one "
                            "(or let the strategy empty layers: allow_empty=true)")
    if keep.numel() and (keep.min() < 0 or keep.max() >= n_q):
        raise PrunekitError(f"attention head indices must be in [0, {n_q}) for layer {layer}")
    group = n_q // n_kv if n_kv else 1
    kv_keep = (keep // group).unique(sorted=True)
    per_group = torch.bincount(keep // group, minlength=n_kv)[kv_keep]
    if per_group.numel() and (per_group != per_group[0]).any():
        raise PrunekitError(
            f"layer {layer}: grouped-query attention ({n_q} query / {n_kv} KV heads) needs the same number of kept "
            f"query heads in every kept KV group, got {per_group.tolist()} for groups {kv_keep.tolist()}"
        )
    q_rows = _head_rows(keep, d)
    if "qkv" in refs:  # fused projection
        r = refs["qkv"]
        if adapter.family == "gpt2":  # [q | k | v], each n_q * d wide
            rows = torch.cat([q_rows + i * n_q * d for i in range(3)])
        else:  # gpt_neox: per head [q_h | k_h | v_h]
            rows = _head_rows(keep, 3 * d)
        _keep_rows(r.module, rows, r.transposed)
    else:
        _keep_rows(refs["q"].module, q_rows, refs["q"].transposed)
        kv_rows = _head_rows(kv_keep, d)
        for role in ("k", "v"):
            _keep_rows(refs[role].module, kv_rows, refs[role].transposed)
    _keep_cols(refs["o"].module, q_rows, refs["o"].transposed)
    kept = keep.numel()
    if kept == 0:
        _make_headless(attn, adapter.linear_paths["o"].rsplit(".", 1)[-1], d)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = kept // kv_keep.numel() if kept else 1
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, kept)
    if hasattr(attn, "num_key_value_heads") and isinstance(attn.num_key_value_heads, int):
        attn.num_key_value_heads = kv_keep.numel()
    if hasattr(attn, "split_size"):  # GPT-2 splits its fused output into three equal parts
        attn.split_size = kept * d
    if hasattr(attn, "embed_dim") and adapter.family == "gpt2":
        attn.embed_dim = kept * d


def remove_units(model: nn.Module, layer: int, drop_heads: list[int], drop_channels: list[int],
                 allow_empty: bool = False) -> None:
    """Remove query heads ``drop_heads`` and MLP channels ``drop_channels`` of decoder layer ``layer``, in place."""
    if drop_channels:
        cut_mlp_channels(model, layer, sorted(set(range(mlp_width(model, layer))) - set(drop_channels)), allow_empty)
    if drop_heads:
        n_q = attention_heads(model, layer)[0]
        cut_attention_heads(model, layer, sorted(set(range(n_q)) - set(drop_heads)), allow_empty)


def add_bias(ref, delta: torch.Tensor) -> None:
    """bias += delta for a projection (``prunekit.arch.LinearRef``); a bias is created where there was none."""
    module = ref.module
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(torch.zeros(ref.out_features, dtype=module.weight.dtype), requires_grad=False)
    module.bias.data += delta.to(module.bias.dtype)


def structure(model: nn.Module) -> list[dict]:
    """Per decoder layer: MLP channels, query heads, KV heads, and which consumers carry an added bias."""
    out = []
    adapter = adapter_for(model)
    for i in range(len(adapter.layers(model))):
        q, kv = attention_heads(model, i)
        refs = {r.role: r for r in adapter.linears(model) if r.layer == i}
        biased = sorted(role for role, r in refs.items() if getattr(r.module, "bias", None) is not None)
        out.append({"mlp_channels": mlp_width(model, i), "heads": q, "kv_heads": kv, "biased": biased})
    return out


def apply_structure(model: nn.Module, layers: list[dict]) -> None:
    """Give a freshly built model the recorded per-layer widths (weights are loaded afterwards)."""
    adapter = adapter_for(model)
    if len(layers) != len(adapter.layers(model)):
        raise PrunekitError(f"recorded structure has {len(layers)} layers, the model {len(adapter.layers(model))}")
    for i, spec in enumerate(layers):
        if spec["mlp_channels"] != mlp_width(model, i):
            cut_mlp_channels(model, i, range(spec["mlp_channels"]), allow_empty=True)
        n_q, n_kv = attention_heads(model, i)
        if spec["heads"] == 0 and n_q:
            cut_attention_heads(model, i, [], allow_empty=True)
        elif (spec["heads"], spec["kv_heads"]) != (n_q, n_kv):
            per_group, group = spec["heads"] // spec["kv_heads"], n_q // n_kv
            keep = [g * group + j for g in range(spec["kv_heads"]) for j in range(per_group)]
            cut_attention_heads(model, i, keep)
        for ref in adapter.linears(model):
            if ref.layer == i and ref.role in spec.get("biased", []) and getattr(ref.module, "bias", None) is None:
                ref.module.bias = nn.Parameter(torch.zeros(ref.out_features, dtype=ref.module.weight.dtype),
                                               requires_grad=False)
