"""Realizer of ``WeightMask`` plans: zeros (and reconstructed weights) written into the linears, in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.realize.base import Realizer, static_report


def _refs(model: nn.Module) -> dict:
    from prunekit.arch import adapter_for

    return {r.name: r for r in adapter_for(model).linears(model)}


class WeightMaskRealizer(Realizer):
    kind = "weight_mask"

    @torch.no_grad()
    def apply(self, model: nn.Module, plan, **context: Any) -> nn.Module:
        refs = _refs(model)
        unknown = [n for n in (*plan.weights, *plan.masks) if n not in refs]
        if unknown:
            raise PrunekitError(f"the plan names projections this model does not have: {unknown[:3]}")
        for name, w in plan.weights.items():
            ref = refs[name]
            if tuple(w.shape) != tuple(ref.weight.shape):
                raise PrunekitError(f"{name}: planned weight {tuple(w.shape)} vs the model's {tuple(ref.weight.shape)}")
            ref.set_weight(w)
        for name, mask in plan.masks.items():
            ref = refs[name]
            if tuple(mask.shape) != tuple(ref.weight.shape):
                raise PrunekitError(f"{name}: mask {tuple(mask.shape)} vs weight {tuple(ref.weight.shape)}")
            ref.weight[mask.to(ref.weight.device)] = 0
        return model

    def report(self, realized: nn.Module, dense: dict[str, int]) -> dict:
        report = static_report(realized, dense)
        report["layers"] = [{"layer": i, "sparsity": v} for i, v in report["per_layer_sparsity"].items()]
        return report

    def save(self, realized: nn.Module, folder: Path, tokenizer=None) -> dict:
        realized.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return {"loadable_with": "transformers.AutoModelForCausalLM.from_pretrained or prunekit.load_pruned",
                "plain": True}

    def load(self, folder: Path, dtype: str = "float32", **kwargs: Any) -> nn.Module:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as e:
            raise PrunekitError(f"cannot load the model in {folder}: {e}") from None
        return model.eval().requires_grad_(False)
