"""How a global structured pruning ratio is spread over decoder layers.

``ratio`` is the fraction of attention+MLP weights to remove. Three schedules, shared by every structured
strategy:

- ``uniform`` (UL): every prunable layer removes ``ratio`` of its heads and channels.
- ``logistic`` (SEAP's LB; IAAR-Shanghai/SEAP ``logistic_sparsity``): the first ``keep_first`` and last
  ``keep_last`` layers stay dense; the others get ρ_ℓ = Λ / (1 + exp(−k (x_ℓ − x0))) with
  x_ℓ = (ℓ − m) / (L_eff − 1) over the L_eff non-protected layers, so sparsity grows with depth. Λ is found by
  bisection so the parameter-weighted mean ratio equals the request. Difference from the reference: ρ is
  clipped to [0, ``max_ratio``] inside the bisection (the reference clips afterwards, missing the target
  whenever clipping happens). Defaults k=0.8, x0=0.3, m=n=2 (the reference's mask scripts).
- ``adaptive`` (FLAP's AL-AM; CASIA-IVA-Lab/FLAP): scores are standardised per layer and module, heads and
  channels of all layers are ranked together and removed, lowest first, until the removed parameters reach
  the budget. Costs are parameter-exact: a channel costs hidden × (number of MLP projections), a query head
  hidden × head_dim × (2 + 2 / group) with its share of K/V (FLAP's constant 512/3 is the MHA, head_dim=128,
  SwiGLU case of this). Standardisation ``zscore`` (FLAP: (x − mean) / std, unbiased std) or ``robust``
  (SEAP: (x − median) / IQR, clipped to ±3).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from prunekit.errors import PrunekitError


def check_ratio(ratio: float) -> None:
    if not 0 <= ratio < 1:
        raise PrunekitError(f"pruning ratio must be in [0, 1), got {ratio}")


def uniform(num_layers: int, ratio: float, keep_first: int = 0, keep_last: int = 0) -> list[float]:
    """The same ratio for every prunable layer (protected layers stay dense; the others make up for them)."""
    check_ratio(ratio)
    active = _active(num_layers, keep_first, keep_last)
    per_layer = ratio * num_layers / len(active)
    if per_layer >= 1:
        raise PrunekitError(f"ratio {ratio} cannot be met with only {len(active)} of {num_layers} layers prunable")
    return [per_layer if i in active else 0.0 for i in range(num_layers)]


def logistic(
    num_layers: int,
    ratio: float,
    k: float = 0.8,
    x0: float = 0.3,
    keep_first: int = 2,
    keep_last: int = 2,
    max_ratio: float = 1.0,
    tol: float = 1e-10,
) -> list[float]:
    """SEAP's logistic layer schedule, with Λ bisected so that the mean over all layers equals ``ratio``."""
    check_ratio(ratio)
    active = _active(num_layers, keep_first, keep_last)
    n_eff = len(active)
    xs = [(i - keep_first) / (n_eff - 1) if n_eff > 1 else 0.0 for i in active]
    shape = [1 / (1 + math.exp(-k * (x - x0))) for x in xs]
    target = ratio * num_layers  # sum of per-layer ratios (equal-sized layers)
    if target > max_ratio * n_eff + 1e-12:
        raise PrunekitError(
            f"ratio {ratio} cannot be met with {n_eff} prunable layers capped at {max_ratio}; keep fewer layers dense"
        )

    def total(lam: float) -> float:
        return sum(min(max(lam * s, 0.0), max_ratio) for s in shape)

    lo, hi = 0.0, max_ratio / min(shape) if shape else 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
        if hi - lo < tol:
            break
    lam = (lo + hi) / 2
    ratios = [0.0] * num_layers
    for i, s in zip(active, shape):
        ratios[i] = min(max(lam * s, 0.0), max_ratio)
    return ratios


def _active(num_layers: int, keep_first: int, keep_last: int) -> list[int]:
    if keep_first < 0 or keep_last < 0:
        raise PrunekitError("keep_first and keep_last must be >= 0")
    active = list(range(keep_first, num_layers - keep_last))
    if not active:
        raise PrunekitError(f"keep_first={keep_first} and keep_last={keep_last} protect all {num_layers} layers")
    return active


def standardize(scores: torch.Tensor, method: Literal["zscore", "robust"]) -> torch.Tensor:
    """FLAP's z-score or SEAP's robust (median/IQR, clipped to ±3) standardisation of one module's scores."""
    s = scores.to(torch.float64)
    if method == "zscore":
        std = s.std() if s.numel() > 1 else s.new_tensor(1.0)
        return (s - s.mean()) / (std if std > 0 else 1.0)
    if method == "robust":
        q1, med, q3 = torch.quantile(s, s.new_tensor([0.25, 0.5, 0.75]))
        return ((s - med) / (q3 - q1 + 1e-9)).clamp(-3, 3)
    raise PrunekitError(f"standardization must be 'zscore' or 'robust', got {method!r}")


def adaptive(
    head_scores: list[torch.Tensor],
    channel_scores: list[torch.Tensor],
    ratio: float,
    head_cost: float,
    channel_cost: float,
    standardization: Literal["zscore", "robust"] | None = "zscore",
    head_unit: int = 1,
    protect: set[int] | None = None,
    allow_empty: bool = False,
    fixed: float = 0.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Global selection (FLAP AL-AM): return per-layer bool masks of heads and channels to *remove*.

    ``head_scores[l]`` are already grouped into removable units of ``head_unit`` heads (GQA); units and
    channels of all layers are ranked together by standardised score and removed, lowest first, while the
    removed cost stays within ``ratio`` of the total. ``standardization=None``: scores are already comparable.
    Layers in ``protect`` are never touched. At least one head unit and one channel stay in every layer unless
    ``allow_empty`` (FLAP's reference thresholds the pooled scores with no such floor). ``fixed``: weights that
    count in the total but that no unit removes (the shared K/V head when single query heads are the units).
    """
    check_ratio(ratio)
    protect = protect or set()
    entries = []  # (standardised score, cost, kind, layer, index)
    total = float(fixed)
    for layer, (h, c) in enumerate(zip(head_scores, channel_scores)):
        total += h.numel() * head_cost * head_unit + c.numel() * channel_cost
        if layer in protect:
            continue
        for kind, s, cost in (("head", h, head_cost * head_unit), ("channel", c, channel_cost)):
            z = standardize(s, standardization) if standardization else s.to(torch.float64)
            entries += [(float(z[i]), cost, kind, layer, i) for i in range(s.numel())]
    entries.sort(key=lambda e: (e[0], e[3], e[2], e[4]))  # deterministic ties
    budget = ratio * total
    head_masks = [torch.zeros(h.numel(), dtype=torch.bool) for h in head_scores]
    chan_masks = [torch.zeros(c.numel(), dtype=torch.bool) for c in channel_scores]
    removed = 0.0
    for _, cost, kind, layer, i in entries:
        if removed + cost > budget + 1e-9:
            continue  # a cheaper unit further down may still fit
        masks = head_masks if kind == "head" else chan_masks
        if not allow_empty and masks[layer].sum() + 1 >= masks[layer].numel():
            continue  # keep at least one unit
        masks[layer][i] = True
        removed += cost
    return head_masks, chan_masks
