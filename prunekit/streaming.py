"""Streaming: prune a model larger than memory, one decoder layer at a time.

With ``--calibration.streaming true`` the model is built on the meta device (no memory for its weights); the
embeddings and the final norm are read from the source's safetensors shards, the LM head is never needed. Then,
layer by layer: the layer's weights are read from the shards (memory-mapped, only its own tensors), moved to
the compute device (``--trainer.accelerator``: only this layer and the current batch are on it), calibrated on
the cached inputs, pruned, and written to its own output shard before the next layer is read. Peak memory ≈ one
layer + the cached calibration activations + embeddings, whatever the depth.

The cached activations (the hidden states of every local calibration example between two layers, kept as the
sequential pipeline keeps them) stay in memory while they fit the budget ``--calibration.memory``
(budget − the largest layer, split between a layer's inputs and its outputs); beyond it they live in files under
``--calibration.offload_dir`` (default: beside the output folder), read back one batch at a time. The per-layer
arguments the model passes its layers (rotary tables, masks) stay in memory: they are shared by all layers.

Every pipeline that observes one layer at a time streams: ``none`` (data-free), ``sequential`` and
``all-at-once`` (the dense model's activations, computed layer by layer). A strategy whose whole-model decision
needs every layer's scores at once (FLAP's adaptive allocation) gives a small per-layer ``summarize`` in the
first pass and decides each layer in a second pass over the shards. Plans stream when their kind is a weight
mask or a unit cut; plan sets (SEAP's experts) and runtimes hold every layer at once and do not. Across
processes (DDP over devices and nodes) each process catches and runs its own calibration examples, statistics
are reduced exactly, rank 0 decides each layer and broadcasts the layer's plan, and only rank 0 writes.
The output folder is an ordinary sharded checkpoint (``model-XXXXX-of-YYYYY.safetensors`` + index), the same
weights as the in-memory path writes, loadable by ``prunekit.load_pruned`` and, where widths allow, by plain
``transformers``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError

INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12,
          "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass
class CalibrationOptions:
    """How a run holds the model and its calibration activations (``--calibration.*``).

    Args:
        streaming: build the model on the meta device and read, calibrate, prune and write one decoder layer at
            a time from the source's safetensors shards: peak memory about one layer + calibration activations
            + embeddings, flat in depth. The source must be a safetensors folder (a zoo model's cache is one).
        memory: memory budget of a streaming run's layer and cached calibration activations, e.g. ``2GB``,
            ``512MiB`` or bytes; activations beyond it are offloaded to disk. Default: no budget (in memory).
        offload_dir: folder for offloaded activations (default: beside the output folder); removed at exit.
    """

    streaming: bool = False
    memory: str | None = None
    offload_dir: str | None = None


def parse_bytes(text: str | int) -> int:
    """``2GB``, ``512MiB``, ``1.5G`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise PrunekitError(f"--calibration.memory {text!r} is not a size: write e.g. 2GB, 512MiB or a number of "
                            "bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------- source
class Source:
    """The source model's safetensors shards. Tensors are read per layer (``read``): each shard is opened
    memory-mapped for the read and closed after it, so pages of layers already done do not stay mapped."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise PrunekitError(f"streaming reads safetensors shards, and {self.folder} has neither model.safetensors "
                                f"nor {INDEX} (a PyTorch .bin checkpoint: re-save it with save_pretrained, which "
                                "writes safetensors)")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise PrunekitError(f"{self.folder}: shard {missing[0]} named by {INDEX} is missing ({len(missing)} of "
                                f"{len(files)} shards); restore it (download or save the model again)")
        found: dict[str, str] = {}
        for name in files:
            with safe_open(str(self.folder / name), framework="pt", device="cpu") as f:
                found.update(dict.fromkeys(f.keys(), name))
        if weight_map is not None:
            lost = [k for k, f in weight_map.items() if found.get(k) != f]
            if lost:
                raise PrunekitError(f"{self.folder}: {INDEX} places {lost[0]} in {weight_map[lost[0]]}, which does not "
                                    "hold it (a shard from another save?); save the model again")
        self.weight_map = found

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors named ``keys`` (copied out of the shards, which are closed again)."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.weight_map:
                raise PrunekitError(f"{self.folder}: no tensor {key} in the safetensors shards (an incomplete or "
                                    "foreign checkpoint)")
            by_file.setdefault(self.weight_map[key], []).append(key)
        for name, group in by_file.items():
            with safe_open(str(self.folder / name), framework="pt", device="cpu") as f:
                for key in group:
                    out[key] = f.get_tensor(key).clone()  # own memory: nothing keeps the shard mapped
        return out


# ---------------------------------------------------------------------------------------------- model
def skeleton(location: str, dtype: str = "float32") -> tuple[nn.Module, "Streamer"]:
    """The model on the meta device with its non-layer tensors (embeddings, final norm) read from ``location``;
    and the :class:`Streamer` that reads its layers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(location)
    if not folder.is_dir():
        raise PrunekitError(f"streaming needs a local model folder with safetensors shards; {location} is not one")
    from prunekit.realize import plan_kind_of

    kind = plan_kind_of(str(folder))
    if kind not in (None, "weight_mask", "unit_cut"):
        raise PrunekitError(f"{folder} holds a {kind} (a model with a router or runtime), which streaming cannot "
                            "prune; prune it in memory")
    source = Source(folder)
    config = AutoConfig.from_pretrained(folder)
    # buffers (rotary tables) are computed for real; parameters take no memory until their layer's turn
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        from prunekit.realize.cuts import STRUCTURE_FILE

        if (folder / STRUCTURE_FILE).is_file():  # a folder prunekit cut: rebuild its widths (on meta)
            from prunekit.surgery import apply_structure

            apply_structure(model, json.loads((folder / STRUCTURE_FILE).read_text())["layers"])
    model.eval().requires_grad_(False)
    streamer = Streamer(model, source, getattr(torch, dtype))
    streamer.load_rest()
    return model, streamer


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    module = root.get_submodule(path) if path else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _persistent(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers (what a checkpoint holds), with names relative to ``module``."""
    return list(module.state_dict(keep_vars=True).items())


class Streamer:
    """Where a streaming model's decoder layers live: on the meta device until their turn (``enter``), read
    from the source shards; ``state`` gives a layer's tensors to write; ``leave`` frees them again."""

    def __init__(self, model: nn.Module, source: Source, dtype: torch.dtype) -> None:
        from prunekit.arch import adapter_for
        from prunekit.realize.cuts import _renamed_for

        self.model, self.source, self.dtype = model, source, dtype
        self.layers = adapter_for(model).layers(model)
        self.prefix = next(n for n, m in model.named_modules() if m is self.layers)
        own = set(model.state_dict())
        renamed = _renamed_for(model, {k: k for k in source.keys()})  # {model key: checkpoint key}
        self.file_key = {k: v for k, v in renamed.items() if k in own}
        self.loaded: set[int] = set()
        self.device = torch.device("cpu")
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.tied = out is not None and (out.weight is inp.weight or (
            bool(getattr(text, "tie_word_embeddings", False)) and out.weight.shape == inp.weight.shape))

    # ----------------------------------------------------------------------------- reading
    def _read_into(self, root: nn.Module, names: list[str], full: str) -> None:
        keys = {}
        for name in names:
            key = f"{full}{name}"
            if key not in self.file_key:
                raise PrunekitError(f"{self.source.folder}: the checkpoint has no tensor for {key} (an incomplete "
                                    "checkpoint, or a config that does not match its weights)")
            keys[name] = self.file_key[key]
        tensors = self.source.read(list(keys.values()))
        for name, key in keys.items():
            t = tensors.pop(key)
            try:
                current = root.get_parameter(name)
            except AttributeError:
                current = root.get_buffer(name)
            if tuple(t.shape) != tuple(current.shape):
                raise PrunekitError(f"{self.source.folder}: {key} has shape {tuple(t.shape)}, the model expects "
                                    f"{tuple(current.shape)} (config and weights disagree)")
            _set_tensor(root, name, t.to(self.dtype) if t.is_floating_point() else t)

    def rest_names(self) -> list[str]:
        """Non-layer tensors to read: all but the decoder layers and an untied LM head (never needed to prune)."""
        head = self._head_key()
        return [k for k, v in _persistent(self.model)
                if not k.startswith(self.prefix + ".") and (k != head or self.tied) and v.is_meta]

    def _head_key(self) -> str | None:
        out = self.model.get_output_embeddings()
        if out is None:
            return None
        return next((f"{n}.weight" for n, m in self.model.named_modules() if m is out), None)

    def load_rest(self) -> None:
        head = self._head_key()
        names = [k for k in self.rest_names() if k != head]
        self._read_into(self.model, names, "")
        if self.tied:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight

    def place(self, device: torch.device, compute: bool = True) -> None:
        """Move the loaded non-layer tensors (embeddings, norm, rotary tables) to ``device`` — with ``compute``,
        also where layers will run; tied tensors stay one tensor."""
        device = torch.device(device)
        if compute:
            self.device = device
        moved: dict[int, torch.Tensor] = {}
        for name, module in self.model.named_modules():
            if name == self.prefix or name.startswith(self.prefix + "."):
                continue
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is None or t.is_meta:
                        continue
                    if t.device == device:
                        continue
                    if id(t) not in moved:
                        moved[id(t)] = nn.Parameter(t.data.to(device), requires_grad=False) \
                            if isinstance(t, nn.Parameter) else t.to(device)
                    store[key] = moved[id(t)]

    # ----------------------------------------------------------------------------- layers
    def layer_bytes(self, i: int) -> int:
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return sum(t.numel() * (elem if t.is_floating_point() else t.element_size())
                   for _, t in _persistent(self.layers[i]))

    def enter(self, i: int) -> nn.Module:
        """Read layer ``i`` from the shards onto the compute device (no-op when it is there)."""
        layer = self.layers[i]
        if i not in self.loaded:
            names = [n for n, t in _persistent(layer) if t.is_meta]
            self._read_into(layer, names, f"{self.prefix}.{i}.")
            layer.to(self.device)
            self.loaded.add(i)
        return layer

    def state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s checkpoint tensors under their full names (on the CPU)."""
        return {f"{self.prefix}.{i}.{n}": t.detach().to("cpu").contiguous() for n, t in _persistent(self.layers[i])}

    def leave(self, i: int) -> None:
        """Free layer ``i``'s tensors (their shapes stay, on the meta device)."""
        layer = self.layers[i]
        for name, t in _persistent(layer):
            _set_tensor(layer, name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        self.loaded.discard(i)

    def rest_state(self) -> dict[str, torch.Tensor]:
        """The non-layer tensors to write (the LM head read from the source when it is not tied)."""
        out = {k: v.detach().to("cpu").contiguous() for k, v in _persistent(self.model)
               if not k.startswith(self.prefix + ".") and not v.is_meta}
        head = self._head_key()
        if head is not None and self.tied:
            out.pop(head, None)  # tied: written once, as the input embeddings (as save_pretrained does)
        elif head is not None and head not in out:
            if head not in self.file_key:
                raise PrunekitError(f"{self.source.folder}: the checkpoint has no {head}")
            out[head] = self.source.read([self.file_key[head]])[self.file_key[head]].to(self.dtype)
        return out


# ---------------------------------------------------------------------------------------------- activations
class Activations:
    """The calibration batches' hidden states between two layers: in (host, pinned for CUDA) memory while they fit
    ``limit`` bytes, otherwise in one file under ``folder``; read back a batch at a time to ``device``."""

    def __init__(self, limit: int | None, folder: Path | None, device: torch.device) -> None:
        self.limit, self.folder, self.device = limit, folder, device
        self.items: list[Any] = []
        self.bytes = 0
        self.path: Path | None = None
        self._out = None

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        self.bytes += t.numel() * t.element_size()
        if self.path is None and self.limit is not None and self.bytes > self.limit:
            self._spill()
        if self.path is not None:
            self.items.append(self._write(t))
        elif t.device.type != "cpu":  # an accelerator holds the current layer and batch only: park the rest
            host = t.to("cpu")
            self.items.append(host.pin_memory() if t.device.type == "cuda" else host)
        else:
            self.items.append(t)

    def _spill(self) -> None:
        if self.folder is None:
            raise PrunekitError("calibration activations exceed --calibration.memory and there is no offload folder")
        fd, name = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=self.folder)
        import os

        os.close(fd)
        self.path = Path(name)
        self._out = open(self.path, "wb")
        kept, self.items = self.items, []
        for t in kept:
            self.items.append(self._write(t))

    def _write(self, t: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype]:
        t = t.to("cpu").contiguous()
        offset = self._out.tell()
        self._out.write(t.view(-1).view(torch.uint8).numpy().data)
        return offset, tuple(t.shape), t.dtype

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        if self.path is None:
            for t in self.items:
                yield t.to(self.device, non_blocking=True)
            return
        self._out.flush()
        with open(self.path, "rb") as f:
            for offset, shape, dtype in self.items:
                buf = torch.empty(shape, dtype=dtype)
                f.seek(offset)
                f.readinto(buf.view(-1).view(torch.uint8).numpy().data)
                yield buf.to(self.device)

    def close(self) -> None:
        self.items = []
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes each layer to its own shard as soon as it is pruned, then the rest and the index."""

    def __init__(self, folder: Path, layers: int) -> None:
        self.folder, self.layers = Path(folder), layers
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.layers + 1:05d}.safetensors"

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        name = self.name(i)
        save_file(tensors, str(self.folder / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            self.weight_map[key] = name
            self.total += t.numel() * t.element_size()

    def finish(self, rest: dict[str, torch.Tensor]) -> None:
        self.write(self.layers, rest)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))


def save_metadata(model: nn.Module, folder: Path, tokenizer, writer: ShardWriter, rest: dict) -> dict:
    """The non-layer tensors (``rest``), index, config, generation config, tokenizer and per-layer widths of a
    streamed model (its layers are written already) — what ``save_cut`` writes for an in-memory one; returns how
    the folder loads."""
    from prunekit.realize.cuts import plain_config, write_structure

    plain = plain_config(model)
    rest = dict(rest)
    if isinstance(plain, str):
        model.config.save_pretrained(folder)
    else:
        config, state = plain
        own = set(model.state_dict())
        rest.update({k: v.contiguous() for k, v in state.items() if k not in own})  # zero biases it expects
        config.save_pretrained(folder)
    writer.finish(rest)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return write_structure(model, folder, plain)


def offload_folder(options, output_dir: str | None) -> Path:
    """A fresh folder for offloaded activations (removed by the caller)."""
    base = Path(options.offload_dir).expanduser() if options.offload_dir else \
        Path(output_dir).expanduser().resolve().parent if output_dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    try:
        return Path(tempfile.mkdtemp(prefix=".prunekit-activations-", dir=base))
    except OSError as e:
        raise PrunekitError(f"cannot write offloaded activations to {base} ({e.strerror}); choose another "
                            "--calibration.offload_dir") from None


def give_back_memory() -> None:
    """Return freed heap memory to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold after large frees, so a layer's freed buffers then stay in the heap as free,
    fragmented chunks and the resident size creeps up layer after layer (+440 MB over 32 layers of hidden 2048
    without this); trimming once per layer keeps the peak flat in depth."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the run
STREAMABLE_PIPELINES = ("none", "sequential", "all-at-once")


class StreamingRun:
    """Calibrate, decide, realize and write a streaming model layer by layer (see the module docstring).

    ``check`` refuses what cannot stream before any work; ``catch`` records the calibration inputs of layer 0
    (one Lightning ``predict`` pass, so examples are split across processes); ``run`` does the layers and, on
    the process that has a writer, writes each one as it is done; ``close`` removes offloaded activations.
    """

    def __init__(self, trainer, pl_module, data, strategy, context, streamer: Streamer, options: CalibrationOptions,
                 output_dir: str | None = None) -> None:
        self.trainer, self.module, self.data, self.strategy = trainer, pl_module, data, strategy
        self.context, self.streamer, self.options, self.output_dir = context, streamer, options, output_dir
        self.model = pl_module.model
        self.pipeline = strategy.pipeline
        self.budget = parse_bytes(options.memory) if options.memory is not None else None
        self.limit: int | None = None
        self.offload: Path | None = None
        self.hidden: Activations | None = None
        self.catcher = None
        self.kind: str | None = None
        self.rows: list[dict] = []
        self.params = {"params_total": 0, "params_nonzero": 0}
        self.seconds_per_layer: list[float] = []

    # ----------------------------------------------------------------------------- checks
    def layerwise(self) -> bool:
        return self.pipeline == "sequential" or self.strategy.layerwise(self.model)

    def check(self) -> None:
        s = self.strategy
        if self.pipeline not in STREAMABLE_PIPELINES:
            raise PrunekitError(f"{s.name} runs the {self.pipeline} pipeline (one pass through every layer at once: "
                                "backward or probes), which cannot stream layer by layer; prune it in memory "
                                "(--calibration.streaming false)")
        if not self.layerwise() and not callable(getattr(s, "summarize", None)):
            raise PrunekitError(f"{s.name} decides from every layer at once (its decide is not per layer and it has no "
                                "per-layer summarize), so it cannot stream; prune it in memory "
                                "(--calibration.streaming false)")
        if self.budget is not None:
            largest = max(self.streamer.layer_bytes(i) for i in range(len(self.streamer.layers)))
            batch = self._batch_bytes()
            minimum = largest + 2 * batch
            if self.budget < minimum:
                raise PrunekitError(f"--calibration.memory {self.options.memory} is below the minimum of a streaming "
                                    f"run, {fmt_bytes(minimum)} ({minimum} bytes): the largest layer "
                                    f"({fmt_bytes(largest)}) plus one batch of activations in and out "
                                    f"({fmt_bytes(2 * batch)}); raise it, or lower --data.batch_size / --data.seq_len")
            self.limit = (self.budget - largest) // 2

    def _batch_bytes(self) -> int:
        if self.pipeline == "none" or self.data is None:
            return 0
        hidden = self.model.get_input_embeddings().weight.shape[1]
        elem = torch.empty(0, dtype=self.streamer.dtype).element_size()
        return int(getattr(self.data, "batch_size", 1)) * int(self.data.seq_len) * hidden * elem

    def _store(self) -> Activations:
        if self.limit is not None and self.offload is None:
            self.offload = offload_folder(self.options, self.output_dir)
        return Activations(self.limit, self.offload, self.streamer.device)

    # ----------------------------------------------------------------------------- passes
    def catch(self) -> None:
        """Record the inputs of layer 0 and every layer's own arguments for the local calibration examples."""
        from prunekit.observe import ObserverSet
        from prunekit.pipeline import ObservePass, _LayerInputCatcher

        self.streamer.place(self.trainer.strategy.root_device)
        if self.pipeline == "none":
            return
        self.streamer.enter(0)
        self.hidden = self._store()
        self.catcher = _LayerInputCatcher(self.streamer.layers, self.hidden)
        try:
            self.trainer.predict(ObservePass(self.model, ObserverSet(), False, "calibration: layer-0 inputs",
                                             on_batch=self.catcher.batches.append, register=False),
                                 dataloaders=self.data.predict_dataloader(), return_predictions=False)
        finally:
            self.catcher.remove()
        self.streamer.place("cpu", compute=False)  # the embeddings' work is done: off the accelerator

    def run(self, writer: ShardWriter | None) -> None:
        import time

        from prunekit.observe import ObserverSet
        from prunekit.pipeline import _call_layer, comm, decide_layer
        from prunekit.progress import bar

        model, strategy, context, streamer = self.model, self.strategy, self.context, self.streamer
        n = len(streamer.layers)
        reduce = comm(self.trainer)
        layerwise = self.layerwise()
        kept, summaries = {}, {}
        label = "streaming: layers" if layerwise else "streaming: layers (observe)"
        for i in bar(range(n), label, self.trainer.is_global_zero):
            t = time.perf_counter()
            layer = streamer.enter(i)
            outputs, observed, observes = None, ObserverSet().results(), self.pipeline == "none"
            if self.pipeline != "none":
                observers = ObserverSet(list(strategy.observers(model, i)))
                observes = len(observers) > 0
                if self.pipeline == "all-at-once":
                    outputs = self._store()  # the dense layer's outputs feed the next layer
                if observes or outputs is not None:
                    if observes:
                        if observers.needs_grad:
                            raise PrunekitError(f"strategy {strategy.name} observes gradients, which streaming "
                                                "cannot provide")
                        observers.build(model, context.sources)
                        observers.attach()
                    try:
                        for b, h, (args, kwargs) in zip(self.catcher.batches, self.hidden, self.catcher.calls[i]):
                            observers.begin(b)
                            out = _call_layer(layer, h, args, kwargs)
                            observers.after_batch()
                            if outputs is not None:
                                outputs.append(out)
                    finally:
                        observers.detach()
                    observers.reduce(reduce)
                    observed = observers.results()
                del observers
            if layerwise:
                if observes:
                    self._realize(i, decide_layer(self.trainer, strategy, model, observed, i, context))
                if self.pipeline == "sequential":  # the pruned layer's outputs feed the next layer
                    outputs = self._store()
                    for h, (args, kwargs) in zip(self.hidden, self.catcher.calls[i]):
                        outputs.append(_call_layer(layer, h, args, kwargs))
                self._done(i, writer)
            else:
                summaries[i] = strategy.summarize(model, observed, i)
                kept[i] = observed
                streamer.leave(i)
                give_back_memory()
            if outputs is not None:
                self.hidden.close()
                self.hidden = outputs
                self.catcher.calls[i] = []
            self.seconds_per_layer.append(time.perf_counter() - t)
        if self.hidden is not None:
            self.hidden.close()
        if not layerwise:
            context.summaries = summaries
            for i in bar(range(n), "streaming: layers (prune)", self.trainer.is_global_zero):
                t = time.perf_counter()
                streamer.enter(i)
                self._realize(i, decide_layer(self.trainer, strategy, model, kept.pop(i), i, context))
                self._done(i, writer)
                self.seconds_per_layer[i] += time.perf_counter() - t
            context.summaries = None
        if self.kind is None:
            raise PrunekitError(f"strategy {strategy.name} decided nothing for any layer: check its modules/layers "
                                "options")

    def _realize(self, i: int, part) -> None:
        from prunekit.realize import realizer_for

        if part is None:
            return
        realizer = realizer_for(part)
        if realizer.kind not in ("weight_mask", "unit_cut"):
            raise PrunekitError(f"{self.strategy.name} plans a {realizer.kind}, which holds every layer at once and "
                                "cannot be realized layer by layer; prune it in memory (--calibration.streaming false)")
        if self.kind is not None and realizer.kind != self.kind:
            raise PrunekitError(f"{self.strategy.name} planned a {self.kind} for one layer and a {realizer.kind} for "
                                "another")
        self.kind = realizer.kind
        realizer.apply(self.model, part)

    def _done(self, i: int, writer: ShardWriter | None) -> None:
        """Record layer ``i``'s sparsity and parameters, write it (rank 0) and free it."""
        from prunekit.realize.base import sparsity_rows

        self.rows += sparsity_rows(self.model, layer=i)
        for _, p in self.streamer.layers[i].named_parameters():
            self.params["params_total"] += p.numel()
            self.params["params_nonzero"] += int(torch.count_nonzero(p))
        if writer is not None:
            writer.write(i, self.streamer.state(i))
        self.streamer.leave(i)
        give_back_memory()
        from prunekit.pipeline import notify

        notify(self.trainer, "on_layer_done", self.module, i)

    def report(self, dense: dict[str, int], rest: dict[str, torch.Tensor] | None = None) -> dict:
        """What ``static_report`` gives for an in-memory model, from the rows recorded layer by layer."""
        from prunekit.realize.base import report_from

        counts = dict(self.params)
        names = {n for n, _ in self.model.named_parameters()}
        for key, t in (rest or {}).items():
            if key in names:
                counts["params_total"] += t.numel()
                counts["params_nonzero"] += int(torch.count_nonzero(t))
        out = report_from(self.rows, counts, dense)
        if self.kind == "unit_cut":
            from prunekit.surgery import structure

            out["structure"] = structure(self.model)
            out["layers"] = [{"layer": i, "mlp_channels": s["mlp_channels"], "heads": s["heads"],
                              "kv_heads": s["kv_heads"]} for i, s in enumerate(out["structure"])]
        else:
            out["layers"] = [{"layer": i, "sparsity": v} for i, v in out["per_layer_sparsity"].items()]
        return out

    def close(self) -> None:
        if self.hidden is not None:
            self.hidden.close()
        remove(self.offload)
        self.offload = None
