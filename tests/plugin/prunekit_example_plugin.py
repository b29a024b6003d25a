"""Seeded random pruning: the simplest third-party strategy (a sanity baseline)."""

from __future__ import annotations

import zlib

import torch

from prunekit.masks import lowest_global
from prunekit.strategy import PruningStrategy


class RandomPruning(PruningStrategy):
    """Random pruning: a seeded uniform score per weight (third-party plugin example)."""

    name = "random"
    statistics = {}

    def __init__(self, sparsity: float | None = None, modules: list[str] | None = None, seed: int = 0) -> None:
        super().__init__(sparsity=sparsity, modules=modules)
        self.seed = seed

    def prune_linear(self, ref, stats):
        gen = torch.Generator().manual_seed(self.seed + zlib.crc32(ref.name.encode()))
        return lowest_global(torch.rand(ref.weight.shape, generator=gen), self.sparsity)
