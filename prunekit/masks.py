"""Mask selection shared by unstructured strategies: which weights to drop, given their scores.

A mask is a bool tensor shaped like the (out, in) weight with True where the weight is pruned.
"""

from __future__ import annotations

import torch

from prunekit.errors import PrunekitError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` → None; ``"N:M"`` → (N, M): keep N non-zeros in every M consecutive inputs."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise PrunekitError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise PrunekitError(f"N:M pattern {pattern!r} needs 0 < N < M (N weights kept in every group of M)")
    return n, m


def check_nm(in_features: int, nm: tuple[int, int], where: str) -> None:
    n, m = nm
    if in_features % m:
        raise PrunekitError(f"{where} has {in_features} inputs, not divisible by M={m} of the {n}:{m} pattern")


def lowest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(in * sparsity)`` lowest scores of every output row (Wanda's comparison group).

    Stable sort, as in the Wanda reference, so ties break by column index.
    """
    k = int(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        idx = torch.sort(scores, dim=1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def lowest_global(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly the ``int(numel * sparsity)`` lowest scores of the whole matrix (one threshold)."""
    k = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k:
        mask[torch.sort(scores.flatten(), stable=True)[1][:k]] = True
    return mask.view_as(scores)


def lowest_n_of_m(scores: torch.Tensor, nm: tuple[int, int]) -> torch.Tensor:
    """In every group of M consecutive inputs of every row, prune the M−N lowest scores."""
    n, m = nm
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.view(rows, cols)
