"""Realizers: one per plan kind, each owning apply, report, save, load and how evaluation runs the result.

``realizer_for(plan)`` picks the realizer of a plan; ``load_pruned(folder)`` reads any folder prunekit wrote
(its ``prunekit.json`` names the plan kind) and returns the realized model:

| plan kind        | realized object                                   | folder                                   |
|------------------|---------------------------------------------------|------------------------------------------|
| ``weight_mask``  | the model with zeros (and reconstructed weights)  | a plain Hugging Face folder              |
| ``unit_cut``     | the physically smaller model, per-layer widths    | HF folder + ``prunekit_structure.json``  |
| ``plan_set``     | :class:`~prunekit.realize.routed.RoutedModel`      | dense weights + ``prunekit_plans.json``  |
| ``runtime_policy`` | the model (over its static base) with the runtime installed | base folder + ``prunekit_runtime.json`` |

Applying a plan to a model that already embodies it changes nothing (a sequential pipeline realizes each
layer's part as it goes, then the job realizes the whole plan): zeros and written weights are written again,
cut layers carry a marker, an installed runtime is recognised.
"""

from __future__ import annotations

import json
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.realize.base import RECORD_FILE, Realizer, evaluation_models, model_for_task, realizers

__all__ = ["RECORD_FILE", "Realizer", "evaluation_models", "load_pruned", "model_for_task", "realizer_for",
           "realizers"]


def realizer_for(plan) -> Realizer:
    """The realizer of a plan (by its ``kind``)."""
    table = realizers()
    if plan.kind not in table:
        raise PrunekitError(f"no realizer for plan kind {plan.kind!r}; known: {', '.join(table)}")
    return table[plan.kind]


def plan_kind_of(folder: str | Path) -> str | None:
    """The plan kind a prunekit folder holds (None for a plain Hugging Face folder)."""
    from prunekit.realize.cuts import STRUCTURE_FILE
    from prunekit.realize.routed import PLANS_FILE

    folder = Path(folder)
    record = folder / RECORD_FILE
    if record.is_file():
        try:
            kind = json.loads(record.read_text()).get("plan")
        except json.JSONDecodeError as e:
            raise PrunekitError(f"{record} is not valid JSON ({e}); the folder is damaged") from None
        if kind:
            return kind
    if (folder / PLANS_FILE).is_file():
        return "plan_set"
    if (folder / STRUCTURE_FILE).is_file():
        return "unit_cut"
    return None


def load_pruned(path: str | Path, dtype: str = "float32", dense=None):
    """Load a folder written by prunekit and return the realized model, whatever the plan kind (table above).

    A folder prunekit did not write loads as an ordinary Hugging Face model. ``dense``: for plan sets, the
    folder's dense model if already loaded.
    """
    from prunekit.models import resolve

    location = Path(resolve(str(path)))
    kind = plan_kind_of(location)
    if kind is None:
        return realizers()["weight_mask"].load(location, dtype)
    table = realizers()
    if kind not in table:
        raise PrunekitError(f"{location} holds a {kind!r} plan, which this prunekit cannot load (known: "
                            f"{', '.join(table)})")
    if kind == "plan_set" and dense is not None:
        return table[kind].load(location, dtype, dense=dense)
    return table[kind].load(location, dtype)
