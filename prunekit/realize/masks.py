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

    def compact(self, model: nn.Module, plan):
        """Reconstructed weights become views of the model's own (now equal) weights: no second copy."""
        if not plan.weights:
            return plan
        refs = _refs(model)
        return type(plan)(plan.masks, {name: refs[name].weight for name in plan.weights})

    def report(self, realized: nn.Module, dense: dict[str, int]) -> dict:
        report = static_report(realized, dense)
        report["layers"] = [{"layer": i, "sparsity": v} for i, v in report["per_layer_sparsity"].items()]
        return report

    def save(self, realized: nn.Module, folder: Path, tokenizer=None) -> dict:
        """Zeros need nothing special — but the model may have been cut before (a folder prunekit wrote, pruned
        again): the widths are saved the way a unit cut saves them, and the folder says how it loads."""
        from prunekit.realize.cuts import save_cut

        return save_cut(realized, folder, tokenizer)

    def load(self, folder: Path, dtype: str = "float32", **kwargs: Any) -> nn.Module:
        from transformers import AutoModelForCausalLM

        from prunekit.realize.cuts import STRUCTURE_FILE, load_cut

        if (Path(folder) / STRUCTURE_FILE).is_file():
            return load_cut(folder, dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as e:
            raise PrunekitError(f"cannot load the model in {folder}: {e}") from None
        return model.eval().requires_grad_(False)
