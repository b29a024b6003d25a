"""The realizer interface and the shared parts of their reports."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError

RECORD_FILE = "prunekit.json"  # every folder prunekit writes: plan kind, strategy, source model


class Realizer(ABC):
    """Turns one kind of plan into a model, and owns everything that depends on the kind."""

    kind: str = ""

    @abstractmethod
    def apply(self, model: nn.Module, plan, **context: Any):
        """Make ``model`` embody ``plan`` and return the realized object (in place where the kind allows)."""

    @abstractmethod
    def report(self, realized, dense: dict[str, int]) -> dict:
        """Sparsity, widths and parameter counts of the realized model; ``dense``: ``linear_totals`` of the
        model before pruning (what ratios are measured against)."""

    @abstractmethod
    def save(self, realized, folder: Path, tokenizer=None) -> dict:
        """Write the realized model into ``folder`` (which exists and is empty apart from records); return
        ``{"loadable_with": ..., "note": ...}`` for the report."""

    @abstractmethod
    def load(self, folder: Path, dtype: str = "float32", **kwargs: Any):
        """Read a folder written by :meth:`save` and return the realized object."""

    def compact(self, model: nn.Module, plan):
        """The plan as kept after ``apply`` on ``model`` (default: unchanged); a realizer may swap copies the
        model now holds for views of it (the sequential pipeline keeps one plan part per layer)."""
        return plan

    def members(self, realized) -> Iterator[tuple[str, nn.Module]]:
        """What evaluation scores: ``(label, model)`` pairs (default: the realized model, unlabelled)."""
        yield "", realized

    def member_for_task(self, realized, task: str) -> str:
        """Which member answers an evaluation task (default: the only one, ``""``); raises if none does."""
        return ""

    def model_for_task(self, realized, task: str) -> tuple[nn.Module, str]:
        """The model that answers an evaluation task, and which member it is (default: the only one)."""
        return realized, ""


_BUILTIN = {
    "weight_mask": "prunekit.realize.masks:WeightMaskRealizer",
    "unit_cut": "prunekit.realize.cuts:UnitCutRealizer",
    "plan_set": "prunekit.realize.routed:PlanSetRealizer",
    "runtime_policy": "prunekit.realize.runtime:RuntimePolicyRealizer",
}
_CACHE: dict[str, Realizer] = {}


def _load(target: str) -> Realizer:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)()


def import_class(path: str, folder: Path, what: str) -> type:
    """The class a saved folder names by import path (a router, a runtime), or a clear error."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise PrunekitError(f"{folder}: the {what} class {path} cannot be imported ({e}); install the package that "
                            "provides it") from None


def realizers() -> dict[str, Realizer]:
    """Built-in realizers and those registered in the entry-point group ``prunekit.realizers``."""
    if not _CACHE:
        for kind, target in _BUILTIN.items():
            _CACHE[kind] = _load(target)
        for ep in entry_points(group="prunekit.realizers"):
            _CACHE.setdefault(ep.name, ep.load()())
    return _CACHE


def of(realized) -> Realizer:
    """The realizer that produced a realized object."""
    kind = getattr(realized, "prunekit_kind", None)
    if kind is None and isinstance(realized, nn.Module):
        kind = "runtime_policy" if getattr(realized, "_prunekit_runtime", None) is not None else "weight_mask"
    if kind not in realizers():
        raise PrunekitError(f"cannot tell how {type(realized).__name__} was realized")
    return realizers()[kind]


def evaluation_models(realized) -> Iterator[tuple[str, nn.Module]]:
    """``(label, model)`` for everything evaluation should score (one model, or every member of a plan set)."""
    return of(realized).members(realized)


def model_for_task(realized, task: str) -> tuple[nn.Module, str]:
    return of(realized).model_for_task(realized, task)


# ---------------------------------------------------------------------------------------------- reports
def linear_totals(model: nn.Module) -> dict[str, int]:
    """Weights of the decoder projections (what pruning ratios are measured against), all parameters."""
    from prunekit.arch import adapter_for

    linear = sum(r.weight.numel() for r in adapter_for(model).linears(model))
    return {"linear": linear, "params": sum(p.numel() for p in model.parameters())}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters (shared tensors counted once) and how many are non-zero."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return {"params_total": total, "params_nonzero": nonzero}


def sparsity_rows(model: nn.Module, layer: int | None = None) -> list[dict]:
    """Per decoder projection (of every layer, or of ``layer``): layer, role, weights and zeros."""
    from prunekit.arch import adapter_for

    rows = []
    for ref in adapter_for(model).linears(model):
        if layer is not None and ref.layer != layer:
            continue
        w = ref.weight
        rows.append({"layer": ref.layer, "role": ref.role, "name": ref.name, "numel": w.numel(),
                     "zeros": int(w.numel() - torch.count_nonzero(w))})
    return rows


def summarize_sparsity(rows: list[dict]) -> dict:
    """Overall, per-layer and per-role fraction of zero weights among the decoder projections."""
    layers: dict[int, list[int]] = {}
    for r in rows:
        z = layers.setdefault(r["layer"], [0, 0])
        z[0] += r["zeros"]
        z[1] += r["numel"]
    total_zero = sum(v[0] for v in layers.values())
    total = sum(v[1] for v in layers.values())
    roles = dict.fromkeys(r["role"] for r in rows)
    return {
        "sparsity_linear": total_zero / max(total, 1),
        "per_layer": {i: z / n if n else 0.0 for i, (z, n) in sorted(layers.items())},
        "per_role": {role: sum(r["zeros"] for r in rows if r["role"] == role)
                     / max(1, sum(r["numel"] for r in rows if r["role"] == role)) for role in roles},
    }


def static_report(model: nn.Module, dense: dict[str, int]) -> dict:
    """The report every static model shares: parameters, zeros, and the removed fraction of the projections."""
    return report_from(sparsity_rows(model), parameter_counts(model), dense)


def report_from(rows: list[dict], counts: dict[str, int], dense: dict[str, int]) -> dict:
    """``static_report`` from sparsity rows and parameter counts gathered elsewhere (streaming, per layer)."""
    summary = summarize_sparsity(rows)
    linear = sum(r["numel"] for r in rows)
    nonzero_linear = linear - sum(r["zeros"] for r in rows)
    return {**counts,
            "pruned_fraction": 1 - nonzero_linear / dense["linear"] if dense["linear"] else 0.0,
            "sparsity": summary["sparsity_linear"],
            "params_removed_fraction": 1 - counts["params_total"] / dense["params"] if dense["params"] else 0.0,
            "per_layer_sparsity": summary["per_layer"], "per_role_sparsity": summary["per_role"]}
