"""Realizer of ``UnitCut`` plans: heads and MLP channels physically removed, per-layer widths, added biases.

Saving writes the cut weights with ``save_pretrained`` and the per-layer widths to ``prunekit_structure.json``;
``load`` rebuilds the widths on a skeleton and assigns the weights. When every layer has the same widths and
the family's config can state them (``plain_config``), the written config carries the new widths and plain
``transformers.AutoModelForCausalLM.from_pretrained`` loads the folder too; otherwise the folder says why not
(``prunekit.json``'s ``loading`` entry and the printed summary).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.realize.base import Realizer, static_report

STRUCTURE_FILE = "prunekit_structure.json"
_MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


class UnitCutRealizer(Realizer):
    kind = "unit_cut"

    @torch.no_grad()
    def apply(self, model: nn.Module, plan, **context: Any) -> nn.Module:
        from prunekit.arch import adapter_for
        from prunekit.surgery import add_bias, remove_units

        adapter = adapter_for(model)
        layers = adapter.layers(model)
        refs = {r.name: r for r in adapter.linears(model)}
        from prunekit.plans import LayerCut, layer_of

        for layer in sorted(plan.layers()):
            cut = plan.cuts.get(layer, LayerCut())
            biases = {n: b for n, b in plan.bias.items() if layer_of(n) == layer}
            marker = (tuple(cut.heads), tuple(cut.channels), tuple(sorted(biases)))
            if getattr(layers[layer], "_prunekit_cut", None) == marker:
                continue  # already realized (sequential pipelines cut each layer as they go)
            for name, delta in biases.items():
                if name not in refs:
                    raise PrunekitError(f"the plan adds a bias to {name}, which this model does not have")
                add_bias(refs[name], delta)
            remove_units(model, layer, cut.heads, cut.channels, plan.allow_empty)
            layers[layer]._prunekit_cut = marker
        return model

    def report(self, realized: nn.Module, dense: dict[str, int]) -> dict:
        from prunekit.surgery import structure

        report = static_report(realized, dense)
        report["structure"] = structure(realized)
        report["layers"] = [{"layer": i, "mlp_channels": s["mlp_channels"], "heads": s["heads"],
                             "kv_heads": s["kv_heads"]} for i, s in enumerate(report["structure"])]
        return report

    def save(self, realized: nn.Module, folder: Path, tokenizer=None) -> dict:
        return save_cut(realized, folder, tokenizer)

    def load(self, folder: Path, dtype: str = "float32", **kwargs: Any) -> nn.Module:
        return load_cut(folder, dtype)


def save_cut(model: nn.Module, folder: str | Path, tokenizer=None) -> dict:
    """Save a (possibly physically cut) model: safetensors weights, config, tokenizer, per-layer widths.

    Returns how the folder loads: always with ``prunekit.load_pruned``; also with plain
    ``AutoModelForCausalLM.from_pretrained`` when ``plain_config`` finds a config that states the widths,
    otherwise ``note`` says why not; ``decode``: how to decode it fast (``prunekit.fast_generate``).
    """
    folder = Path(folder)
    plain = plain_config(model)
    if isinstance(plain, str):
        model.save_pretrained(folder, safe_serialization=True)
    else:
        config, state = plain
        model.save_pretrained(folder, safe_serialization=True, state_dict=state)
        config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return write_structure(model, folder, plain)


def write_structure(model: nn.Module, folder: Path, plain) -> dict:
    """Write the per-layer widths (``prunekit_structure.json``) and return how the folder loads, given
    ``plain_config``'s answer."""
    from prunekit.surgery import structure

    record = {"plain_loadable": not isinstance(plain, str), "layers": structure(model)}
    if isinstance(plain, str):
        record["why_not_plain"] = plain
    (Path(folder) / STRUCTURE_FILE).write_text(json.dumps(record, indent=1))
    from prunekit.decode import DECODE_HINT

    if isinstance(plain, str):
        return {"loadable_with": "prunekit.load_pruned (prunekit eval --model FOLDER)", "plain": False,
                "note": f"plain AutoModelForCausalLM.from_pretrained (and lm_eval --model hf) cannot load this "
                        f"folder: {plain}", "decode": DECODE_HINT}
    return {"loadable_with": "transformers.AutoModelForCausalLM.from_pretrained or prunekit.load_pruned",
            "plain": True, "decode": DECODE_HINT}


def plain_config(model: nn.Module):
    """(config, state dict) that let plain ``AutoModelForCausalLM`` rebuild this cut model, or the reason why
    no such config exists (a string).

    Possible when all layers share their MLP width, head counts and biased projections, and the family's
    config has a key for each changed width (an explicit ``head_dim`` is needed once heads are cut, so the
    head size does not follow hidden/heads). Biases that bias compensation added switch on the config's
    ``attention_bias`` / ``mlp_bias``; projections that then expect a bias get an exact zero one. The
    candidate is checked by building it on the meta device and comparing every parameter's name and shape.
    """
    from transformers import AutoModelForCausalLM

    from prunekit.arch import ATTN_ROLES, adapter_for
    from prunekit.surgery import structure

    layers = structure(model)
    family = adapter_for(model).family
    for key, what in (("mlp_channels", "MLP width"), ("heads", "number of query heads"),
                      ("kv_heads", "number of key/value heads"), ("biased", "set of projections with a bias")):
        values = [spec[key] for spec in layers]
        if any(v != values[0] for v in values):
            where = next(i for i, v in enumerate(values) if v != values[0])
            return (f"its layers differ in {what} (layer 0: {values[0]}, layer {where}: {values[where]}), and a "
                    f"{family} config holds one value for every layer (transformers has no per-layer width field "
                    "for this family); per-layer widths come from adaptive or logistic allocation — uniform "
                    "allocation gives a plainly loadable folder")
    config = copy.deepcopy(model.config)
    n_q, n_kv, head_dim = adapter_for(model).attention_shape(config)
    spec = layers[0]
    mlp_key = next((k for k in _MLP_WIDTH_KEYS if hasattr(config, k)), None)
    if mlp_key is None:
        return f"the {family} config has no MLP width field"
    setattr(config, mlp_key, spec["mlp_channels"])
    if (spec["heads"], spec["kv_heads"]) != (n_q, n_kv):
        if not hasattr(config, "head_dim") or not hasattr(config, "num_key_value_heads"):
            return (f"heads were removed, and a {family} config derives the head size from hidden size / heads "
                    "(no head_dim field)")
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
    wrong = [k for k, shape in have.items() if want.get(k) != shape]
    if wrong:
        return (f"the {family} config cannot express {wrong[0]} with shape {have[wrong[0]]} "
                f"(it would build {want.get(wrong[0])}), e.g. a bias added by bias compensation")
    for key in set(want) - set(have):
        if not key.endswith(".bias"):
            return f"the {family} config would build {key}, which the cut model does not have"
        state[key] = torch.zeros(want[key], dtype=model.dtype)
    return config, state


def load_cut(path: str | Path, dtype: str = "float32") -> nn.Module:
    """Load a folder written by ``save_cut``: rebuild each layer's recorded widths, then load the weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunekit.surgery import apply_structure

    path = Path(path)
    spec_file = path / STRUCTURE_FILE
    if not spec_file.is_file():
        raise PrunekitError(f"{path} has no {STRUCTURE_FILE}: not a structurally pruned folder")
    config = AutoConfig.from_pretrained(path)
    with _no_init():  # the full-width weights are cut before anyone touches them: no RSS for the dense size
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        apply_structure(model, json.loads(spec_file.read_text())["layers"])
    state = {}
    for shard in sorted(path.glob("model*.safetensors")):  # the model's shards only (not runtime.safetensors)
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
    return model.eval().requires_grad_(False)


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
