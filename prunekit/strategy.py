"""The pruning strategy API: a method is a Lightning callback that declares statistics and prunes linears.

Flow of one pruning run (``PruningStrategy.run``):

1. ``trainer.predict`` over the calibration windows (Lightning's unrepeated distributed sampler, so each
   window is seen by exactly one process). Forward hooks fill float64 statistics (``prunekit.stats``).
2. On predict end the statistics are reduced across processes through ``trainer.strategy``; the method
   scores each weight and selects the pruned ones (pure functions in the strategy modules); zeros are applied.

``mode="all-at-once"`` calibrates every layer in one pass over the dense model. ``mode="sequential"`` (the
Wanda/SparseGPT references' default) catches the inputs of decoder layer 0 (and every layer's own
arguments, such as attention masks and rotary embeddings), then for each layer in turn:
collects statistics on the current inputs, prunes the layer, and recomputes its outputs with the pruned
weights, which become the next layer's inputs. Peak extra memory is one layer's activations for the local
calibration windows.

A subclass sets ``statistics`` (what it needs per linear input) and implements ``prune_linear``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.arch import LinearRef, adapter_for, select_linears
from prunekit.errors import PrunekitError
from prunekit.masks import check_nm, parse_pattern
from prunekit.stats import Statistic, check_finite


class StopForward(Exception):
    """Raised by the layer-0 catcher once the inputs of the first decoder layer are recorded."""


class _Collector:
    """Forward hooks that feed each selected linear's input into its statistics.

    Linears that read the same tensor (q/k/v, gate/up) share one set of statistics, computed once. With
    ``sources`` (names of the calibration sources, e.g. tasks), every statistic is kept per source as
    ``"<stat>@<source>"``; the hooks feed the source named by ``current`` (set per batch), and after the
    cross-process reduction ``merge_sources`` adds ``"<stat>"``, the statistic over all sources.
    """

    def __init__(self, refs: Iterable[LinearRef], kinds: dict[str, type[Statistic]],
                 sources: list[str] | None = None) -> None:
        self.stats: dict[str, dict[str, Statistic]] = {}  # linear name -> {stat name: Statistic}
        self.kinds, self.sources, self.current = kinds, list(sources) if sources else None, 0
        self._handles = []
        self._groups: list[tuple[int, dict[str, Statistic]]] = []  # (features, shared statistics)
        shared: dict[tuple[int, str], dict[str, Statistic]] = {}
        for ref in refs:
            key = (ref.layer, _input_key(ref.role))
            if key not in shared:
                names = _statistic_names(kinds, self.sources)
                shared[key] = {n: kinds[n.split("@")[0]](ref.in_features) for n in names}
                self._groups.append((ref.in_features, shared[key]))
                self._handles.append(ref.module.register_forward_hook(self._hook(ref.name, shared[key])))
            self.stats[ref.name] = shared[key]

    def _hook(self, name: str, stats: dict[str, Statistic]):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            check_finite(x, name)
            if self.sources:
                source = self.sources[self.current]
                for kind in self.kinds:
                    stats[f"{kind}@{source}"].update(x)
            else:
                for stat in stats.values():
                    stat.update(x)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def unique(self) -> list[Statistic]:
        return [stat for _, group in self._groups for stat in group.values()]

    def merge_sources(self) -> None:
        """Add, per statistic kind, its total over all sources (in source order, the same on every process)."""
        if not self.sources:
            return
        for features, group in self._groups:
            for kind, cls in self.kinds.items():
                total = cls(features)
                for source in self.sources:
                    total.absorb(group[f"{kind}@{source}"])
                group[kind] = total


def _statistic_names(kinds: Iterable[str], sources: list[str] | None) -> list[str]:
    """The statistics kept per linear input: ``"<kind>@<source>"`` per source, or one ``"<kind>"`` each."""
    return [f"{k}@{src}" for src in sources for k in kinds] if sources else list(kinds)


def reduce_statistics(trainer: pl.Trainer, stats: Iterable[Statistic]) -> None:
    """Combine every process' statistics in place through the trainer's strategy (rank order)."""
    strategy = trainer.strategy

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return strategy.reduce(t.clone(), reduce_op="sum") if trainer.world_size > 1 else t

    def gather(t: torch.Tensor) -> torch.Tensor:
        return strategy.all_gather(t) if trainer.world_size > 1 else t.unsqueeze(0)

    for stat in stats:
        stat.reduce(reduce_sum, gather)


def _input_key(role: str) -> str:
    return {"q": "attn_in", "k": "attn_in", "v": "attn_in", "gate": "mlp_in", "up": "mlp_in"}.get(role, role)


class PruningStrategy(pl.Callback):
    """Base class of every pruning method.

    Args:
        sparsity: fraction of each selected weight matrix to prune, in [0, 1). Implied by an N:M pattern.
        pattern: ``"unstructured"`` or ``"N:M"`` (N weights kept in every M consecutive inputs, e.g. ``2:4``).
        mode: ``"sequential"`` (layer by layer on the pruned model's activations) or ``"all-at-once"``.
        modules: which projections to prune: ``"attn"``, ``"mlp"`` or roles (q, k, v, qkv, o, gate, up, down,
            fc1, fc2). Embeddings and the LM head are never pruned.
        layers: decoder layer indices to prune (default: all).
        keep_statistics: keep the reduced statistics in ``self.statistics_`` (to save or inspect them).
    """

    name: ClassVar[str] = "base"
    statistics: ClassVar[dict[str, type[Statistic]]] = {}
    per_source: ClassVar[bool] = False  # keep statistics per calibration source (task) as "<stat>@<source>"

    def __init__(
        self,
        sparsity: float | None = None,
        pattern: str = "unstructured",
        mode: Literal["sequential", "all-at-once"] = "sequential",
        modules: list[str] | None = None,
        layers: list[int] | None = None,
        keep_statistics: bool = False,
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
        self.keep_statistics = keep_statistics
        self.statistics_: dict[str, dict[str, torch.Tensor]] = {}
        self.pruned = False
        self.timings: dict[str, float] = {}
        self._collector: _Collector | None = None
        self._catcher: _LayerInputCatcher | None = None
        self.sources_: list[str] | None = None

    # ----------------------------------------------------------------------------- method interface
    @property
    def needs_calibration(self) -> bool:  # ``statistics`` may be a class or an instance attribute
        return bool(self.statistics)

    def prune_linear(self, ref: LinearRef, stats: dict[str, Statistic]) -> torch.Tensor:
        """Return the bool mask (True = pruned) of ``ref``'s (out, in) weight; may also update the weight."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "sparsity": self.sparsity, "pattern": self.pattern, "mode": self.mode,
                "modules": self.modules, "layers": self.layers}

    # ----------------------------------------------------------------------------- driver
    def targets(self, model: nn.Module) -> list[LinearRef]:
        refs = select_linears(model, self.modules, self.layers)
        if self.nm is not None:
            for ref in refs:
                check_nm(ref.in_features, self.nm, ref.name)
        return refs

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule=None,
            statistics: str | Path | dict[str, dict[str, Statistic]] | None = None) -> None:
        """Calibrate (if the method needs data) and prune ``pl_module.model`` in place.

        ``statistics``: a ``statistics.safetensors`` saved by an earlier run (``--save_statistics true``) on the
        same model and calibration data, or what ``load_statistics`` read from one; its statistics replace the
        calibration pass (all-at-once mode only), so one pass can serve several ratios, allocations or methods
        that read the same statistics.
        """
        if self.pruned:
            raise PrunekitError(f"strategy {self.name} has already pruned this model")
        self.targets(pl_module.model)  # validate before any work
        start = time.perf_counter()
        if statistics is not None:
            if not isinstance(statistics, dict):
                statistics = self.load_statistics(pl_module.model, statistics)
            self.prune_refs(pl_module, self.targets(pl_module.model), statistics)
            self._finish(trainer, pl_module)
        elif self.needs_calibration:
            if datamodule is None:
                raise PrunekitError(f"strategy {self.name} needs calibration data")
            if self.per_source:
                self.sources_ = datamodule.calibration_sources()
                if not self.sources_:
                    raise PrunekitError(f"strategy {self.name} keeps statistics per source (task): calibrate with "
                                        "--data.packing documents (e.g. --data.corpus task --data.corpus_options "
                                        "'{tasks: [seap7], general: wiki}')")
            pl_module.phase = "calibrate"
            trainer.predict(pl_module, dataloaders=datamodule.predict_dataloader(), return_predictions=False)
        else:
            self.prune_refs(pl_module, self.targets(pl_module.model), {})
            self._finish(trainer, pl_module)
        self.timings["prune_s"] = time.perf_counter() - start
        if not self.pruned:
            raise PrunekitError("calibration ended without pruning (was the strategy attached to the trainer?)")

    def load_statistics(self, model: nn.Module, path: str | Path) -> dict[str, dict[str, Statistic]]:
        """This strategy's statistics for ``model``'s targets, read from a saved ``statistics.safetensors``."""
        from safetensors import safe_open

        path = Path(path)
        if not self.needs_calibration:
            raise PrunekitError(f"strategy {self.name} uses no calibration statistics; drop --statistics")
        if self.mode != "all-at-once":
            raise PrunekitError("saved statistics come from the dense model, but sequential mode needs the inputs of "
                                "already-pruned layers: use --strategy.mode all-at-once, or calibrate")
        if not path.is_file():
            raise PrunekitError(f"statistics file {path} does not exist; save one with --save_statistics true "
                                "(it is written as statistics.safetensors in the output folder)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        sources = json.loads(meta.get("sources", "null"))
        if self.per_source and not sources:
            raise PrunekitError(f"strategy {self.name} keeps statistics per source, but {path} has none: save them "
                                "from a run with --data.packing documents and a corpus with sources")
        self.sources_ = sources if self.per_source else None
        names = _statistic_names(self.statistics, sources if self.per_source else None)
        if self.per_source:
            names += list(self.statistics)  # the totals over all sources (``_Collector.merge_sources``)
        stats: dict[str, dict[str, Statistic]] = {}
        for ref in self.targets(model):
            group = {}
            for name in names:
                stat = self.statistics[name.split("@")[0]](ref.in_features)
                for field, t in stat.tensors().items():
                    key = f"{ref.name}.{name}.{field}"
                    if key not in tensors:
                        raise PrunekitError(f"{path} has no {key}: it was saved by a strategy with other "
                                            f"statistics ({meta.get('strategy', '?')}) or for another model; "
                                            f"{self.name} needs {', '.join(self.statistics)}")
                    if tensors[key].shape != t.shape:
                        raise PrunekitError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, but "
                                            f"{ref.name} needs {tuple(t.shape)}: statistics of another model")
                    t.copy_(tensors[key])
                group[name] = stat
            stats[ref.name] = group
            if self.keep_statistics:
                self.statistics_[ref.name] = {f"{k}.{f}": v.clone() for k, s in group.items()
                                              for f, v in s.tensors().items()}
        return stats

    # ----------------------------------------------------------------------------- Lightning hooks
    def _active(self, pl_module) -> bool:
        return getattr(pl_module, "phase", None) == "calibrate" and not self.pruned and self.needs_calibration

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(pl_module):
            return
        model = pl_module.model
        if self.mode == "all-at-once":
            self._collector = _Collector(self.targets(model), self.statistics, self._sources())
        else:
            self._catcher = _LayerInputCatcher(adapter_for(model).layers(model))

    def _sources(self) -> list[str] | None:
        if not self.per_source:
            return None
        if not self.sources_:
            raise PrunekitError(f"strategy {self.name} keeps statistics per source: run it through "
                                "PruningStrategy.run with a DataModule that has sources")
        return self.sources_

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Per-source strategies: note which source (task) this batch comes from."""
        if not self._active(pl_module) or not self.per_source:
            return
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise PrunekitError(f"strategy {self.name} needs batches that carry their source (data.packing=documents)")
        label = int(batch[1].reshape(-1)[0])
        if self._collector is not None:
            self._collector.current = label
        if self._catcher is not None:
            self._catcher.labels.append(label)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(pl_module):
            return
        if self.mode == "all-at-once":
            collector, self._collector = self._collector, None
            collector.remove()
            self._reduce(trainer, collector)
            self.prune_refs(pl_module, self.targets(pl_module.model), collector.stats)
        else:
            catcher, self._catcher = self._catcher, None
            catcher.remove()
            self._sequential(trainer, pl_module, catcher)
        self._finish(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Leave the model as it was: remove hooks and restore layer forwards."""
        if self._collector is not None:
            self._collector.remove()
            self._collector = None
        if self._catcher is not None:
            self._catcher.remove()
            self._catcher = None

    # ----------------------------------------------------------------------------- internals
    def _reduce(self, trainer: pl.Trainer, collector: _Collector) -> None:
        reduce_statistics(trainer, collector.unique())
        collector.merge_sources()
        if self.keep_statistics:
            for name, group in collector.stats.items():
                self.statistics_[name] = {f"{k}.{t}": v.clone() for k, s in group.items() for t, v in s.tensors().items()}

    def prune_refs(self, pl_module: pl.LightningModule, refs: list[LinearRef],
                   stats: dict[str, dict[str, Statistic]]) -> None:
        """Prune ``refs`` (one layer in sequential mode, all in all-at-once) given their reduced statistics.

        The default zeroes each linear's ``prune_linear`` mask; structured strategies override it to cut.
        """
        for ref in refs:
            mask = self.prune_linear(ref, stats.get(ref.name, {}))
            ref.weight[mask.to(ref.weight.device)] = 0

    @torch.no_grad()
    def _sequential(self, trainer: pl.Trainer, pl_module: pl.LightningModule, catcher: "_LayerInputCatcher") -> None:
        model = pl_module.model
        layers = adapter_for(model).layers(model)
        by_layer: dict[int, list[LinearRef]] = {}
        for ref in self.targets(model):
            by_layer.setdefault(ref.layer, []).append(ref)
        hidden = catcher.hidden  # per local batch: the current layer's input hidden states
        bar = tqdm(range(len(layers)), desc=f"{self.name}: layers", disable=not trainer.is_global_zero, leave=False)
        for i in bar:
            layer, calls = layers[i], catcher.calls[i]  # calls: this layer's own (args, kwargs) per batch
            refs = by_layer.get(i, [])
            if refs:
                collector = _Collector(refs, self.statistics, self._sources())
                try:
                    for j, (h, (args, kwargs)) in enumerate(zip(hidden, calls)):
                        if collector.sources:
                            collector.current = catcher.labels[j]
                        _call_layer(layer, h, args, kwargs)
                finally:
                    collector.remove()
                self._reduce(trainer, collector)
                self.prune_refs(pl_module, refs, collector.stats)
            # outputs of the (pruned) layer feed the next one
            hidden = [_call_layer(layer, h, args, kwargs) for h, (args, kwargs) in zip(hidden, calls)]
            catcher.calls[i] = []

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pruned = True
        pl_module.pruned_by = self.describe()
        for cb in trainer.callbacks:
            hook = getattr(cb, "on_pruning_end", None)
            if callable(hook):
                hook(trainer, pl_module, self)


class _LayerInputCatcher:
    """Records, per calibration batch, the hidden states entering layer 0 and each layer's own arguments.

    Models compute per-layer keyword arguments (Gemma 3 gives sliding and full attention layers their own
    mask and rotary embeddings), so each layer's arguments are recorded as the model passes them. Layer 0 runs
    for real; later layers are replaced by pass-throughs while catching (their inputs are recomputed layer by
    layer later), and the last one stops the forward, so the catch pass costs about one layer of compute.
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.hidden: list[torch.Tensor] = []
        self.labels: list[int] = []  # per batch, its source (per-source strategies)
        self.calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
        self._returns_tuple = False
        self._handles = [layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)
                         for i, layer in enumerate(layers)]
        self._handles.append(layers[0].register_forward_hook(self._note_output_type))
        for layer in list(layers)[1:]:
            layer.forward = self._pass_through  # instance attribute shadows the class's forward

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                self.hidden.append(h.detach())
            rest = (None, *args[1:]) if args else ()
            self.calls[index].append((_detached(rest), _detached({k: v for k, v in kwargs.items() if k != "hidden_states"})))
            if index == len(self.layers) - 1:
                raise StopForward
        return hook

    def _note_output_type(self, module, args, output) -> None:
        self._returns_tuple = isinstance(output, tuple)

    def _pass_through(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if self._returns_tuple else h

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in list(self.layers)[1:]:
            layer.__dict__.pop("forward", None)


def _call_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Run a decoder layer on ``hidden`` with its recorded arguments; return the output hidden states."""
    out = layer(hidden, *args[1:], **kwargs) if args else layer(hidden_states=hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _detached(obj: Any) -> Any:
    """Detach tensors (and tensors inside tuples/dicts) so cached layer inputs hold no graph."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detached(o) for o in obj)
    if isinstance(obj, list):
        return [_detached(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj
