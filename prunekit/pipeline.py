"""Calibration pipelines: how a strategy's observers see the model, run by Lightning, reduced across processes.

A pipeline runs the calibration data through the model (``trainer.predict`` over the DataModule, so each
example is seen by exactly one process), feeds the strategy's observers, reduces them across processes
(``trainer.strategy``), and asks the strategy for its plan. The strategy never drives the trainer.

- ``none``: no data; the strategy decides from the weights alone.
- ``all-at-once``: one forward pass over the dense model; every layer observed at once.
- ``sequential``: the inputs of decoder layer 0 (and each layer's own arguments) are caught, then layer by
  layer: observe the layer on its current inputs, decide and realize that layer's plan, recompute its outputs
  with the pruned weights — which become the next layer's inputs. Extra memory ≈ one layer's activations and
  statistics (released once the layer is decided, unless kept) for
  the local calibration examples (the Wanda/SparseGPT references' default).
- ``gradient``: forward and backward per batch; the loss is the mean next-token cross-entropy over the tokens
  the batch marks as targets (``loss_mask``, e.g. only the gold continuation of a task prompt; default every
  token but the first). Observers read activations, their gradients and weight gradients.
- ``probe``: the strategy computes per-batch tables itself — ``strategy.probe_batch(model, batch)`` returns
  ``{key: tensor (rows, ...)}`` with one row per example, or one row per batch — for criteria that need more than
  one forward/backward per batch (a double backward, a kernel over the batch's examples). The rows are kept as
  per-example records (a batch's row under its first example's index; per calibration source when the strategy
  keeps ``per_source``), reduced across processes, and read by ``decide`` as ``observed[key]["s"]``.
- ``statistics``: no pass at all — the observers' state is read from a ``statistics.safetensors`` that an
  earlier all-at-once or gradient pass saved (same model and data, checked by fingerprint).

Every pipeline returns a :class:`Calibration`: the plan and the observers (their reduced state is what
``--save_statistics`` writes). Lightning callbacks on the trainer get ``on_calibration_start`` /
``on_calibration_end`` (``trainer, pl_module, strategy``) and ``on_plan`` (``trainer, pl_module, plan``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.observe import Batch, ObserverSet, as_batch
from prunekit.stats import Comm


# ---------------------------------------------------------------------------------------------- passes
class Pass(pl.LightningModule):
    """One Lightning ``predict`` pass over a model (calibration or evaluation); ``description`` labels its bar."""

    def __init__(self, model: nn.Module, description: str, register: bool = True) -> None:
        super().__init__()
        if register:
            self.model = model
        else:  # a streaming model (layers on the meta device): Lightning must not move it; the streamer places it
            object.__setattr__(self, "model", model)
        self.description = description

    def setup(self, stage: str) -> None:
        """Several CPU processes share the cores: give each its share of threads, unless the user chose.

        Without this, N processes each start one OpenMP thread per core and the oversubscribed spin-waits
        slow everything down by an order of magnitude.
        """
        trainer = self.trainer
        if trainer.world_size > 1 and self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            per_node = max(1, trainer.world_size // max(1, trainer.num_nodes))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))


class _StopForward(Exception):
    """Raised by the layer-0 catcher once every layer's inputs are recorded."""


class ObservePass(Pass):
    """Forward (and with ``gradient``, backward) over calibration batches while observers listen."""

    def __init__(self, model: nn.Module, observers: ObserverSet, gradient: bool = False,
                 description: str = "calibration", on_batch=None, register: bool = True) -> None:
        super().__init__(model, description, register)
        self.observers, self.gradient, self.on_batch = observers, gradient, on_batch
        self._seen = 0

    def predict_step(self, batch, batch_idx: int) -> None:
        b = as_batch(batch, self._seen)
        self._seen += b.size
        if self.on_batch is not None:
            self.on_batch(b)
        self.observers.begin(b)
        ids = b.input_ids.to(self.device)
        if not self.gradient:
            try:
                self.model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            self.observers.after_batch()
            return None
        with torch.enable_grad():
            handle = self.model.get_input_embeddings().register_forward_hook(
                lambda module, args, output: output.requires_grad_(True))
            try:
                logits = self.model(input_ids=ids, use_cache=False).logits
            finally:
                handle.remove()
            loss = token_loss(logits, ids, b.targets().to(ids.device))
            loss.backward()
        self.observers.after_batch()
        return None


def token_loss(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (position t is predicted at t − 1)."""
    chosen = targets[:, 1:]
    if not chosen.any():
        raise PrunekitError("a calibration batch has no target tokens for the loss (its loss_mask is empty: a task "
                            "example cut before its answer by --data.seq_len, or an answer of no tokens); raise "
                            "--data.seq_len or drop the example")
    logp = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1), reduction="none").view_as(chosen)
    return logp[chosen].mean()


# ---------------------------------------------------------------------------------------------- plumbing
def comm(trainer: pl.Trainer) -> Comm:
    """Cross-process reduction through the trainer's (Lightning) strategy; local with one process."""
    if trainer.world_size <= 1:
        return Comm.local()
    strategy = trainer.strategy

    def gather_objects(obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(out, obj)
        return out

    return Comm(lambda t: strategy.reduce(t.clone(), reduce_op="sum"), lambda t: strategy.all_gather(t), gather_objects)


@dataclass
class Context:
    """What ``decide`` may use besides the observations."""

    sources: list[str] | None = None
    tokenizer: Any = None
    seed: int = 0
    is_global_zero: bool = True
    world_size: int = 1
    summaries: dict | None = None  # streaming, two-pass strategies: {layer: strategy.summarize(...)} of every layer


@dataclass
class Calibration:
    """A pipeline's result: the plan and — when the caller keeps them (``--save_statistics``, the Python API) —
    the observers whose reduced state produced it."""

    plan: Any
    observers: list[ObserverSet] = field(default_factory=list)
    pipeline: str = "none"

    def observed(self):
        """Every observation, ``{key: {statistic: Statistic}}``."""
        from prunekit.observe import Observed

        out = Observed()
        for group in self.observers:
            out.update(group.results())
        return out

    def state(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for group in self.observers:
            out.update(group.state())
        return out


def decide_layer(trainer: pl.Trainer, strategy, model: nn.Module, observed, layer: int, context: Context):
    """One layer's plan, decided once (rank 0) and broadcast to every process, which all realize it."""
    part = strategy.decide(model, observed, layer, context) if trainer.is_global_zero else None
    if trainer.world_size > 1:
        part = trainer.strategy.broadcast(part, src=0)
    return part


def notify(trainer: pl.Trainer, hook: str, *args) -> None:
    """Call ``hook(trainer, *args)`` on every trainer callback that has it (prunekit's own events)."""
    for cb in trainer.callbacks:
        fn = getattr(cb, hook, None)
        if callable(fn):
            fn(trainer, *args)


def _sources(data) -> list[str] | None:
    fn = getattr(data, "calibration_sources", None)
    sources = fn() if callable(fn) else None
    return list(sources) if sources else None


def context_for(trainer: pl.Trainer, data, tokenizer=None, seed: int = 0) -> Context:
    return Context(_sources(data) if data is not None else None, tokenizer, seed, trainer.is_global_zero,
                   trainer.world_size)


# ---------------------------------------------------------------------------------------------- pipelines
class Pipeline:
    """Base: ``run`` calibrates (or not) and returns the strategy's plan; ``keep``: return the observers too
    (otherwise their statistics are released once the strategy has decided)."""

    name = "none"
    needs_data = False
    gradient = False

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, data, strategy, context: Context,
            keep: bool = False) -> Calibration:
        model = pl_module.model
        plan = strategy.decide(model, ObserverSet().results(), None, context)
        return Calibration(plan, [], self.name)

    def _check(self, observers: ObserverSet, strategy) -> None:
        if observers.needs_grad and not self.gradient:
            raise PrunekitError(f"strategy {strategy.name} observes gradients but runs the {self.name} pipeline: "
                                "its pipeline must be 'gradient'")


class AllAtOnce(Pipeline):
    name = "all-at-once"
    needs_data = True
    gradient = False

    def run(self, trainer, pl_module, data, strategy, context, keep=False):
        model = pl_module.model
        observers = ObserverSet(list(strategy.observers(model, None)))
        self._check(observers, strategy)
        observers.build(model, context.sources)
        observers.attach()
        description = "calibration (forward + backward)" if self.gradient else "calibration"
        try:
            trainer.predict(ObservePass(model, observers, self.gradient, description),
                            dataloaders=data.predict_dataloader(), return_predictions=False)
        finally:
            observers.detach()
        observers.reduce(comm(trainer))
        plan = strategy.decide(model, observers.results(), None, context)
        return Calibration(plan, [observers] if keep else [], self.name)


class Gradient(AllAtOnce):
    name = "gradient"
    gradient = True


class ProbePass(Pass):
    """Calls ``strategy.probe_batch(model, batch)`` per calibration batch and records its rows."""

    def __init__(self, model: nn.Module, strategy, store: "_ProbeStore") -> None:
        super().__init__(model, f"calibration ({strategy.name} probes)")
        self.strategy, self.store = strategy, store
        self._seen = 0

    def predict_step(self, batch, batch_idx: int) -> None:
        b = as_batch(batch, self._seen)
        self._seen += b.size
        b = Batch(b.input_ids.to(self.device), b.index, b.source,
                  None if b.loss_mask is None else b.loss_mask.to(self.device))
        with torch.enable_grad():
            tables = self.strategy.probe_batch(self.model, b)
        self.store.add(tables, b)
        return None


class _ProbeStore:
    """Per-key records of a probe pipeline (``Records``; per source too when ``sources`` is given)."""

    def __init__(self, sources: list[str] | None) -> None:
        self.sources = sources
        self.records: dict[str, dict] = {}

    def add(self, tables: dict[str, torch.Tensor], batch: Batch) -> None:
        from prunekit.stats import Records

        for key, rows in tables.items():
            rows = rows.detach()
            index = batch.index if rows.shape[0] == batch.size else batch.index[:1]
            if rows.shape[0] != index.numel():
                raise PrunekitError(f"probe {key!r} returned {rows.shape[0]} rows for a batch of {batch.size} "
                                    "examples: return one row per example or one per batch")
            slot = Batch(batch.input_ids[: rows.shape[0]], index, batch.source)
            stats = self.records.setdefault(key, {})
            names = ["s"] + ([f"s@{self.sources[batch.source]}"] if self.sources and batch.source is not None else [])
            for name in names:
                stats.setdefault(name, Records(0)).update(rows, batch=slot)

    def reduce(self, comm: Comm) -> None:
        """Every process builds the same records (a source's examples may all be on one process), then each is
        gathered in one order everywhere."""
        from prunekit.stats import Records

        names = sorted({(k, n) for part in comm.gather_objects(sorted((k, n) for k, v in self.records.items()
                                                                        for n in v)) for k, n in part})
        for key, name in names:
            self.records.setdefault(key, {}).setdefault(name, Records(0)).reduce(comm)

    def results(self):
        from prunekit.observe import Observed

        return Observed(self.records)


class ProbePipeline(Pipeline):
    name = "probe"
    needs_data = True
    gradient = True

    def run(self, trainer, pl_module, data, strategy, context, keep=False):
        model = pl_module.model
        store = _ProbeStore(context.sources if getattr(strategy, "per_source", False) else None)
        trainer.predict(ProbePass(model, strategy, store), dataloaders=data.predict_dataloader(),
                        return_predictions=False)
        store.reduce(comm(trainer))
        plan = strategy.decide(model, store.results(), None, context)
        return Calibration(plan, [], self.name)


class Sequential(Pipeline):
    name = "sequential"
    needs_data = True

    @torch.no_grad()
    def run(self, trainer, pl_module, data, strategy, context, keep=False):
        from prunekit.arch import adapter_for
        from prunekit.progress import bar
        from prunekit.realize import realizer_for

        model = pl_module.model
        layers = adapter_for(model).layers(model)
        catcher = _LayerInputCatcher(layers)
        try:
            trainer.predict(ObservePass(model, ObserverSet(), False, "calibration: layer-0 inputs",
                                        on_batch=catcher.batches.append),
                            dataloaders=data.predict_dataloader(), return_predictions=False)
        finally:
            catcher.remove()
        hidden = catcher.hidden
        plan, groups, reduce = None, [], comm(trainer)
        for i in bar(range(len(layers)), "calibration: layers", trainer.is_global_zero):
            layer, calls = layers[i], catcher.calls[i]
            observers = ObserverSet(list(strategy.observers(model, i)))
            if len(observers):
                self._check(observers, strategy)
                observers.build(model, context.sources)
                observers.attach()
                try:
                    for b, h, (args, kwargs) in zip(catcher.batches, hidden, calls):
                        observers.begin(b)
                        _call_layer(layer, h, args, kwargs)
                        observers.after_batch()
                finally:
                    observers.detach()
                observers.reduce(reduce)
                if keep:
                    groups.append(observers)
                part = decide_layer(trainer, strategy, model, observers.results(), i, context)
                del observers  # this layer's statistics are done with (unless kept)
                if part is not None:
                    realizer = realizer_for(part)
                    realizer.apply(model, part)  # the next layer is calibrated on the pruned one
                    part = realizer.compact(model, part)
                    plan = part if plan is None else plan.merge(part)
            hidden = [_call_layer(layer, h, args, kwargs) for h, (args, kwargs) in zip(hidden, calls)]
            catcher.calls[i] = []
        if plan is None:
            raise PrunekitError(f"strategy {strategy.name} observed no layer on the sequential pipeline, so it "
                                "decided nothing: check its modules/layers options")
        return Calibration(plan, groups, self.name)


class FromStatistics(Pipeline):
    """Observers filled from a saved ``statistics.safetensors`` instead of a pass (see ``prunekit.statistics``)."""

    name = "statistics"

    def __init__(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self.tensors, self.where = tensors, where

    def run(self, trainer, pl_module, data, strategy, context, keep=False):
        model = pl_module.model
        observers = ObserverSet(list(strategy.observers(model, None)))
        observers.build(model, context.sources)
        observers.load_state(self.tensors, self.where)
        plan = strategy.decide(model, observers.results(), None, context)
        return Calibration(plan, [observers] if keep else [], self.name)


PIPELINES: dict[str, type[Pipeline]] = {"none": Pipeline, "all-at-once": AllAtOnce, "sequential": Sequential,
                                        "gradient": Gradient, "probe": ProbePipeline}


def calibrate(trainer: pl.Trainer, pl_module: pl.LightningModule, data, strategy, context: Context | None = None,
              pipeline: Pipeline | None = None, keep: bool = False) -> Calibration:
    """Run the strategy's pipeline (or ``pipeline``) and return its plan — and, with ``keep``, its observers.

    With the ``sequential`` pipeline the model embodies the plan on return (each layer was realized before
    the next was calibrated); otherwise the model is untouched until the plan is realized.
    """
    strategy.check(pl_module.model)
    if strategy.pipeline not in PIPELINES:
        raise PrunekitError(f"strategy {strategy.name} asks for pipeline {strategy.pipeline!r}; pipelines: "
                            f"{', '.join(PIPELINES)}")
    if strategy.pipeline == "none" and pipeline is None and strategy.observers(pl_module.model, None):
        raise PrunekitError(f"strategy {strategy.name} declares observers but its pipeline is 'none': set its "
                            "pipeline (all-at-once, sequential or gradient)")
    pipeline = pipeline or PIPELINES[strategy.pipeline]()
    if pipeline.needs_data and data is None:
        raise PrunekitError(f"strategy {strategy.name} needs calibration data ({pipeline.name} pipeline)")
    if pipeline.gradient and getattr(trainer.predict_loop, "inference_mode", False):
        raise PrunekitError("the gradient pipeline needs a Trainer(inference_mode=False): Lightning's default "
                            "inference mode turns gradients off")
    context = context or context_for(trainer, data)
    notify(trainer, "on_calibration_start", pl_module, strategy)
    result = pipeline.run(trainer, pl_module, data, strategy, context, keep)
    if result.plan is None:
        raise PrunekitError(f"strategy {strategy.name} decided no plan")
    notify(trainer, "on_calibration_end", pl_module, strategy)
    notify(trainer, "on_plan", pl_module, result.plan)
    return result


# ---------------------------------------------------------------------------------------------- sequential
class _LayerInputCatcher:
    """Records, per calibration batch, the hidden states entering layer 0 and each layer's own arguments.

    Models compute per-layer keyword arguments (Gemma 3 gives sliding and full attention layers their own
    mask and rotary embeddings), so each layer's arguments are recorded as the model passes them. Layer 0 runs
    for real; later layers are replaced by pass-throughs while catching (their inputs are recomputed layer by
    layer later), and the last one stops the forward, so the catch pass costs about one layer of compute.
    """

    def __init__(self, layers: nn.ModuleList, store=None) -> None:
        self.layers = layers
        self.hidden = [] if store is None else store  # a list, or anything with append (streaming.Activations)
        self.batches: list[Batch] = []
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
                raise _StopForward
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
