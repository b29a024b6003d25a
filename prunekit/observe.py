"""Observers: what a strategy watches during calibration, accumulated in float64 and reduced across processes.

An :class:`Observer` reads one tensor per calibration batch at one module — its ``input`` (first positional
argument), its ``output``, or its ``weight`` — optionally together with the gradient of the loss with respect
to that tensor (``grad=True``, the gradient pipeline only), passes it through an optional ``transform`` and
feeds the result to its statistics (``prunekit.stats``: running sums, Welford moments, Hessians, per-example
records). Observers never change what the model computes.

Named sites (``site(model, layer, name)``) spare strategies the module paths of each family:

- ``attn_in``: the normalised input of q/k/v (one tensor, read once for the three projections);
- ``attn_context``: the input of the attention output projection — the heads' concatenated contexts, which
  ``per_head`` splits into (…, heads, head_dim);
- ``mlp_in``: the input of gate/up (fc1);
- ``mlp_mid``: the input of down_proj (fc2) — the MLP's intermediate activations z;
- ``mlp_pre``: the output of gate_proj (GLU families) or fc1 — the pre-activation u.

Sources and examples: every calibration batch carries the index of its source (a task of the ``task``
corpus) and global example indices. A ``per_source`` observer keeps each statistic per source as
``"<name>@<source>"`` and, after the reduction, their total as ``"<name>"``; a ``Records`` statistic keeps one
value per example, ordered by example index, so one process and several give the same records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.stats import Comm, Records, Statistic, check_finite

Where = Literal["input", "output", "weight"]
Transform = Callable[[torch.Tensor, "torch.Tensor | None", "Batch"], torch.Tensor]


@dataclass
class Batch:
    """What observers know of the current calibration batch.

    ``index``: global example indices (B,); ``source``: index of the batch's calibration source, or None;
    ``loss_mask``: (B, T) True where a token is a target of the loss (gradient pipeline; default every token
    but the first).
    """

    input_ids: torch.Tensor
    index: torch.Tensor
    source: int | None = None
    loss_mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def targets(self) -> torch.Tensor:
        """(B, T) bool: tokens whose prediction enters the loss."""
        if self.loss_mask is not None:
            return self.loss_mask.bool()
        mask = torch.ones_like(self.input_ids, dtype=torch.bool)
        mask[:, 0] = False
        return mask


def as_batch(raw: Any, first_index: int = 0) -> Batch:
    """A DataLoader batch as a :class:`Batch`: a dict (``input_ids``, ``index``, ``source``, ``loss_mask``), a
    tuple ``(ids,)`` / ``(ids, source)`` / ``(ids, source, index)``, or a bare tensor. Missing example indices
    count from ``first_index`` (correct on one process only; the DataModule always sends them)."""
    if isinstance(raw, dict):
        ids = raw["input_ids"]
        index, source, loss_mask = raw.get("index"), raw.get("source"), raw.get("loss_mask")
    elif isinstance(raw, (list, tuple)):
        ids = raw[0]
        source = raw[1] if len(raw) > 1 else None
        index = raw[2] if len(raw) > 2 else None
        loss_mask = raw[3] if len(raw) > 3 else None
    else:
        ids, index, source, loss_mask = raw, None, None, None
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if index is None:
        index = torch.arange(first_index, first_index + ids.shape[0])
    if source is not None:
        source = torch.as_tensor(source).reshape(-1)
        if source.numel() and (source != source[0]).any():
            raise PrunekitError("a calibration batch mixes sources: per-source statistics need batches of one "
                                "source (data.packing=documents feeds one example per batch)")
        source = int(source[0]) if source.numel() else None
    return Batch(ids, torch.as_tensor(index).reshape(-1).long(), source, loss_mask)


class Observer:
    """Reads one tensor at one module and feeds it to float64 statistics (see the module docstring).

    Args:
        module: full module name inside the model (``model.layers.3.mlp.down_proj``).
        statistics: ``{name: Statistic class or factory(features)}``.
        where: ``input`` (first positional argument or ``hidden_states``), ``output`` (first element of a tuple
            output) or ``weight`` (the module's weight as (out, in), read after each batch — after the backward
            pass on the gradient pipeline; on the sequential pipeline, after each batch through its layer).
        grad: also read ∂L/∂(that tensor); the statistics then see ``transform(x, g, batch)``, or ``g`` itself
            without a transform. Needs the gradient pipeline.
        transform: ``(x, g, batch) -> tensor`` fed to the statistics; per-example records expect a leading
            batch dimension.
        features: width of what the statistics see (default: the module's input/output width, or the last
            dimension of the weight); needed up front so every process builds the same statistics.
        per_source: keep every statistic per calibration source (plus the total).
        key / keys: the name (or names) under which the strategy finds these statistics (default: the module
            name); linears that read one tensor (q/k/v) share one observer under all their names.
        check: refuse non-finite values (NaN/inf) with a clear error.
    """

    def __init__(self, module: str, statistics: dict[str, Callable[[int], Statistic]], where: Where = "input",
                 grad: bool = False, transform: Transform | None = None, features: int | None = None,
                 per_source: bool = False, keys: list[str] | None = None, check: bool = True,
                 key: str | None = None) -> None:
        if where not in ("input", "output", "weight"):
            raise PrunekitError(f"observer where must be input, output or weight, got {where!r}")
        if not statistics:
            raise PrunekitError(f"observer of {module} has no statistics")
        self.module_name, self.where, self.grad, self.transform = module, where, grad, transform
        self.factories, self.features, self.per_source = dict(statistics), features, per_source
        self.keys = list(keys) if keys else [key] if key else [module]
        self.check = check
        self.stats: dict[str, Statistic] = {}
        self.sources: list[str] | None = None
        self._current: int | None = None
        self._batch: Batch | None = None
        self._handles: list[Any] = []
        self._module: nn.Module | None = None
        self._transposed = False

    @property
    def key(self) -> str:
        return self.keys[0]

    # ------------------------------------------------------------------------------------------ set-up
    def build(self, model: nn.Module, sources: list[str] | None) -> None:
        """Create the statistics (before any data, identically on every process)."""
        module = model.get_submodule(self.module_name)
        self._module = module
        self._transposed = _is_transposed(module)
        features = self.features if self.features is not None else _width(module, self.where, self._transposed)
        if self.per_source:
            if not sources:
                raise PrunekitError(f"an observer keeps statistics per source ({self.module_name}), but the "
                                    "calibration data has none: use --data.packing documents with a corpus of "
                                    "several sources (e.g. --data.corpus task)")
            self.sources = list(sources)
            names = [f"{n}@{s}" for s in self.sources for n in self.factories]
        else:
            names = list(self.factories)
        self.stats = {n: self.factories[n.split("@")[0]](features) for n in names}

    def attach(self) -> None:
        """Register the forward hook (``input``/``output``); weights are read by :meth:`after_backward`."""
        if self._module is None:
            raise RuntimeError("Observer.build must run before attach")
        if self.where == "weight":
            if self.grad:
                self._module.weight.requires_grad_(True)
            return
        self._handles.append(self._module.register_forward_hook(self._hook, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.where == "weight" and self._module is not None and self.grad:
            self._module.weight.requires_grad_(False)
            self._module.weight.grad = None

    def begin(self, batch: Batch) -> None:
        self._batch = batch
        if self.per_source:
            if batch.source is None:
                raise PrunekitError(f"an observer keeps statistics per source ({self.module_name}), but the batches "
                                    "carry no source: use --data.packing documents")
            self._current = batch.source

    # ------------------------------------------------------------------------------------------ feeding
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.where == "input":
            x = args[0] if args else kwargs.get("hidden_states")
        else:
            x = output[0] if isinstance(output, tuple) else output
        if x is None:
            raise PrunekitError(f"cannot read the {self.where} of {self.module_name}")
        if self.check:
            check_finite(x, self.module_name, self.where)
        if not self.grad:
            self.feed(x.detach(), None)
        elif x.requires_grad:
            saved = x.detach()
            x.register_hook(lambda g: self.feed(saved, g.detach()))
        else:
            raise PrunekitError(f"observer of {self.module_name} needs gradients, but its {self.where} has none: "
                                "run it on the gradient pipeline")

    def after_batch(self) -> None:
        """Weight observers: read the weight (as (out, in)) — and its gradient, once the backward pass is done —
        after every batch (the ``ObserverSet`` clears the gradients once every observer has read them)."""
        if self.where != "weight":
            return
        w = self._module.weight
        value = w.detach().t() if self._transposed else w.detach()
        grad = None
        if self.grad:
            if w.grad is None:
                raise PrunekitError(f"{self.module_name}.weight received no gradient: it does not reach the loss")
            grad = w.grad.detach().t() if self._transposed else w.grad.detach()
        self.feed(value, grad)

    def feed(self, x: torch.Tensor, g: torch.Tensor | None) -> None:
        value = self.transform(x, g, self._batch) if self.transform is not None else (g if self.grad else x)
        if self.per_source:
            source = self.sources[self._current]
            targets = [s for n, s in self.stats.items() if n.endswith(f"@{source}")]
        else:
            targets = self.stats.values()
        for stat in targets:
            stat.update(value, batch=self._batch)

    # ------------------------------------------------------------------------------------------ after the pass
    def reduce(self, comm: Comm) -> None:
        """Combine every process' statistics in place; then add per-source totals."""
        for stat in self.stats.values():
            stat.reduce(comm)
        self.add_totals()

    def add_totals(self) -> None:
        """Per-source observers: each statistic over all sources (in source order, the same on every process)."""
        if not self.per_source:
            return
        for name, factory in self.factories.items():
            first = self.stats[f"{name}@{self.sources[0]}"]
            total = factory(first.features)
            for source in self.sources:
                total.absorb(self.stats[f"{name}@{source}"])
            self.stats[name] = total

    def state(self) -> dict[str, torch.Tensor]:
        """Every statistic's tensors, as ``"<stat>.<field>"``."""
        return {f"{n}.{k}": v for n, s in self.stats.items() for k, v in s.tensors().items()}


def _is_transposed(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Conv1D") and hasattr(module, "nf")


def _width(module: nn.Module, where: Where, transposed: bool) -> int:
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        raise PrunekitError(f"give the observer of a {type(module).__name__} its features= (no 2-D weight)")
    out_f, in_f = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
    return in_f if where == "input" else out_f if where == "output" else in_f


@dataclass
class ObserverSet:
    """The observers of one calibration pass: built, attached, fed batch by batch, reduced, detached."""

    observers: list[Observer] = field(default_factory=list)

    def __iter__(self):
        return iter(self.observers)

    def __len__(self) -> int:
        return len(self.observers)

    @property
    def needs_grad(self) -> bool:
        return any(o.grad for o in self.observers)

    def build(self, model: nn.Module, sources: list[str] | None) -> None:
        for o in self.observers:
            o.build(model, sources)

    def attach(self) -> None:
        try:
            for o in self.observers:
                o.attach()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for o in self.observers:
            o.detach()

    def begin(self, batch: Batch) -> None:
        for o in self.observers:
            o.begin(batch)

    def after_batch(self) -> None:
        for o in self.observers:
            o.after_batch()
        for o in self.observers:  # gradients are read by every observer of a weight before they go
            if o.where == "weight" and o.grad:
                o._module.weight.grad = None

    def reduce(self, comm: Comm) -> None:
        for o in self.observers:
            o.reduce(comm)

    def results(self) -> "Observed":
        out = Observed()
        for o in self.observers:
            for key in o.keys:
                group = out.setdefault(key, {})
                for name, stat in o.stats.items():
                    if name in group and group[name] is not stat:
                        raise PrunekitError(f"two observers put a statistic {name!r} under the key {key!r}: give "
                                            "them different keys or statistic names")
                    group[name] = stat
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """Everything observed, as ``"<observer key>.<stat>.<field>"`` (what ``--save_statistics`` writes)."""
        return {f"{o.key}.{k}": v for o in self.observers for k, v in o.state().items()}

    def load_state(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Fill the (built) statistics from a saved state; refuse missing or mis-shaped entries."""
        for o in self.observers:
            for name, stat in o.stats.items():
                if isinstance(stat, Records):
                    index, values = (tensors.get(f"{o.key}.{name}.{f}") for f in ("index", "values"))
                    if index is None or values is None:
                        raise PrunekitError(f"{where} has no per-example records {o.key}.{name}: saved by a strategy "
                                            "with other observers")
                    stat.load(index, values)
                    continue
                for fld, t in stat.tensors().items():
                    key = f"{o.key}.{name}.{fld}"
                    if key not in tensors:
                        raise PrunekitError(f"{where} has no {key}: it was saved by a strategy with other "
                                            "statistics, or for another model")
                    if tensors[key].shape != t.shape:
                        raise PrunekitError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, but this model "
                                            f"needs {tuple(t.shape)}: statistics of another model")
                    t.copy_(tensors[key])
            o.add_totals()  # derived, as after a pass


class Observed(dict):
    """``{key: {statistic name: Statistic}}``: what a strategy's observers accumulated, after the reduction."""


# ---------------------------------------------------------------------------------------------- helpers
SITE_ROLES = {  # site -> (roles whose input (or output) it is, where)
    "attn_in": (("q", "qkv"), "input"),
    "attn_context": (("o",), "input"),
    "mlp_in": (("gate", "up", "fc1"), "input"),
    "mlp_mid": (("down", "fc2"), "input"),
    "mlp_pre": (("gate", "fc1"), "output"),
}


def site(model: nn.Module, layer: int, name: str) -> tuple[str, Where]:
    """(module name, where) of a named site of decoder layer ``layer`` (see the module docstring)."""
    from prunekit.arch import adapter_for

    if name not in SITE_ROLES:
        raise PrunekitError(f"unknown site {name!r}; choose from {', '.join(SITE_ROLES)}")
    roles, where = SITE_ROLES[name]
    refs = {r.role: r for r in adapter_for(model).linears(model) if r.layer == layer}
    for role in roles:
        if role in refs:
            return refs[role].name, where
    raise PrunekitError(f"this {adapter_for(model).family} model has no {name} site")


def per_head(heads: int) -> Transform:
    """Split the last dimension into ``heads`` equal parts: (..., heads·d) → (..., heads, d)."""

    def split(x: torch.Tensor, g: torch.Tensor | None, batch: Batch) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)

    return split


_SHARED_INPUT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "gate": "mlp_in", "up": "mlp_in"}


def linear_inputs(refs: Iterable, statistics: dict[str, Callable[[int], Statistic]],
                  per_source: bool = False) -> list[Observer]:
    """One observer of the forward input per distinct input tensor of ``refs`` (``prunekit.arch.LinearRef``):
    linears that read the same tensor (q/k/v, gate/up) share one observer, visible under each of their names."""
    groups: dict[tuple[int, str], list] = {}
    for ref in refs:
        groups.setdefault((ref.layer, _SHARED_INPUT.get(ref.role, ref.role)), []).append(ref)
    return [Observer(group[0].name, statistics, "input", per_source=per_source, keys=[r.name for r in group],
                     features=group[0].in_features)
            for group in groups.values()]
