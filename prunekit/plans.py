"""Plans: what a strategy decided, before anything happens to the model.

A strategy observes calibration and returns one of these; a realizer (``prunekit.realize``) turns it into a
model. Plans hold tensors and indices only — no modules — so they can be merged (sequential pipelines
decide layer by layer), compared, saved and applied to another copy of the same model.

- :class:`WeightMask`: per linear, a bool mask of the (out, in) weight (True = pruned) and, for methods that
  reconstruct the kept weights (SparseGPT's OBS update), their new values. Unstructured and N:M sparsity.
- :class:`UnitCut`: per decoder layer, the query heads and MLP channels to remove, plus vectors to add to the
  consumer projections' biases (bias compensation). Physically smaller layers; per-layer widths.
- :class:`PlanSet`: one plan per name (task experts; ``UnitCut`` members are what its realizer builds and
  saves) and optionally a :class:`Router` that picks the member for a prompt. The dense weights are kept once;
  members are built on demand.
- :class:`RuntimePolicy`: an input-dependent selection installed in the model (a :class:`Runtime`), on top of
  an optional static ``base`` plan.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.errors import PrunekitError


class Plan(ABC):
    """Base of every plan kind."""

    kind: ClassVar[str] = "plan"

    @abstractmethod
    def layers(self) -> set[int]:
        """Decoder layers whose weights the plan changes."""

    def merge(self, other: "Plan") -> "Plan":
        """This plan followed by ``other`` (disjoint layers: what a sequential pipeline decides per layer)."""
        raise PrunekitError(f"{self.kind} plans cannot be merged")


def layer_of(name: str) -> int:
    """Decoder layer index in a module name such as ``model.layers.3.mlp.down_proj``."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and i > 0:
            return int(part)
    raise PrunekitError(f"{name} is not inside a decoder layer")


@dataclass
class WeightMask(Plan):
    """Zero weights: ``masks[name]`` is the (out, in) bool mask of a linear (True = pruned); ``weights[name]``
    (optional) replaces the linear's (out, in) weight before the mask is applied (weight reconstruction)."""

    kind: ClassVar[str] = "weight_mask"
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def layers(self) -> set[int]:
        return {layer_of(n) for n in (*self.masks, *self.weights)}

    def merge(self, other: Plan) -> Plan:
        if not isinstance(other, WeightMask):
            raise PrunekitError(f"cannot merge a {other.kind} plan into a weight_mask plan")
        return WeightMask({**self.masks, **other.masks}, {**self.weights, **other.weights})


@dataclass
class LayerCut:
    """Query heads and MLP channels removed from one decoder layer (indices in the layer before the cut)."""

    heads: list[int] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.heads, self.channels = sorted(int(h) for h in self.heads), sorted(int(c) for c in self.channels)

    def __bool__(self) -> bool:
        return bool(self.heads or self.channels)


@dataclass
class UnitCut(Plan):
    """Structured removal: ``cuts[layer]`` heads and channels; ``bias[name]`` is added to that consumer
    projection's bias (created if absent) before the cut; ``allow_empty`` lets a layer lose every unit."""

    kind: ClassVar[str] = "unit_cut"
    cuts: dict[int, LayerCut] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    allow_empty: bool = False

    def layers(self) -> set[int]:
        return {i for i, c in self.cuts.items() if c} | {layer_of(n) for n in self.bias}

    def merge(self, other: Plan) -> Plan:
        if not isinstance(other, UnitCut):
            raise PrunekitError(f"cannot merge a {other.kind} plan into a unit_cut plan")
        return UnitCut({**self.cuts, **other.cuts}, {**self.bias, **other.bias}, self.allow_empty or other.allow_empty)

    def to_json(self) -> dict:
        return {str(i): {"heads": c.heads, "channels": c.channels} for i, c in sorted(self.cuts.items())}

    @classmethod
    def from_json(cls, record: dict, bias: dict[str, torch.Tensor] | None = None, allow_empty: bool = False) -> "UnitCut":
        return cls({int(i): LayerCut(v["heads"], v["channels"]) for i, v in record.items()}, bias or {}, allow_empty)


class Router(ABC):
    """Picks the member of a :class:`PlanSet` that should serve a prompt (e.g. SEAP's task router).

    Saved with the plan set and loaded by class path, so a router class must be importable where the
    folder is loaded.
    """

    @abstractmethod
    def route(self, model: nn.Module, tokenizer, prompts: list[str]) -> list[str]:
        """The member name for each prompt (``model``: the dense model)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the router to ``path`` (one file)."""

    @classmethod
    @abstractmethod
    def load(cls, path: Path) -> "Router":
        """Read a router written by :meth:`save`."""


@dataclass
class PlanSet(Plan):
    """One plan per member name (e.g. per task), a router, and a summary of how the router was trained."""

    kind: ClassVar[str] = "plan_set"
    plans: dict[str, Plan] = field(default_factory=dict)
    router: Router | None = None
    router_report: dict | None = None

    def layers(self) -> set[int]:
        return set().union(*(p.layers() for p in self.plans.values())) if self.plans else set()


class Runtime(ABC):
    """An input-dependent selection that lives inside the model (dynamic pruning).

    ``install`` patches the model in place (hooks or module wrappers) and must leave what it computes for
    every input decided by the input alone (no state carried between calls); ``remove`` undoes it. ``state``
    (JSON-able options) and ``tensors`` are what is saved; ``from_state`` rebuilds the runtime. The class is
    stored by import path, so it must be importable where the folder is loaded.
    """

    @abstractmethod
    def install(self, model: nn.Module) -> None: ...

    @abstractmethod
    def remove(self, model: nn.Module) -> None: ...

    def state(self) -> dict[str, Any]:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_state(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Runtime":
        return cls(**state)

    def describe(self) -> dict[str, Any]:
        """What the report shows about the runtime (default: its state)."""
        return {"runtime": f"{type(self).__module__}.{type(self).__qualname__}", **self.state()}

    # How evaluation runs a runtime. A runtime whose behaviour depends on what a forward is for (a prompt to
    # generate from, a teacher-forced perplexity window, a log-likelihood request) says so here.
    scores_padded_batches: ClassVar[bool] = True  # False: lm-eval must score one request at a time

    def scoring(self, purpose: str, seq_len: int | None = None) -> AbstractContextManager:
        """Context for forwards made for ``purpose``: ``perplexity`` (teacher-forced windows of ``seq_len``),
        ``loglikelihood`` (lm-eval requests) or ``generate``. Default: no change."""
        return nullcontext()

    def notes(self, seq_len: int | None = None) -> list[str]:
        """Lines the evaluation prints about how the runtime was scored."""
        return []

    def configure(self, **options: Any) -> None:
        """Change options of an installed runtime (``prunekit eval --runtime '{...}'``)."""
        if options:
            raise PrunekitError(f"{type(self).__name__} takes no evaluation options (got {', '.join(options)})")


@dataclass
class RuntimePolicy(Plan):
    """Install ``runtime`` in the model, after realizing the static ``base`` plan (if any) underneath."""

    kind: ClassVar[str] = "runtime_policy"
    runtime: Runtime | None = None
    base: Plan | None = None

    def layers(self) -> set[int]:
        return self.base.layers() if self.base is not None else set()
