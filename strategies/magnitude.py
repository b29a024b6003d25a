"""Magnitude pruning: drop the smallest |W| of each weight matrix (one threshold per matrix).

Reference: locuslab/wanda ``prune_magnitude`` (the baseline of Wanda and SparseGPT). Needs no data.
Difference: the reference keeps ``W_metric <= sorted[k]`` which prunes k+1 weights (plus ties); we prune
exactly ``k = int(numel * sparsity)``, so the requested sparsity is met to the weight. N:M as in the
reference: in each group of M inputs of a row, the M−N smallest |W| are pruned.
"""

from __future__ import annotations

import torch

from prunekit.arch import LinearRef
from prunekit.masks import lowest_global, lowest_n_of_m
from prunekit.stats import Statistic
from prunekit.strategy import PruningStrategy


def scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


class Magnitude(PruningStrategy):
    """Magnitude pruning: smallest |W| per weight matrix (unstructured or N:M); no calibration data."""

    name = "magnitude"
    statistics = {}

    def prune_linear(self, ref: LinearRef, stats: dict[str, Statistic]) -> torch.Tensor:
        s = scores(ref.weight.float())
        return lowest_n_of_m(s, self.nm) if self.nm else lowest_global(s, self.sparsity)
