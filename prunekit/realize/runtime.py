"""Realizer of ``RuntimePolicy`` plans: a static base plan (optional) with an input-dependent runtime on top.

The runtime (``prunekit.plans.Runtime``) is installed in the model itself — hooks or wrapped modules — so the
realized object is an ordinary ``nn.Module``: ``generate`` with the KV cache, perplexity and lm-eval run it as
they run any model. Saving writes the base plan's folder (dense, zeros or cut weights) and
``prunekit_runtime.json`` (the runtime's class path and options) plus ``runtime.safetensors`` (its tensors);
loading realizes the base, then installs the runtime again.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.realize.base import Realizer, import_class

RUNTIME_FILE = "prunekit_runtime.json"
RUNTIME_TENSORS = "runtime.safetensors"


def runtime_of(model: nn.Module):
    """The runtime installed in ``model`` (``prunekit.plans.Runtime``), or None."""
    return model.__dict__.get("_prunekit_runtime") if isinstance(model, nn.Module) else None


def scoring(model: nn.Module, purpose: str, seq_len: int | None = None):
    """The installed runtime's context for forwards made for ``purpose`` (a no-op without a runtime)."""
    runtime = runtime_of(model)
    return nullcontext() if runtime is None else runtime.scoring(purpose, seq_len=seq_len)


def _base_kind(model: nn.Module) -> str:
    return getattr(model, "_prunekit_base_kind", "weight_mask")


class RuntimePolicyRealizer(Realizer):
    kind = "runtime_policy"

    def apply(self, model: nn.Module, plan, **context: Any) -> nn.Module:
        from prunekit.realize import realizer_for

        if plan.runtime is None:
            raise PrunekitError("a runtime_policy plan needs a runtime")
        current = getattr(model, "_prunekit_runtime", None)
        if current is plan.runtime:
            return model  # already realized
        if current is not None:  # the static base is applied to the bare model
            current.remove(model)
            model.__dict__.pop("_prunekit_runtime", None)
        if plan.base is not None:
            if plan.base.kind in ("plan_set", "runtime_policy"):
                raise PrunekitError(f"a runtime cannot sit on a {plan.base.kind} plan; use a static base")
            model = realizer_for(plan.base).apply(model, plan.base, **context)
        plan.runtime.install(model)
        model.__dict__["_prunekit_runtime"] = plan.runtime  # not a submodule: never in the state dict
        model._prunekit_base_kind = plan.base.kind if plan.base is not None else "weight_mask"
        return model

    def report(self, realized: nn.Module, dense: dict[str, int]) -> dict:
        from prunekit.realize import realizers

        runtime = realized._prunekit_runtime
        runtime.remove(realized)  # the static model underneath (a runtime may wrap modules)
        try:
            report = realizers()[_base_kind(realized)].report(realized, dense)
        finally:
            runtime.install(realized)
        report["runtime"] = runtime.describe()
        return report

    def save(self, realized: nn.Module, folder: Path, tokenizer=None) -> dict:
        from safetensors.torch import save_file

        from prunekit.realize import realizers

        runtime = realized._prunekit_runtime
        runtime.remove(realized)  # save the weights without the runtime's wrappers
        try:
            base = realizers()[_base_kind(realized)].save(realized, folder, tokenizer)
        finally:
            runtime.install(realized)
        cls = type(runtime)
        (folder / RUNTIME_FILE).write_text(json.dumps({"class": f"{cls.__module__}.{cls.__qualname__}",
                                                       "state": runtime.state(), "base": _base_kind(realized)},
                                                      indent=1))
        tensors = {k: v.contiguous() for k, v in runtime.tensors().items()}
        if tensors:
            save_file(tensors, str(folder / RUNTIME_TENSORS))
        return {"loadable_with": "prunekit.load_pruned (the model with its runtime installed)", "plain": False,
                "note": "plain AutoModelForCausalLM.from_pretrained loads the weights without the runtime "
                        f"({'the base plan' if base.get('plain') else base.get('note', '')})"}

    def load(self, folder: Path, dtype: str = "float32", **kwargs: Any) -> nn.Module:
        from prunekit.realize import realizers

        folder = Path(folder)
        record_file = folder / RUNTIME_FILE
        if not record_file.is_file():
            raise PrunekitError(f"{folder} has no {RUNTIME_FILE}: not a runtime-policy folder")
        record = json.loads(record_file.read_text())
        cls = import_class(record["class"], folder, "runtime")
        tensors = {}
        if (folder / RUNTIME_TENSORS).is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(folder / RUNTIME_TENSORS))
        model = realizers()[record.get("base", "weight_mask")].load(folder, dtype)
        runtime = cls.from_state(record.get("state", {}), tensors)
        runtime.install(model)
        model.__dict__["_prunekit_runtime"] = runtime
        model._prunekit_base_kind = record.get("base", "weight_mask")
        return model

