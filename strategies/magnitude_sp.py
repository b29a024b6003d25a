"""Magnitude-sp: structured magnitude baseline (CASIA-IVA-Lab/FLAP ``prune_magnitude_sp``).

Channel score = ‖W[:, j]‖₂, the L2 norm of down_proj's input column j; head score = sum of o_proj's column
norms over the head's dimensions. Uniform ratio per layer, no data, no bias compensation — as the reference.
"""

from __future__ import annotations

import torch

from prunekit.structured import StructuredStrategy


class MagnitudeSP(StructuredStrategy):
    """Structured magnitude: remove heads/channels with the smallest weight-column norms; no data."""

    name = "magnitude-sp"
    dimension_stats = {}

    def dimension_scores(self, ref, stats, attention: bool) -> torch.Tensor:
        return ref.weight.to(torch.float64).norm(dim=0)
