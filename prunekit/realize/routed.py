"""Realizer of ``PlanSet`` plans: one dense model and, per member (e.g. per task), a plan built on demand.

``RoutedModel`` holds the dense weights once; the model of a member is built when asked for — only the decoder
layers its plan changes are copied and realized (by the member plan's own realizer), everything else
(embeddings, norms, untouched layers, the LM head) is shared with the dense model — and the last
``max_cached`` are kept (least recently used first out), which bounds memory to the dense model plus
``max_cached`` sets of changed layers. ``route(prompt)`` asks the plan set's router, ``generate(prompt)``
routes and runs.

Folder layout: the dense model (``save_pretrained``) and tokenizer, ``prunekit_plans.json`` (per member its
plan — for ``unit_cut`` members the removed heads and channels per layer — the router's class path and
report), ``plans_bias.safetensors`` (bias vectors per member and projection) and ``router.safetensors``.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.realize.base import Realizer, import_class, parameter_counts

PLANS_FILE = "prunekit_plans.json"
BIAS_FILE = "plans_bias.safetensors"
ROUTER_FILE = "router.safetensors"


def build_member(dense: nn.Module, plan) -> nn.Module:
    """The dense model with ``plan`` realized on copies of the decoder layers it changes; every other module
    is shared with ``dense`` (which is never modified)."""
    from prunekit.arch import adapter_for
    from prunekit.realize import realizer_for

    adapter = adapter_for(dense)
    prefixes = {f"{adapter.layers_path}.{i}" for i in plan.layers()}
    ancestors = {p.rsplit(".", k)[0] for p in prefixes for k in range(1, p.count(".") + 1)} | {""}
    memo = {}
    for name, module in dense.named_modules():
        inside = any(name == p or name.startswith(p + ".") for p in prefixes)
        if not inside and name not in ancestors:
            memo[id(module)] = module  # deepcopy returns the shared module itself
    for name, p in [*dense.named_parameters(recurse=False), *dense.named_buffers(recurse=False)]:
        memo[id(p)] = p
    member = copy.deepcopy(dense, memo)
    realizer_for(plan).apply(member, plan)
    return member.eval()


class RoutedModel:
    """Dense weights once, a model per member built on demand and cached (see the module docstring)."""

    prunekit_kind = "plan_set"

    def __init__(self, dense: nn.Module, plan_set, max_cached: int = 2, tokenizer=None, meta: dict | None = None) -> None:
        if not plan_set.plans:
            raise PrunekitError("a plan set needs at least one member plan")
        if max_cached < 1:
            raise PrunekitError(f"max_cached must be >= 1, got {max_cached}")
        self.dense, self.plan_set, self.max_cached = dense.eval(), plan_set, max_cached
        self.tokenizer, self.meta = tokenizer, meta or {}
        self._cache: OrderedDict[str, nn.Module] = OrderedDict()

    @property
    def names(self) -> list[str]:
        return list(self.plan_set.plans)

    @property
    def router(self):
        return self.plan_set.router

    def member_for_task(self, task: str) -> str:
        """The member that serves an evaluation task: its own, or its lm-eval group's (mmlu_anatomy → mmlu)."""
        if task in self.plan_set.plans:
            return task
        from prunekit.tasks import LM_EVAL_GROUPS

        for group in sorted(LM_EVAL_GROUPS, key=len, reverse=True):
            if task.startswith(group + "_") and group in self.plan_set.plans:
                return group
        raise PrunekitError(f"no member of this plan set serves task {task!r}; members: {', '.join(self.names)}")

    def model_for(self, name: str) -> nn.Module:
        """The dense model with member ``name``'s plan (built once, then served from the cache)."""
        if name not in self.plan_set.plans:
            raise PrunekitError(f"no member {name!r}; this plan set has {', '.join(self.names)}")
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        model = build_member(self.dense, self.plan_set.plans[name])
        self._cache[name] = model
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return model

    def route(self, prompt: str) -> str:
        if self.router is None:
            raise PrunekitError("this plan set has no router; name the member explicitly (model_for(name))")
        if self.tokenizer is None:
            raise PrunekitError("routing needs the tokenizer (load the folder with prunekit.load_pruned)")
        return self.router.route(self.dense, self.tokenizer, [prompt])[0]

    @torch.no_grad()
    def generate(self, prompt: str, member: str | None = None, **generate_kwargs) -> tuple[str, str]:
        """Route ``prompt`` (unless ``member`` is given) and generate with that member; (member, new text)."""
        if self.tokenizer is None:
            raise PrunekitError("generate needs the tokenizer (load the folder with prunekit.load_pruned)")
        member = member or self.route(prompt)
        model = self.model_for(member)
        inputs = self.tokenizer(prompt, return_tensors="pt")
        generate_kwargs.setdefault("max_new_tokens", 32)
        generate_kwargs.setdefault("do_sample", False)
        out = model.generate(**inputs, **generate_kwargs)
        return member, self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class PlanSetRealizer(Realizer):
    kind = "plan_set"

    def apply(self, model: nn.Module, plan, tokenizer=None, **context: Any) -> RoutedModel:
        for name, member in plan.plans.items():
            if member.kind != "unit_cut":
                raise PrunekitError(f"plan set member {name!r} is a {member.kind} plan; plan sets of unit_cut "
                                    "members are supported")
        return RoutedModel(model, plan, max_cached=1, tokenizer=tokenizer)

    def members(self, realized: RoutedModel) -> Iterator[tuple[str, nn.Module]]:
        for name in realized.names:
            yield name, realized.model_for(name)

    def member_for_task(self, realized: RoutedModel, task: str) -> str:
        return realized.member_for_task(task)

    def model_for_task(self, realized: RoutedModel, task: str) -> tuple[nn.Module, str]:
        member = realized.member_for_task(task)
        return realized.model_for(member), member

    def report(self, realized: RoutedModel, dense: dict[str, int]) -> dict:
        from prunekit.realize import realizer_for

        members = {}
        for name in realized.names:
            plan = realized.plan_set.plans[name]
            model = realized.model_for(name)
            part = realizer_for(plan).report(model, dense)
            members[name] = {k: part[k] for k in ("params_total", "params_nonzero", "pruned_fraction",
                                                  "params_removed_fraction", "structure", "layers") if k in part}
        counts = parameter_counts(realized.dense)
        fractions = [m["pruned_fraction"] for m in members.values()]
        report = {**counts, "members": members, "pruned_fraction": sum(fractions) / len(fractions),
                  "params_removed_fraction": sum(m["params_removed_fraction"] for m in members.values()) / len(members)}
        if realized.plan_set.router_report is not None:
            report["router"] = realized.plan_set.router_report
        return report

    def save(self, realized: RoutedModel, folder: Path, tokenizer=None) -> dict:
        from safetensors.torch import save_file

        realized.dense.save_pretrained(folder, safe_serialization=True)
        tok = tokenizer or realized.tokenizer
        if tok is not None:
            tok.save_pretrained(folder)
        plan_set = realized.plan_set
        record: dict[str, Any] = {"members": {name: {"kind": p.kind, "allow_empty": p.allow_empty, "cuts": p.to_json()}
                                              for name, p in plan_set.plans.items()}}
        flat = {f"{name}/{proj}": t.contiguous() for name, p in plan_set.plans.items() for proj, t in p.bias.items()}
        if flat:
            save_file(flat, str(folder / BIAS_FILE))
        if plan_set.router is not None:
            cls = type(plan_set.router)
            record["router"] = {"class": f"{cls.__module__}.{cls.__qualname__}", "report": plan_set.router_report}
            plan_set.router.save(folder / ROUTER_FILE)
        (folder / PLANS_FILE).write_text(json.dumps(record, indent=1))
        return {"loadable_with": "prunekit.load_pruned (a RoutedModel: model_for(member), route(prompt), "
                                 "generate(prompt)); prunekit eval scores each task with its member",
                "plain": False,
                "note": "the folder's weights are the dense model's: AutoModelForCausalLM.from_pretrained loads the "
                        "dense model, not a member"}

    def load(self, folder: Path, dtype: str = "float32", dense: nn.Module | None = None, **kwargs: Any) -> RoutedModel:
        from prunekit.models import load_tokenizer
        from prunekit.plans import PlanSet, UnitCut

        folder = Path(folder)
        if not (folder / PLANS_FILE).is_file():
            raise PrunekitError(f"{folder} is not a plan-set folder (no {PLANS_FILE})")
        record = json.loads((folder / PLANS_FILE).read_text())
        bias: dict[str, dict[str, torch.Tensor]] = {}
        if (folder / BIAS_FILE).is_file():
            from safetensors.torch import load_file

            for key, t in load_file(str(folder / BIAS_FILE)).items():
                name, proj = key.split("/", 1)
                bias.setdefault(name, {})[proj] = t
        plans = {}
        for name, member in record["members"].items():
            if member.get("kind", "unit_cut") != "unit_cut":
                raise PrunekitError(f"{folder}: member {name!r} is a {member['kind']} plan, which cannot be loaded")
            plans[name] = UnitCut.from_json(member["cuts"], bias.get(name), member.get("allow_empty", False))
        router, report = None, None
        if "router" in record:
            cls = import_class(record["router"]["class"], folder, "router")
            router, report = cls.load(folder / ROUTER_FILE), record["router"].get("report")
        if dense is None:
            from prunekit.realize.masks import WeightMaskRealizer

            dense = WeightMaskRealizer().load(folder, dtype)
        return RoutedModel(dense, PlanSet(plans, router, report), max_cached=kwargs.get("max_cached", 2),
                           tokenizer=load_tokenizer(str(folder)))
