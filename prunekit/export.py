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


def save_pruned(model, folder: str | Path, tokenizer=None) -> bool:
    """Save a (possibly physically cut) model: safetensors weights, config, tokenizer, per-layer widths.

    When every decoder layer has the same widths and the family's config can state them (``plain_config``),
    the written config carries the new widths, so plain ``AutoModelForCausalLM.from_pretrained`` loads the
    folder too; returns whether it does. Otherwise the config stays the source model's and only
    ``load_pruned`` (or ``prunekit.models.load_model``) rebuilds the per-layer widths.
    """
    import json

    from prunekit.surgery import structure

    folder = Path(folder)
    plain = plain_config(model)
    if plain is None:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        config, state = plain
        model.save_pretrained(folder, safe_serialization=True, state_dict=state)
        config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    record = {"plain_loadable": plain is not None, "layers": structure(model)}
    (folder / STRUCTURE_FILE).write_text(json.dumps(record, indent=1))
    return plain is not None


_MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


def plain_config(model):
    """(config, state dict) that let plain ``AutoModelForCausalLM`` rebuild this cut model, or None.

    Possible when all layers share their MLP width, head counts and biased projections, and the family's
    config has a key for each changed width (an explicit ``head_dim`` is needed once heads are cut, so the
    head size does not follow hidden/heads). Biases that FLAP's compensation added switch on the config's
    ``attention_bias`` / ``mlp_bias``; projections that then expect a bias get an exact zero one. The
    candidate is checked by building it on the meta device and comparing every parameter's name and shape.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from prunekit.arch import ATTN_ROLES, adapter_for
    from prunekit.surgery import structure

    layers = structure(model)
    keys = ("mlp_channels", "heads", "kv_heads", "biased")
    if any({k: spec[k] for k in keys} != {k: layers[0][k] for k in keys} for spec in layers):
        return None
    config = copy.deepcopy(model.config)
    n_q, n_kv, head_dim = adapter_for(model).attention_shape(config)
    spec = layers[0]
    mlp_key = next((k for k in _MLP_WIDTH_KEYS if hasattr(config, k)), None)
    if mlp_key is None:
        return None
    setattr(config, mlp_key, spec["mlp_channels"])
    if (spec["heads"], spec["kv_heads"]) != (n_q, n_kv):
        if not hasattr(config, "head_dim") or not hasattr(config, "num_key_value_heads"):
            return None
        config.head_dim = head_dim
        config.num_attention_heads, config.num_key_value_heads = spec["heads"], spec["kv_heads"]
    if any(role in ATTN_ROLES for role in spec["biased"]) and hasattr(config, "attention_bias"):
        config.attention_bias = True
    if any(role not in ATTN_ROLES for role in spec["biased"]) and hasattr(config, "mlp_bias"):
        config.mlp_bias = True
    with torch.device("meta"):
        candidate = AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
    state = dict(model.state_dict())
    have = {k: tuple(v.shape) for k, v in state.items()}
    if any(want.get(k) != shape for k, shape in have.items()):
        return None
    for key in set(want) - set(have):
        if not key.endswith(".bias"):
            return None
        state[key] = torch.zeros(want[key], dtype=model.dtype)
    return config, state


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
    with _no_init():  # the full-width weights are cut before anyone touches them: no RSS for the dense size
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        apply_structure(model, json.loads(spec_file.read_text())["layers"])
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in _renamed_for(model, state).items()}
    # assign: the loaded tensors become the parameters (no second copy of the weights in memory)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise PrunekitError(f"{path}: weights do not match the recorded structure (missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    return model.eval()


def _no_init():
    """Skip random initialisation while building the skeleton (every weight is loaded afterwards, strictly)."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


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
