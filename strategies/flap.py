"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024; CASIA-IVA-Lab/FLAP).

Metric WIFV per input dimension j of o_proj / down_proj: Var[x_j] · Σ_i W_ij² (fluctuation of the input
channel times the squared norm of its weight column). As in the reference, the attention metric is squared
before aggregation. Structures:

- ``allocation="adaptive"`` (AL-AM, the reference default): per layer, each module's dimension scores are
  standardised ((x − mean) / std); a head's score is the mean of its dimensions' standardised scores; heads
  and channels of all layers are ranked together and removed until the parameter budget is met.
- ``allocation="uniform"`` (UL-UM): the same ratio in every layer; a head's score is the sum over its
  dimensions.

Bias compensation (on by default, as the reference): the removed dimensions' mean contribution
W[:, removed] · E[x_removed] is added to o_proj / down_proj's bias (created for models without one). Statistics
come from the dense model (``all-at-once``), as in the reference.

Differences, each deliberate: the variance is a proper Welford per-token variance (the reference's running
update drops the first sequence and, through an aliasing slip, uses (x − mean_new)²; the scale cancels in the
standardisation); head_dim, hidden size and GQA are read from the model (the reference hard-codes 128 and
MHA; under GQA whole KV groups are the removable unit in adaptive mode); unit costs are parameter-exact
(the reference's 512/3 per head is the MHA/head_dim=128/SwiGLU value; stored in an int tensor it truncates).
Calibration: the reference uses 1024 wikitext2 windows of 128 tokens; prunekit its DataModule.
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit.stats import ChannelMoments
from prunekit.structured import Allocation, StructuredStrategy


class FLAP(StructuredStrategy):
    """FLAP: fluctuation metric (WIFV), adaptive structure (AL-AM) and bias compensation."""

    name = "flap"
    default_allocation = "adaptive"
    dimension_stats = {"moments": ChannelMoments}

    def __init__(self, sparsity: float = 0.2, allocation: Allocation | None = None, bias_compensation: bool = True,
                 mode: Literal["sequential", "all-at-once"] = "all-at-once", **kwargs) -> None:
        super().__init__(sparsity=sparsity, allocation=allocation, bias_compensation=bias_compensation, mode=mode,
                         **kwargs)

    def dimension_scores(self, ref, stats, attention: bool) -> torch.Tensor:
        wifv = stats["moments"].variance() * ref.weight.to(torch.float64).square().sum(0)
        return wifv.square() if attention else wifv
