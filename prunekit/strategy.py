"""The strategy API: a pruning method says what to observe and decides a plan; it never touches the trainer.

A strategy is a Lightning callback registered in the entry-point group ``prunekit.strategies``. Its contract:

- ``pipeline``: which calibration pipeline feeds it (``none``, ``all-at-once``, ``sequential``, ``gradient``;
  ``prunekit.pipeline``);
- ``observers(model, layer)``: what to watch — for the whole model (``layer=None``) or, on the sequential
  pipeline, for one decoder layer (``prunekit.observe``);
- ``decide(model, observed, layer, context)``: the plan (``prunekit.plans``) from the reduced observations —
  of the whole model, or of one layer on the sequential pipeline;
- ``check(model)``: refuse impossible requests before any work; ``describe()``: what the records show.

The realizer of the plan's kind (``prunekit.realize``) then changes the model; the job (``prunekit.jobs``)
reports, evaluates and saves. The simplest strategies (one mask per linear from statistics of its input) only
set ``statistics`` and implement ``prune_linear``::

    class ActNorm(PruningStrategy):
        name = "actnorm"
        statistics = {"act": ChannelSumSq}

        def prune_linear(self, ref, stats):
            return lowest_per_row(stats["act"].norm().expand(ref.out_features, -1), self.sparsity)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from prunekit.arch import LinearRef, select_linears
from prunekit.errors import PrunekitError
from prunekit.masks import check_nm, parse_pattern
from prunekit.observe import Observed, Observer, linear_inputs
from prunekit.plans import Plan, WeightMask
from prunekit.stats import Statistic


class PruningStrategy(pl.Callback):
    """Base class of every pruning method (see the module docstring).

    Args:
        sparsity: fraction of each selected weight matrix to prune, in [0, 1). Implied by an N:M pattern.
        pattern: ``"unstructured"`` or ``"N:M"`` (N weights kept in every M consecutive inputs, e.g. ``2:4``).
        mode: calibration pipeline: ``"sequential"`` (layer by layer on the pruned model's activations) or
            ``"all-at-once"`` (one pass over the dense model).
        modules: which projections to prune: ``"attn"``, ``"mlp"`` or roles (q, k, v, qkv, o, gate, up, down,
            fc1, fc2). Embeddings and the LM head are never pruned.
        layers: decoder layer indices to prune (default: all).
    """

    name: ClassVar[str] = "base"
    statistics: ClassVar[dict[str, type[Statistic]]] = {}  # per linear input, for the default observers
    per_source: ClassVar[bool] = False  # keep statistics per calibration source (task) as "<stat>@<source>"

    def __init__(
        self,
        sparsity: float | None = None,
        pattern: str = "unstructured",
        mode: Literal["sequential", "all-at-once"] = "sequential",
        modules: list[str] | None = None,
        layers: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.nm = parse_pattern(pattern)
        if self.nm is not None:
            implied = 1 - self.nm[0] / self.nm[1]
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise PrunekitError(
                    f"sparsity={sparsity} contradicts pattern {pattern!r} (which prunes {implied:.3g}); drop one"
                )
            sparsity = implied
        elif sparsity is None:
            sparsity = 0.5
        if not 0 <= sparsity < 1:
            raise PrunekitError(f"sparsity must be in [0, 1), got {sparsity}")
        if mode not in ("sequential", "all-at-once"):
            raise PrunekitError(f"mode must be 'sequential' or 'all-at-once', got {mode!r}")
        self.sparsity, self.pattern, self.mode = float(sparsity), pattern, mode
        self.modules = list(modules) if modules else ["attn", "mlp"]
        self.layers = layers

    # ----------------------------------------------------------------------------- the contract
    @property
    def pipeline(self) -> str:
        """The calibration pipeline that feeds this strategy (``none`` when it observes nothing)."""
        return self.mode if self.statistics else "none"

    def check(self, model: nn.Module) -> None:
        """Refuse what cannot work on ``model`` before any calibration (default: the targets exist, N:M fits)."""
        self.targets(model)

    def observers(self, model: nn.Module, layer: int | None) -> list[Observer]:
        """What to observe (default: ``statistics`` of every target linear's input; linears that read one
        tensor share one observer)."""
        if not self.statistics:
            return []
        refs = [r for r in self.targets(model) if layer is None or r.layer == layer]
        return linear_inputs(refs, self.statistics, self.per_source)

    def decide(self, model: nn.Module, observed: Observed, layer: int | None, context: Any) -> Plan | None:
        """The plan (default: a ``WeightMask`` from ``prune_linear`` of every target linear of ``layer``)."""
        masks, weights = {}, {}
        for ref in self.targets(model):
            if layer is not None and ref.layer != layer:
                continue
            out = self.prune_linear(ref, observed.get(ref.name, {}))
            mask, weight = out if isinstance(out, tuple) else (out, None)
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(ref.weight.shape):
                raise PrunekitError(f"{self.name}.prune_linear must return a bool mask shaped like {ref.name}'s "
                                    f"(out, in) weight {tuple(ref.weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
            masks[ref.name] = mask
            if weight is not None:
                weights[ref.name] = weight
        return WeightMask(masks, weights)

    def layerwise(self, model: nn.Module) -> bool:
        """Whether the whole-model decision (``decide(..., layer=None, ...)``) is the union of per-layer decisions
        (``layer=i`` on layer i's observations), so a streaming run may decide each layer while it is loaded.
        True for the default (one decision per linear); a strategy that overrides ``decide`` says so itself, or
        implements ``summarize(model, observed, layer)`` — a small per-layer summary a streaming run collects in a
        first pass and hands ``decide`` as ``context.summaries``."""
        return type(self).decide is PruningStrategy.decide

    def prune_linear(self, ref: LinearRef, stats: dict[str, Statistic]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The bool mask (True = pruned) of ``ref``'s (out, in) weight — or ``(mask, new_weight)`` for methods
        that reconstruct the kept weights. Must not change the model."""
        raise NotImplementedError(f"{type(self).__name__} implements neither prune_linear nor decide")

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "sparsity": self.sparsity, "pattern": self.pattern, "mode": self.mode,
                "modules": self.modules, "layers": self.layers}

    def label(self) -> str:
        """One line for tables: the method and how it ran."""
        how = [self.pattern if self.nm else f"{self.sparsity:.0%}", self.pipeline]
        return f"{self.name} ({', '.join(how)})"

    # ----------------------------------------------------------------------------- helpers
    def targets(self, model: nn.Module) -> list[LinearRef]:
        refs = select_linears(model, self.modules, self.layers)
        if self.nm is not None:
            for ref in refs:
                check_nm(ref.in_features, self.nm, ref.name)
        return refs
