"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter, 2023; locuslab/wanda).

Score of weight W_ij (Eq. 1): S_ij = |W_ij| · ‖X_j‖₂, with ‖X_j‖₂ the ℓ2 norm of input channel j over all
calibration tokens. Comparison group: each output row (Eq. 2): the ``int(in · sparsity)`` lowest scores of every
row are pruned (stable sort, as the reference). N:M: within each group of M consecutive inputs of a row,
the M−N lowest scores. Mode ``sequential`` by default, as the reference (each layer calibrated on the outputs
of the already-pruned layers before it; all linears of one layer share one forward pass).

Differences from the reference, none changing a mask: the reference's ``scaler_row`` is Σx²/N_seq, ours is Σx²
(a positive constant per matrix, so within-row order is identical); we accumulate in float64.
Calibration defaults differ: the reference takes 128 random 2048-token C4 windows; prunekit defaults to 32
contiguous 512-token Wikipedia windows (see ``CalibrationDataModule``); both are configurable.
"""

from __future__ import annotations

import torch

from prunekit.arch import LinearRef
from prunekit.masks import lowest_n_of_m, lowest_per_row
from prunekit.stats import ChannelSumSq, Statistic
from prunekit.strategy import PruningStrategy


def scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ broadcast over output rows (weight is (out, in), input_norm is (in,))."""
    return weight.abs().to(torch.float64) * input_norm.reshape(1, -1).to(torch.float64)


def select(s: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    return lowest_n_of_m(s, nm) if nm else lowest_per_row(s, sparsity)


class Wanda(PruningStrategy):
    """Wanda: |W| x input-activation norm, compared per output row (unstructured or N:M)."""

    name = "wanda"
    statistics = {"act": ChannelSumSq}

    def prune_linear(self, ref: LinearRef, stats: dict[str, Statistic]) -> torch.Tensor:
        return select(scores(ref.weight, stats["act"].norm()), self.sparsity, self.nm)
