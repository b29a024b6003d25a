"""SEAP: training-free sparse expert activation pruning (Liang et al., 2025; IAAR-Shanghai/SEAP).

Task-specific structured pruning: the statistics of a task's prompts decide which attention heads and MLP
channels that task needs. Scores, per input dimension j of o_proj (attention) and down_proj (MLP), over the
calibration tokens of a task τ:

    s_j(τ) = Var_τ[x_j] · ‖W[:, j]‖²₂          (the reference's default metric, "WIFV")

a head's score is the **mean** of its dimensions' scores (as the reference code; the paper's Eq. 13 says sum,
which ranks identically), a KV group's (GQA) the sum of its heads'. Layer allocation is SEAP's logistic
schedule (``allocation="logistic"``: first and last 2 layers dense, ρ_ℓ = Λ / (1 + e^(−k(x_ℓ − x0))),
k=0.8, x0=0.3), or ``uniform`` (UL) / ``adaptive`` (AL: scores standardised per layer with median/IQR and
clipped to ±3, then ranked over all layers, as the reference's global mode).

Two strategies:

- ``seap``: the expert mask of one task: ``task`` names the calibration source (one task of the ``task``
  corpus) whose statistics decide; with a single-source corpus ``task`` may be omitted. With ``tasks``
  (a list, or ``[all]`` for every source) it decides a ``PlanSet`` — one ``UnitCut`` per task from the same
  pass, and a task router (``prunekit.strategies.seap.router``) — and leaves the model dense; ``prunekit prune``
  saves it as a plan-set folder (``prunekit.load_pruned`` returns a ``RoutedModel``: the dense weights once,
  each task's pruned model built on demand) and ``prunekit eval`` scores task t with task t's model.
- ``seap-gen``: one general mask from the weighted sum of every source's scores,
  S = Σ_τ w_τ · s(τ), reference weights ``{wiki: 3, "*": 2}`` (the general text ×3, each task ×2).

Both keep statistics per source in one calibration pass over the mixed corpus (``per_source``: the batch
carries its task; ``--data.packing documents``), so ``seap`` for any task and ``seap-gen`` read the same
statistics, on one process or several.

Differences from the reference, each deliberate:
- Variance: exact Welford per-token variance in float64 (the reference's running update drops the first
  prompt's variance and mixes n and n−1 normalisations).
- Logistic budget: Λ is bisected so the parameter-weighted mean over *all* layers meets the ratio (the
  paper-era code averages over the non-protected layers only, so a nominal 20% removes 0.2·(L−4)/L; its
  later scheduler fixes this the same way). k=0.8 is the reference mask script's default (the paper says
  k=1, other scripts 1.2).
- Heads under grouped-query attention are removed by whole KV group (``head_unit``); the reference has no
  GQA support (its soft mask silently skips attention when q and k widths differ).
- Structured removal for accuracy and speed alike (the reference evaluates accuracy with zeroed rows in a
  full-size model); the two compute the same function.
- Bias compensation is available (``bias_compensation``) but off by default, as in every reported reference
  run.
- Calibration prompts: each task's reserved calibration examples rendered by lm-eval with the gold answer
  (``prunekit.tasks.prompts``), 200 per task in the benchmarks; the reference concatenates question and
  answer without a template, from the train splits (not shipped offline).
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit import allocation as alloc
from prunekit.errors import PrunekitError
from prunekit.plans import PlanSet
from prunekit.stats import ChannelMoments
from prunekit.structured import Allocation, StructuredStrategy, compensation
from prunekit.surgery import attention_heads


def wifv(variance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Var[x_j] · ‖W[:, j]‖²₂ for a consumer weight of shape (out, in)."""
    return variance.to(torch.float64) * weight.to(torch.float64).square().sum(0)


class SEAP(StructuredStrategy):
    """SEAP expert: heads and channels of one task's activations, logistic layer schedule.

    Args:
        task: the calibration source (task) whose statistics decide (default: the only source).
        tasks: one expert plan per listed source (``[all]``: every source): a ``PlanSet``, the model stays dense
            (see the module docstring). Exclusive with ``task``.
        router / router_per_task: with ``tasks``, train the task router on up to ``router_per_task`` calibration
            prompts per task and score it on as many held-out ones (``prunekit.strategies.seap.router``).
        sparsity, allocation, standardization, bias_compensation, mode and the rest: see StructuredStrategy.
    """

    name = "seap"
    default_allocation = "logistic"
    dimension_stats = {"moments": ChannelMoments}
    per_source = True

    def __init__(self, sparsity: float = 0.2, task: str | None = None, tasks: list[str] | None = None,
                 allocation: Allocation | None = None, standardization: Literal["zscore", "robust"] = "robust",
                 bias_compensation: bool = False, mode: Literal["sequential", "all-at-once"] = "all-at-once",
                 router: bool = True, router_per_task: int = 200, **kwargs) -> None:
        super().__init__(sparsity=sparsity, allocation=allocation, standardization=standardization,
                         bias_compensation=bias_compensation, mode=mode, **kwargs)
        if task is not None and tasks:
            raise PrunekitError("give either --strategy.task (one expert, pruned in place) or --strategy.tasks "
                                "(one plan per task, a task-routed model), not both")
        if tasks and mode != "all-at-once":
            raise PrunekitError("one plan per task needs the dense model's statistics: use mode='all-at-once' "
                                "(sequential pruning would need a separate pass per task)")
        if router_per_task < 0:
            raise PrunekitError(f"router_per_task must be >= 0 (0 = every prompt), got {router_per_task}")
        self.task, self.tasks = task, list(tasks) if tasks else None
        self.router, self.router_per_task = router, router_per_task
        self.sources_: list[str] | None = None
        self._current: str | None = None

    def describe(self) -> dict:
        out = {**super().describe(), "task": self.task, "standardization": self.standardization}
        if self.tasks:
            out.update({"tasks": self.tasks, "router": self.router})
        return out

    def _expert_tasks(self) -> list[str]:
        sources = self.sources_ or []
        if self.tasks == ["all"]:
            return list(sources)
        unknown = [t for t in self.tasks if t not in sources]
        if unknown:
            raise PrunekitError(f"--strategy.tasks {unknown} are not among the calibration sources "
                                f"({', '.join(sources)}); add them to --data.corpus_options tasks")
        return list(self.tasks)

    summarize = None  # one plan per task over every layer (a plan set): it does not stream

    def layerwise(self, model) -> bool:
        return False

    def decide(self, model, observed, layer, context):
        """One task's expert (a ``UnitCut``), a general mask (seap-gen), or with ``tasks`` a ``PlanSet``: one
        plan per task from the same statistics, and a task router trained on the tasks' prompts."""
        self.sources_ = list(context.sources) if context is not None and context.sources else None
        if not self.tasks:
            return super().decide(model, observed, layer, context)
        refs = [r for r in self.targets(model) if layer is None or r.layer == layer]
        plans = {}
        for task in self._expert_tasks():
            self._current = task
            try:
                plans[task] = self.unit_cut(model, refs, observed, self.plan(model, refs, observed))
            finally:
                self._current = None
        router, report = None, None
        if self.router and context is not None and context.is_global_zero and context.tokenizer is not None:
            router, report = self._train_router(model, context, list(plans))
        return PlanSet(plans, router, report)

    def _train_router(self, model, context, tasks: list[str]):
        import time

        from prunekit.tasks import LM_EVAL_GROUPS, TASKS
        from prunekit.strategies.seap.router import train_router

        routable = [t for t in tasks if t in TASKS or t in LM_EVAL_GROUPS]  # a text corpus has no prompts
        if len(routable) < 2:
            return None, None
        start = time.perf_counter()
        router, report = train_router(model, context.tokenizer, routable, per_task=self.router_per_task,
                                      held_out=self.router_per_task, seed=context.seed, enable_progress_bar=False)
        report["train_s"] = time.perf_counter() - start
        report["summary"] = [f"task router (mean input embedding → linear, {len(routable)} tasks, chance "
                             f"{report['chance']:.2f}): held-out accuracy {report['accuracy']:.3f}, macro F1 "
                             f"{report['macro_f1']:.3f}"]
        report["summary"] += [f"  {task:<16} precision {m['precision']:.3f}  recall {m['recall']:.3f}  F1 {m['f1']:.3f}  "
                              f"({m['train']} training / {m['held_out']} held-out prompts)"
                              for task, m in report["per_task"].items()]
        return router, report

    def compensation(self, refs, observed, heads, channels, head_dim):
        """Compensate with the mean of the source(s) that decided the mask, weighted like their scores."""
        weights = self.source_weights()
        merged = {name: {"moments": _weighted_moments(group, weights)} for name, group in observed.items()
                  if f"moments@{next(iter(weights))}" in group}
        return compensation(refs, merged, heads, channels, head_dim)

    def _source(self) -> str:
        if self._current is not None:
            return self._current
        sources = self.sources_ or []
        if self.task is None:
            if len(sources) != 1:
                raise PrunekitError(f"seap builds one task's expert mask: choose the task with --strategy.task "
                                    f"(calibration sources: {', '.join(sources)})")
            return sources[0]
        if self.task not in sources:
            raise PrunekitError(f"--strategy.task {self.task!r} is not among the calibration sources "
                                f"({', '.join(sources)}); add it to --data.corpus_options tasks")
        return self.task

    def source_weights(self) -> dict[str, float]:
        return {self._source(): 1.0}

    def dimension_scores(self, ref, stats, attention: bool) -> torch.Tensor:
        total = None
        for source, w in self.source_weights().items():
            s = w * wifv(stats[f"moments@{source}"].variance(), ref.weight)
            total = s if total is None else total + s
        return total

    def head_scores(self, dims: torch.Tensor, heads: int) -> torch.Tensor:
        return dims.view(heads, -1).mean(1)

    def _adaptive_units(self, model, layer: int, dims: torch.Tensor, n_q: int):
        """SEAP's global mode: head scores (mean over the head's dims), standardised over the layer's heads."""
        z = alloc.standardize(self.head_scores(dims, n_q), self.standardization)
        n_kv = attention_heads(model, layer)[1]
        group = n_q // n_kv
        if group == 1:
            return [[h] for h in range(n_q)], z
        return [list(range(g * group, (g + 1) * group)) for g in range(n_kv)], z.view(n_kv, group).mean(1)


class SEAPGen(SEAP):
    """SEAP-gen: one general mask from the weighted sum of every source's scores (reference: wiki ×3, tasks ×2).

    Args:
        weights: per-source weight; ``"*"`` is the weight of every source not named.
    """

    name = "seap-gen"

    def __init__(self, sparsity: float = 0.2, weights: dict[str, float] | None = None, **kwargs) -> None:
        if kwargs.get("task") is not None or kwargs.get("tasks"):  # the CLI passes both as None
            raise PrunekitError("seap-gen combines every source into one mask; for task experts use --strategy seap")
        super().__init__(sparsity=sparsity, **kwargs)
        self.weights = dict(weights) if weights is not None else {"wiki": 3.0, "*": 2.0}
        if any(w < 0 for w in self.weights.values()):
            raise PrunekitError(f"seap-gen weights must be >= 0, got {self.weights}")

    def describe(self) -> dict:
        return {**super().describe(), "weights": self.weights}

    def source_weights(self) -> dict[str, float]:
        sources = self.sources_ or []
        unknown = [s for s in self.weights if s != "*" and s not in sources]
        if unknown:
            raise PrunekitError(f"seap-gen weights name {unknown}, which are not calibration sources "
                                f"({', '.join(sources)})")
        out = {s: float(self.weights.get(s, self.weights.get("*", 0.0))) for s in sources}
        if not any(out.values()):
            raise PrunekitError(f"seap-gen weights {self.weights} give every source weight 0")
        return out


def _weighted_moments(group: dict, weights: dict[str, float]) -> ChannelMoments:
    """Mean of the sources that decide the mask, weighted like their scores (for bias compensation)."""
    first = group[f"moments@{next(iter(weights))}"]
    out = ChannelMoments(first.features)
    total = sum(weights.values())
    mean = sum(w * group[f"moments@{s}"].mean for s, w in weights.items()) / total
    out.mean.copy_(mean)
    out.count.fill_(1)
    return out
