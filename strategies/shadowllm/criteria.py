"""ShadowLLM's neuron and head criteria (Akhauri et al., 2024; reference abdelfattah-lab/shadow_llm): a registry.

Groundwork for the ShadowLLM/DejaVu issue: the criteria as small functions of one example's traced tensors, each
checked against a direct autograd computation (``tests/test_shadowllm_criteria.py``). Not yet a strategy.

Notation (the loss L is the cross-entropy on the gold continuation tokens only):
- heads: a = the attention context of a query head (the o_proj input split by head), g = ∂L/∂a, shapes (B, T, H, d);
- neurons (one unit = one MLP intermediate channel): x = the MLP input, y_r / ∂L/∂y_r = the output of producer r
  (gate and up for GLU families, fc1 otherwise) and its gradient, W_r the producer's (D, in) weight; u = the
  pre-activation (the gate projection's output for GLU families, fc1's output — bias included — otherwise);
  z = the consumer's (down/fc2) input and ∂L/∂z.

| criterion | heads (per example) | neurons (per example) |
|---|---|---|
| plainact | Σ_t |Σ_d a·g| | Σ_r Σ_i |W_r[j,i] · ∂L/∂W_r[j,i]| |
| l2_norm | ‖a_h‖ over tokens and dims | ‖u_j‖ over tokens |
| grad_norm | ‖g_h‖ | (Σ_r ‖∂L/∂W_r[j,:]‖²)^½ |
| fisher | Σ_d mean_t (a·g)² | mean_t (u_j · ∂L/∂u_j)² |
| snip | |Σ_t Σ_d a·g| = |∂L/∂m_h| for a unit mask m_h on the head's context | |Σ_t z_j ∂L/∂z_j| = |∂L/∂m_j| |

Each criterion reads its neurons at one site (``Criterion.neuron_site``): the pre-activation u, the consumer input z,
or the producers' weights with their gradients — the last only per example when a batch holds one example (the
``documents`` packing of task calibration data does). Tokens outside ``mask`` (padding) count nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from prunekit.errors import PrunekitError


def _m(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(*mask.shape, *([1] * (like.dim() - 2))).to(like.dtype)


def _head_plainact(a, g, mask):
    return ((a * g).sum(-1).abs() * _m(mask, a[..., 0])).sum(1)


def _head_l2(a, g, mask):
    return (a.pow(2) * _m(mask, a)).sum((1, 3)).sqrt()


def _head_grad_norm(a, g, mask):
    return (g.pow(2) * _m(mask, g)).sum((1, 3)).sqrt()


def _head_fisher(a, g, mask):
    m = _m(mask, a)
    return ((a * g).pow(2) * m).sum(1).div(m.sum(1).clamp_min(1)).sum(-1)


def _head_snip(a, g, mask):
    return ((a * g).sum(-1) * _m(mask, a[..., 0])).sum(1).abs()


def _neuron_l2(u, gu, mask):
    return (u.pow(2) * _m(mask, u)).sum(1).sqrt()


def _neuron_fisher(u, gu, mask):
    m = _m(mask, u)
    return ((u * gu).pow(2) * m).sum(1) / m.sum(1).clamp_min(1)


def _neuron_snip(z, gz, mask):
    return (z * gz * _m(mask, z)).sum(1).abs()


def _weight_plainact(w, g):
    return (w * g).abs().sum(-1)


def _weight_grad_sq(w, g):
    return g.pow(2).sum(-1)


def _sum(rows):
    return sum(rows)


def _root_of_sum(rows):
    return sum(rows).sqrt()


@dataclass(frozen=True)
class Criterion:
    """A named criterion.

    ``heads(a, g, mask)`` → (B, H) per example. Neurons are read at ``neuron_site``: ``pre`` (u and ∂L/∂u: the
    gate/fc1 output), ``mid`` (z and ∂L/∂z: the consumer's input) — ``neurons(t, ∂L/∂t, mask)`` → (B, D) — or
    ``weights`` (each producer's weight and its gradient for one example: ``neurons(W, ∂L/∂W)`` → (D,), and
    ``combine`` joins the producers' rows).
    """

    name: str
    heads: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    neuron_site: str
    neurons: Callable[..., torch.Tensor]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] = _sum
    needs_grad: bool = True
    doc: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.neuron_site not in NEURON_SITES:
            raise PrunekitError(f"criterion {self.name!r}: neuron_site must be one of {NEURON_SITES}, "
                                f"got {self.neuron_site!r}")


NEURON_SITES = ("pre", "mid", "weights")
CRITERIA: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
    """Add a criterion to the registry (third parties call this from their package)."""
    if criterion.name in CRITERIA:
        raise PrunekitError(f"a criterion named {criterion.name!r} is already registered")
    CRITERIA[criterion.name] = criterion
    return criterion


def get(name: str) -> Criterion:
    if name not in CRITERIA:
        raise PrunekitError(f"unknown criterion {name!r}; registered: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


for _c in (Criterion("plainact", _head_plainact, "weights", _weight_plainact, doc="ShadowLLM's choice"),
           Criterion("l2_norm", _head_l2, "pre", _neuron_l2, needs_grad=False, doc="DejaVu's target"),
           Criterion("grad_norm", _head_grad_norm, "weights", _weight_grad_sq, _root_of_sum),
           Criterion("fisher", _head_fisher, "pre", _neuron_fisher),
           Criterion("snip", _head_snip, "mid", _neuron_snip)):
    register(_c)
