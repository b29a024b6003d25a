"""Saved calibration statistics (``statistics.safetensors``): what a pass observed, with the fingerprints of the
model and the data it observed, so that a later run can prune from them without calibrating — and refuses
statistics of another model or other data.

The file holds every observer's reduced state (``"<observer key>.<statistic>.<field>"``) and, as metadata, the
strategy and pipeline that wrote it, the calibration sources, the model fingerprint (config and a fixed sample
of every tensor), the data fingerprint (``CalibrationDataModule.fingerprint``: every calibration token, source
and loss mask) and the calibration settings — which the records of a run that reads the file show.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PrunekitError

FILE = "statistics.safetensors"
_SAMPLE = 4096
_VOLATILE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "_commit_hash"}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's config and, per tensor, its name, shape, dtype and a fixed strided sample of values."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::step][:_SAMPLE].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()


def save(path: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={k: json.dumps(v) for k, v in meta.items()})


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a statistics file; a clear error if it is missing or not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"statistics file {path} does not exist; save one with --save_statistics true (it is "
                            f"written as {FILE} in the output folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise PrunekitError(f"{path} is not a readable statistics file ({type(e).__name__}: {e}); save one again "
                            "with --save_statistics true") from None
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        raise PrunekitError(f"{path} has damaged metadata; save the statistics again with --save_statistics true") from None
    return tensors, meta


def check(meta: dict, path: str | Path, model_print: str, data_print: str | None, force: bool) -> list[str]:
    """Refuse statistics of another model or other data (unless ``force``); return the warnings to print."""
    problems = []
    if "model_fingerprint" not in meta:
        problems.append("it records no fingerprint of the model and data it came from (written by an older prunekit)")
    else:
        if meta["model_fingerprint"] != model_print:
            problems.append(f"it was calibrated on another model ({meta.get('model', '?')}), or the model changed")
        if data_print is not None and meta.get("data_fingerprint") != data_print:
            problems.append("it was calibrated on other data (corpus, samples, length, seed or tokenizer differ: "
                            f"it saw {json.dumps(meta.get('data'))})")
    if problems and not force:
        raise PrunekitError(f"--statistics {path}: " + "; ".join(problems) +
                            ". Calibrate again, or pass --force true to prune from these statistics anyway")
    return [f"warning: --statistics {path}: {p} (--force true)" for p in problems]
