"""Layer sensitivity: prune one decoder layer at a time and measure what it costs (SEAP Figures 5–6).

For every layer ℓ and ratio r, a model is built that differs from the dense one only in layer ℓ, where a
seeded random choice of r · heads query heads and r · channels MLP channels (rounded half up) is removed (one
random order per layer, so a larger ratio removes a superset of a smaller one; r = 1
empties the layer's attention and MLP; the residual stream passes through). Under grouped-query attention
whole KV groups are removed (r · groups of them), as everywhere in prunekit. The model is then scored on the
held-out perplexity or on an lm-eval task. Only layer ℓ is copied for each model (``prunekit.realize.routed.build_member``),
so memory stays at the dense model plus one layer.

Reference (IAAR-Shanghai/SEAP ``scripts/remove_test.py``, paper Figures 5–6): random units of all seven
projections of one layer at 20/50/100%, MMLU and PIQA accuracy on 100 prompts; the paper's finding is that
early layers are fragile and later ones tolerant, which motivates the logistic schedule. (That script does
not run as published: it imports functions the repository does not define; the design is taken from it.)
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.plans import LayerCut, UnitCut
from prunekit.realize.routed import build_member
from prunekit.surgery import attention_heads, mlp_width


def random_layer_plan(model: nn.Module, layer: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """(query heads, MLP channels) to remove from ``layer``: ratio · count of each (rounded half up; whole KV
    groups of heads under grouped-query attention), seeded per layer."""
    if not 0 < ratio <= 1:
        raise PrunekitError(f"sensitivity ratios must be in (0, 1], got {ratio}")
    n_q, n_kv = attention_heads(model, layer)[:2]
    width = mlp_width(model, layer)
    gen = torch.Generator().manual_seed(seed * 100_003 + layer)
    group = n_q // n_kv  # grouped-query attention: whole KV groups go (their query heads share K and V)
    groups = torch.randperm(n_kv, generator=gen)[: int(ratio * n_kv + 0.5)].tolist()
    heads = sorted(h for g in groups for h in range(g * group, (g + 1) * group))
    channels = sorted(torch.randperm(width, generator=gen)[: int(ratio * width + 0.5)].tolist())
    return heads, channels


def layer_models(model: nn.Module, ratios: list[float], seed: int = 0, layers: list[int] | None = None):
    """Yield ``(layer, ratio, model with only that layer pruned)`` for every layer and ratio."""
    n = len(adapter_for(model).layers(model))
    for layer in layers if layers is not None else range(n):
        if not 0 <= layer < n:
            raise PrunekitError(f"layer {layer} out of range: the model has {n} decoder layers")
        for ratio in ratios:
            heads, channels = random_layer_plan(model, layer, ratio, seed)
            yield layer, ratio, build_member(model, UnitCut({layer: LayerCut(heads, channels)}, allow_empty=True))
