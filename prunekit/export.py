"""Atomic output folders: everything is written to a temporary sibling folder, then renamed into place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from prunekit.errors import PrunekitError


def check_output_dir(output_dir: str | Path, overwrite: bool, source: str | None = None) -> Path:
    """Refuse an existing folder unless ``overwrite``; never allow the source model's folder."""
    out = Path(output_dir).expanduser().resolve()
    if source is not None and Path(source).expanduser().exists() and Path(source).expanduser().resolve() == out:
        raise PrunekitError(f"output folder {out} is the source model's folder; the source is never overwritten")
    if out.exists() and not overwrite:
        raise PrunekitError(f"output folder {out} already exists; choose another --output_dir or pass --overwrite true")
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"output path {out} exists and is not a folder")
    return out


def write_atomically(output_dir: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary folder beside ``output_dir``, then move it into place.

    On any error the temporary folder is removed and an existing ``output_dir`` is left untouched.
    """
    out = check_output_dir(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / out.name)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


STRUCTURE_FILE = "prunekit_structure.json"


def save_pruned(model, folder: str | Path, tokenizer=None) -> None:
    """Save a (possibly physically cut) model: safetensors weights, config, tokenizer, per-layer widths."""
    import json

    from prunekit.surgery import structure

    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / STRUCTURE_FILE).write_text(json.dumps({"layers": structure(model)}, indent=1))


def load_pruned(path: str | Path, dtype: str = "float32"):
    """Load a folder written by prunekit: rebuild each layer's recorded widths, then load the weights.

    Works for uniform and per-layer widths, added biases and every supported family; a folder without a
    structure file is an ordinary Hugging Face model and loads as one.
    """
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunekit.surgery import apply_structure

    path = Path(path)
    spec_file = path / STRUCTURE_FILE
    if not spec_file.is_file():
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    apply_structure(model, json.loads(spec_file.read_text())["layers"])
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    state = _renamed_for(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise PrunekitError(f"{path}: weights do not match the recorded structure (missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    return model.eval()


def _renamed_for(model, state: dict) -> dict:
    """Apply the model's registered checkpoint renames (e.g. GPT-NeoX ``embed_out`` → ``lm_head``).

    ``save_pretrained`` writes legacy key names that ``from_pretrained`` renames on load; loading a state dict
    into a rebuilt model must do the same.
    """
    import re

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # older transformers: keys are saved as named
        return state
    renames = [(src, dst) for conv in get_model_conversion_mapping(model) if isinstance(conv, WeightRenaming)
               for src, dst in zip(conv.source_patterns, conv.target_patterns)]
    own = set(model.state_dict())
    out = {}
    for key, value in state.items():
        new = key
        if key not in own:
            for src, dst in renames:
                candidate = re.sub(src, dst, new)
                if candidate in own:
                    new = candidate
                    break
        out[new] = value
    return out
