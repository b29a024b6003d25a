"""Which heads and neurons to keep, from scores: local (a fraction of every layer) or global (a fraction of all
units of a kind, ranked across layers). Pure tensor functions shared by the static strategy and the runtime.

Counts: local removes ``int(p · n_ℓ)`` units of each layer; global removes ``int(p · Σ_ℓ n_ℓ)`` of the kind
(heads, or neurons) over the layers that take part — so at p = 0.3 on 29 layers of 1536 neurons, 13363 neurons
go, wherever they score lowest. Ties go in index order (stable sort), so the same scores give the same choice.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError

SCOPES = ("local", "global")


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= float(sparsity) < 1:
        raise PrunekitError(f"{what} must be a number in [0, 1) (the fraction of heads and neurons removed), "
                            f"got {sparsity!r}")
    return float(sparsity)


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise PrunekitError(f"scope must be 'local' (the same fraction of every layer) or 'global' (ranked across "
                            f"layers), got {scope!r}")
    return scope


def drop_static(scores: dict[int, torch.Tensor], sparsity: float, scope: str, floor: int = 1) -> dict[int, list[int]]:
    """Per layer, the unit indices to remove (ascending) from 1-D ``scores`` (higher = keep).

    ``floor``: units every layer keeps (global: a layer whose units all rank low keeps its ``floor`` best).
    """
    check_sparsity(sparsity)
    check_scope(scope)
    out: dict[int, list[int]] = {}
    if scope == "local":
        for layer, s in scores.items():
            n = s.numel()
            count = max(0, min(int(sparsity * n), n - floor))
            out[layer] = sorted(torch.sort(s.double(), stable=True)[1][:count].tolist())
        return out
    layers = sorted(scores)
    flat = torch.cat([scores[i].double().flatten() for i in layers]) if layers else torch.zeros(0)
    owner = torch.cat([torch.full((scores[i].numel(),), i) for i in layers]) if layers else torch.zeros(0)
    local = torch.cat([torch.arange(scores[i].numel()) for i in layers]) if layers else torch.zeros(0)
    budget = int(sparsity * flat.numel())
    left = {i: scores[i].numel() for i in layers}
    out = {i: [] for i in layers}
    for j in torch.sort(flat, stable=True)[1].tolist():
        if budget == 0:
            break
        layer = int(owner[j])
        if left[layer] <= floor:
            continue
        out[layer].append(int(local[j]))
        left[layer] -= 1
        budget -= 1
    return {i: sorted(v) for i, v in out.items()}


def keep_dynamic(scores: dict[int, torch.Tensor], sparsity: float, scope: str) -> dict[int, torch.Tensor]:
    """Per layer, a (B, n) bool mask of the units each example keeps, from (B, n) ``scores``.

    local: the top ``n − int(p · n)`` of each layer; global: the top ``N − int(p · N)`` of all the layers'
    units together (N = Σ n), so a layer may keep few or none.
    """
    check_scope(scope)
    layers = sorted(scores)
    if not layers:
        return {}
    if scope == "local":
        out = {}
        for i in layers:
            s = scores[i]
            keep = s.shape[1] - int(sparsity * s.shape[1])
            mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
            mask.scatter_(1, s.topk(keep, dim=1).indices, True)
            out[i] = mask
        return out
    flat = torch.cat([scores[i] for i in layers], dim=1)
    keep = flat.shape[1] - int(sparsity * flat.shape[1])
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask.scatter_(1, flat.topk(keep, dim=1).indices, True)
    return dict(zip(layers, mask.split([scores[i].shape[1] for i in layers], dim=1)))
