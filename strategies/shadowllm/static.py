"""``shadowllm-static``: any registered criterion as a static structured method (ShadowLLM's criteria study).

A criterion (``prunekit.strategies.shadowllm.criteria``) scores every attention head and MLP neuron of every
calibration example through the gradient pipeline (forward + backward, the loss on the gold continuation only;
``l2_norm`` needs no gradient and runs all-at-once). The scores are aggregated as the reference does — the mean
over each task's examples, then the mean over tasks (``per_task``; without it, the mean over all examples) — and
the lowest-scoring units are cut through the existing cut realizer, so the result is an ordinary smaller model,
comparable with FLAP, Wanda-sp and SEAP on the same data:

- ``scope="local"``: ``int(p · n)`` heads units and ``int(p · n)`` neurons of every layer;
- ``scope="global"``: ``int(p · N)`` of all head units and ``int(p · N)`` of all neurons, ranked across layers on
  the raw aggregated scores (each layer keeps at least one unit of each kind).

Multi-pass criteria (``grasp``, ``nwot``, ``jacov``, ``epenas``; ``prunekit.strategies.shadowllm.probes``) run on the
``probe`` pipeline. ``grasp`` uses the joint Hessian of every layer's head contexts and neuron inputs (GraSP's own
form): one double backward per batch, where the per-site blocks would take one per site (60 on SmolLM2).

Head units under grouped-query attention (``head_unit``): ``kv_group`` (default) removes whole KV groups, a
group's score the sum of its query heads' — the only unit that shrinks K and V; ``query`` removes query heads,
the same number from every group (local scope only: a global ranking would give groups different counts, which
a cut model cannot hold). ``sparsity`` is the fraction of units of each kind; the achieved fraction of weights is
in the report.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.plans import LayerCut, UnitCut
from prunekit.strategy import PruningStrategy
from prunekit.strategies.shadowllm import traces
from prunekit.strategies.shadowllm import probes
from prunekit.strategies.shadowllm.criteria import CRITERIA, get
from prunekit.strategies.shadowllm.select import check_scope, check_sparsity, drop_static
from prunekit.surgery import attention_heads


def aggregate(tables: dict[str, dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Per layer, the mean over each source's examples, then the mean over sources (``tables``: source →
    layer → (E, n))."""
    sources = list(tables)
    layers = sorted(tables[sources[0]])
    return {i: torch.stack([tables[s][i].mean(0) for s in sources]).mean(0) for i in layers}


class ShadowStatic(PruningStrategy):
    """Static structured pruning by a ShadowLLM criterion (see the module docstring).

    Args:
        criterion: a registered criterion (``plainact``, ``l2_norm``, ``grad_norm``, ``fisher``, ``snip`` or a
            third party's).
        sparsity: fraction of head units and of neurons removed, in [0, 1).
        scope: ``local`` or ``global``.
        head_unit: ``kv_group`` or ``query``.
        prune_heads / prune_neurons: which kinds may be removed.
        per_task: aggregate per calibration source, then average over sources (needs task data:
            ``--data.corpus task --data.packing documents``).
        layers: decoder layers that may lose units (default: all).
    """

    name = "shadowllm-static"

    def __init__(self, criterion: str = "plainact", sparsity: float = 0.2,
                 scope: Literal["local", "global"] = "global", head_unit: Literal["kv_group", "query"] = "kv_group",
                 prune_heads: bool = True, prune_neurons: bool = True, per_task: bool = True,
                 layers: list[int] | None = None) -> None:
        check_sparsity(sparsity)
        super().__init__(sparsity=sparsity, mode="all-at-once", layers=layers)
        if criterion in probes.PROBES:
            units = (["heads"] if prune_heads else []) + (["neurons"] if prune_neurons else [])
            self.probe, self.criterion = probes.check(criterion, units or ["heads"]), None
        elif criterion in CRITERIA:
            self.probe, self.criterion = None, get(criterion)
        else:
            raise PrunekitError(f"unknown criterion {criterion!r}; registered: "
                                f"{', '.join(sorted(CRITERIA))}; multi-pass (static only): {', '.join(sorted(probes.PROBES))}")
        self.per_source = per_task
        self.scope = check_scope(scope)
        if head_unit not in ("kv_group", "query"):
            raise PrunekitError(f"head_unit must be 'kv_group' or 'query', got {head_unit!r}")
        if not (prune_heads or prune_neurons):
            raise PrunekitError("prune_heads and prune_neurons are both false: nothing to prune")
        self.head_unit, self.prune_heads, self.prune_neurons = head_unit, prune_heads, prune_neurons
        self.per_task = per_task

    @property
    def pipeline(self) -> str:
        if self.probe is not None:
            return "probe"
        return "gradient" if self.criterion.needs_grad else "all-at-once"

    @property
    def criterion_name(self) -> str:
        return self.probe.name if self.probe is not None else self.criterion.name

    def _layers(self, model: nn.Module) -> list[int]:
        n = len(adapter_for(model).layers(model))
        layers = list(range(n)) if self.layers is None else list(self.layers)
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise PrunekitError(f"layers {bad} do not exist: the model has {n} decoder layers (0-{n - 1})")
        return layers

    def check(self, model: nn.Module) -> None:
        layers = self._layers(model)
        n_q, n_kv = attention_heads(model, layers[0])
        if self.prune_heads and self.head_unit == "query" and self.scope == "global" and 1 < n_kv != n_q:
            raise PrunekitError("head_unit='query' with scope='global' would remove different numbers of query heads "
                                "from the KV groups of a layer, which a cut model cannot hold: use "
                                "head_unit='kv_group' or scope='local'")

    def observers(self, model: nn.Module, layer: int | None):
        if self.probe is not None:
            return []
        return traces.observers(model, self.criterion, self._layers(model), per_source=self.per_task)

    def probe_batch(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        """The ``probe`` pipeline's step: the multi-pass criterion on one batch, keyed like the traces."""
        if batch.size < self.probe.min_batch:
            raise PrunekitError(f"criterion {self.probe.name!r} needs batches of at least {self.probe.min_batch} "
                                f"examples, got {batch.size}: use --data.packing windows --data.batch_size "
                                f"{self.probe.min_batch} (and --strategy.per_task false)")
        options = {"hessian": "joint"} if self.probe.name == "grasp" else {}  # GraSP's own full-Hessian form:
        out = self.probe(model, batch.input_ids, batch.targets(), self._layers(model), **options)  # 1 double backward
        sign = -1.0 if self.probe.keep == "low" else 1.0  # every table: higher = keep
        tables = {f"{self.probe.name}.heads.{i}": sign * t for i, t in out["heads"].items()}
        tables.update({f"{self.probe.name}.neurons.{i}": sign * t for i, t in out.get("neurons", {}).items()})
        return tables

    def _tables(self, model, observed, layers, source=None) -> dict:
        if self.probe is None:
            return traces.per_example(model, observed, self.criterion, layers, source=source)
        stat = "s" if source is None else f"s@{source}"
        name = self.probe.name
        out: dict = {"heads": {}, "neurons": {}}
        for i in layers:
            records = observed.get(f"{name}.heads.{i}", {}).get(stat)
            out["index"] = records.index if records is not None else torch.zeros(0, dtype=torch.long)
            if records is not None:
                out["heads"][i] = records.values
            neurons = observed.get(f"{name}.neurons.{i}", {}).get(stat)
            if neurons is not None:
                out["neurons"][i] = neurons.values
        return out

    def scores(self, model: nn.Module, observed, sources: list[str] | None) -> dict[str, dict[int, torch.Tensor]]:
        """``{"heads": {layer: (H,)}, "neurons": {layer: (D,)}}``: the aggregated criterion."""
        layers = self._layers(model)
        if self.per_task:
            tables = {s: self._tables(model, observed, layers, source=s) for s in sources or []}
            tables = {s: t for s, t in tables.items() if t["index"].numel()}
            if not tables:
                raise PrunekitError("no calibration example reached the criterion")
        else:
            tables = {"all": self._tables(model, observed, layers)}
        return {kind: aggregate({s: t[kind] for s, t in tables.items()}) if next(iter(tables.values()))[kind] else {}
                for kind in ("heads", "neurons")}

    def decide(self, model: nn.Module, observed, layer, context) -> UnitCut:
        scores = self.scores(model, observed, context.sources)
        drop_heads: dict[int, list[int]] = {i: [] for i in scores["heads"]}
        drop_neurons: dict[int, list[int]] = {i: [] for i in scores["neurons"]}
        if self.prune_heads:
            units, unit_scores = {}, {}
            for i, s in scores["heads"].items():
                units[i], unit_scores[i] = self._head_units(model, i, s)
            if self.head_unit == "query" and self.scope == "local":
                drop_heads = {i: self._per_group(model, i, s) for i, s in scores["heads"].items()}
            else:
                chosen = drop_static(unit_scores, self.sparsity, self.scope)
                drop_heads = {i: sorted(h for u in chosen[i] for h in units[i][u]) for i in chosen}
        if self.prune_neurons:
            drop_neurons = drop_static(scores["neurons"], self.sparsity, self.scope)
        layers = sorted(set(scores["heads"]) | set(scores["neurons"]))
        return UnitCut({i: LayerCut(drop_heads.get(i, []), drop_neurons.get(i, [])) for i in layers})

    def _head_units(self, model, layer: int, heads: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
        n_q, n_kv = attention_heads(model, layer)
        group = n_q // n_kv
        if group == 1 or self.head_unit == "query":
            return [[h] for h in range(n_q)], heads
        return [list(range(g * group, (g + 1) * group)) for g in range(n_kv)], heads.view(n_kv, group).sum(1)

    def _per_group(self, model, layer: int, heads: torch.Tensor) -> list[int]:
        """``query`` units, local: the same number of lowest query heads from every KV group."""
        n_q, n_kv = attention_heads(model, layer)
        group = n_q // n_kv
        count = min(int(self.sparsity * group), group - 1) if group > 1 else min(int(self.sparsity * n_q), n_q - 1)
        if group == 1:
            return sorted(torch.sort(heads.double(), stable=True)[1][:count].tolist())
        out = []
        for g in range(n_kv):
            local = heads[g * group:(g + 1) * group].double()
            out += [g * group + int(j) for j in torch.sort(local, stable=True)[1][:count]]
        return sorted(out)

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "criterion": self.criterion_name, "sparsity": self.sparsity,
                "scope": self.scope, "head_unit": self.head_unit, "prune_heads": self.prune_heads,
                "prune_neurons": self.prune_neurons, "per_task": self.per_task, "layers": self.layers}

    def label(self) -> str:
        return f"{self.name} ({self.criterion_name}, {self.sparsity:.0%} {self.scope})"
