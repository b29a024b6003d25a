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

Per-example weight gradients are formed from the traces (∂L/∂W_r[j,:] = Σ_t ∂L/∂y_r[t,j] x_t), so a batch of several
examples gives each its own score. Tokens outside ``mask`` (padding) count nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from prunekit.errors import PrunekitError


@dataclass
class NeuronTrace:
    """One layer's MLP tensors for a batch of examples (see the module docstring)."""

    x: torch.Tensor  # (B, T, in)
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # producer role → (y, ∂L/∂y), each (B, T, D)
    weights: dict[str, torch.Tensor]  # producer role → (D, in)
    z: torch.Tensor  # (B, T, D)
    gz: torch.Tensor  # (B, T, D)
    mask: torch.Tensor  # (B, T) bool

    @property
    def u(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.outputs["gate"] if "gate" in self.outputs else self.outputs["fc1"]

    def weight_grads(self) -> dict[str, torch.Tensor]:
        """Per-example ∂L/∂W_r (B, D, in) from the traces."""
        m = self.mask.unsqueeze(-1).to(self.x.dtype)
        return {r: torch.einsum("btd,bti->bdi", gy * m, self.x * m) for r, (_, gy) in self.outputs.items()}


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


def _neuron_plainact(t: NeuronTrace):
    return sum((t.weights[r].unsqueeze(0) * grad).abs().sum(-1) for r, grad in t.weight_grads().items())


def _neuron_l2(t: NeuronTrace):
    u, _ = t.u
    return (u.pow(2) * _m(t.mask, u)).sum(1).sqrt()


def _neuron_grad_norm(t: NeuronTrace):
    return sum(grad.pow(2).sum(-1) for grad in t.weight_grads().values()).sqrt()


def _neuron_fisher(t: NeuronTrace):
    u, gu = t.u
    m = _m(t.mask, u)
    return ((u * gu).pow(2) * m).sum(1) / m.sum(1).clamp_min(1)


def _neuron_snip(t: NeuronTrace):
    return (t.z * t.gz * _m(t.mask, t.z)).sum(1).abs()


@dataclass(frozen=True)
class Criterion:
    """A named criterion: per-example head scores (B, H) from (a, g, mask), neuron scores (B, D) from a trace."""

    name: str
    heads: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    neurons: Callable[[NeuronTrace], torch.Tensor]
    needs_grad: bool = True
    doc: str = field(default="", compare=False)


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


for _c in (Criterion("plainact", _head_plainact, _neuron_plainact, doc="ShadowLLM's choice"),
           Criterion("l2_norm", _head_l2, _neuron_l2, needs_grad=False, doc="DejaVu's target"),
           Criterion("grad_norm", _head_grad_norm, _neuron_grad_norm),
           Criterion("fisher", _head_fisher, _neuron_fisher),
           Criterion("snip", _head_snip, _neuron_snip)):
    register(_c)
