"""Wanda-sp: Wanda's score turned structured (as in CASIA-IVA-Lab/FLAP ``prune_wanda_sp``).

Per input dimension j of o_proj / down_proj: mean over output rows of |W_ij| · ‖X_j‖₂ (the Wanda score);
head score = sum over its head_dim dimensions. Uniform ratio per layer, sequential (each layer calibrated on
the outputs of the already-pruned layers), no bias compensation — the reference's defaults. Difference: the
reference calibrates on 128 C4 sequences of 2048 tokens; prunekit on its DataModule (default 32 × 512 wiki).
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit.stats import ChannelSumSq
from prunekit.structured import Allocation, StructuredStrategy


class WandaSP(StructuredStrategy):
    """Wanda-sp: remove heads/channels by mean |W| x input-norm per input dimension (structured Wanda)."""

    name = "wanda-sp"
    dimension_stats = {"act": ChannelSumSq}

    def __init__(self, sparsity: float = 0.2, allocation: Allocation | None = None,
                 mode: Literal["sequential", "all-at-once"] = "sequential", **kwargs) -> None:
        super().__init__(sparsity=sparsity, allocation=allocation, mode=mode, **kwargs)

    def dimension_scores(self, ref, stats, attention: bool) -> torch.Tensor:
        return (ref.weight.abs().to(torch.float64) * stats["act"].norm().reshape(1, -1)).mean(0)
