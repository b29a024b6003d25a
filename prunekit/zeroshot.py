"""lm-eval zero-/few-shot accuracy for a model instance (dense, pruned folder, or with a dynamic method hooked in).

The model object itself is handed to lm-eval's ``HFLM`` (no reload, no patched harness) — by default its
subclass ``prunekit.fastlm.PrefixSharingLM``, which scores the choices of a multiple-choice request on one run
of their shared context — with prunekit's ``TaskManager`` that indexes only the packaged tasks of
``prunekit.tasks``. Results keep lm-eval's metric names (``acc``, ``acc_norm``, ``exact_match`` per filter) and
standard errors.
"""

from __future__ import annotations

import math
import sys
import time

from prunekit.errors import PrunekitError
from prunekit.tasks import expand, task_manager


def evaluate_tasks(model, tokenizer, tasks: list[str] | str, limit: int | float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, max_gen_toks: int | None = None,
                   seed: int = 1234, prefix_sharing: bool = True, cache: bool = False,
                   log_samples: bool = False) -> dict:
    """Run lm-eval on ``tasks`` (names, lm-eval groups such as ``mmlu``, or prunekit groups such as ``seap7``).

    Returns ``{"tasks": {name: {metric: value, metric_stderr: value, "n": docs}}, "groups": {...},
    "average": {...}, "config": {...}, "raw": lm-eval's own output}``; ``limit`` takes the first N evaluation documents of each task (a
    fraction if below 1), as lm-eval does. ``seed`` seeds lm-eval's few-shot sampling (its default, 1234).
    ``config["scoring"]`` says which scorer ran and, per request type, how many requests it scored in how many
    seconds.

    ``prefix_sharing``: score log-likelihood requests with ``prunekit.fastlm.PrefixSharingLM`` (the same metrics,
    faster); False runs lm-eval's ``HFLM`` as is. A model with a prunekit runtime installed (GRIFFIN, ShadowLLM:
    decisions that depend on the whole prompt) always takes lm-eval's own path. ``cache``: reuse the result of an
    earlier call with the same weights, tokenizer, tasks and options (``prunekit.evalcache``; never for a model
    with a runtime); the summary then carries ``cached`` (the file). ``log_samples``: lm-eval's per-document
    records (``raw["samples"]``: arguments and responses of every request).
    """
    names = [t for t in expand(tasks) if t != "perplexity"]
    if not names:
        return {"tasks": {}, "groups": {}, "average": {}, "config": {}}
    if limit is not None and limit <= 0:
        raise PrunekitError(f"limit must be positive (documents per task, or a fraction below 1), got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise PrunekitError(f"num_fewshot must be >= 0, got {num_fewshot}")
    from prunekit.realize.runtime import runtime_of

    runtime = runtime_of(model)
    if cache and runtime is None:
        from prunekit import evalcache

        options = {"tasks": names, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                   "max_gen_toks": max_gen_toks, "seed": seed, "prefix_sharing": prefix_sharing,
                   "log_samples": log_samples}
        fields = evalcache.key_fields(model, tokenizer, options)
        digest = evalcache.key(fields)
        hit = evalcache.load(digest)
        if hit is not None:
            summary, path = hit
            summary["cached"] = str(path)
            print(f"lm-eval results reused from {path} (same weights, tokenizer, tasks and options)", file=sys.stderr)
            return summary
    summary = _evaluate(model, tokenizer, names, runtime, limit=limit, num_fewshot=num_fewshot,
                        batch_size=batch_size, max_gen_toks=max_gen_toks, seed=seed, prefix_sharing=prefix_sharing,
                        log_samples=log_samples)
    if cache and runtime is None:
        evalcache.store(digest, fields, summary)
    return summary


def _evaluate(model, tokenizer, names: list[str], runtime, *, limit, num_fewshot, batch_size, max_gen_toks, seed,
              prefix_sharing, log_samples) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    if runtime is not None and not runtime.scores_padded_batches:
        batch_size = 1  # lm-eval pads log-likelihood batches on the right without a mask
    if runtime is not None:
        lm_class = _runtime_lm()
    elif prefix_sharing:
        from prunekit.fastlm import PrefixSharingLM as lm_class
    else:
        lm_class = HFLM
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    timing = _time_requests(lm)
    gen_kwargs = {"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None
    out = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager(),
                          gen_kwargs=gen_kwargs,
                          log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    model.train(was_training)
    summary = summarize(out, names)
    summary["config"]["scoring"] = {"lm": lm_class.__name__, "prefix_sharing": lm_class.__name__ == "PrefixSharingLM",
                                    "requests": timing, **({"plain_fallback": lm.stats["plain_requests"]}
                                                           if hasattr(lm, "stats") else {})}
    summary["raw"] = out
    return summary


def _time_requests(lm) -> dict:
    """Count the requests of each type the instance scores and the seconds it takes (filled as lm-eval runs)."""
    timing: dict[str, dict] = {}

    def timed(name, method):
        def call(requests, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(requests, *args, **kwargs)
            finally:
                row = timing.setdefault(name, {"requests": 0, "seconds": 0.0})
                row["requests"] += len(requests)
                row["seconds"] += time.perf_counter() - start
        return call

    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, name, timed(name, getattr(lm, name)))
    return timing


def _runtime_lm():
    from lm_eval.models.huggingface import HFLM

    from prunekit.realize.runtime import scoring

    class RuntimeLM(HFLM):
        """lm-eval's HF model, telling an installed runtime what each request is for (``Runtime.scoring``)."""

        def loglikelihood(self, requests, *args, **kwargs):
            with scoring(self.model, "loglikelihood"):
                return super().loglikelihood(requests, *args, **kwargs)

        def loglikelihood_rolling(self, requests, *args, **kwargs):
            with scoring(self.model, "perplexity"):
                return super().loglikelihood_rolling(requests, *args, **kwargs)

        def generate_until(self, requests, *args, **kwargs):
            with scoring(self.model, "generate"):
                return super().generate_until(requests, *args, **kwargs)

    return RuntimeLM


def _metrics(entry: dict) -> dict:
    values = {}
    for key, value in entry.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}[{filt}]"
        values[name] = float(value) if not (isinstance(value, float) and math.isnan(value)) else None
    return values


def summarize(out: dict, requested: list[str]) -> dict:
    """lm-eval's output → per-task and per-group metrics, plus averages over the requested top-level items."""
    groups = set(out.get("groups", {}))
    n_samples = out.get("n-samples", {})
    tasks, group_rows = {}, {}
    for name, entry in out["results"].items():
        row = _metrics(entry)
        if name in groups:
            group_rows[name] = {**row, "n": int(entry.get("sample_len", 0) or 0)}
        else:
            row["n"] = int(n_samples.get(name, {}).get("effective", 0))
            tasks[name] = row
    config = {"num_fewshot": {k: v for k, v in out.get("n-shot", {}).items()}, "versions": out.get("versions", {})}
    return {"tasks": tasks, "groups": group_rows, "average": _average(tasks, group_rows, requested), "config": config}


def _average(tasks: dict, groups: dict, requested: list[str]) -> dict:
    """Mean acc (and mean of acc_norm where a task has it, else acc) over the requested top-level items."""
    top = {name: (groups.get(name) or tasks.get(name)) for name in requested}
    accs = [r["acc"] for r in top.values() if r and r.get("acc") is not None]
    best = [r.get("acc_norm") if r.get("acc_norm") is not None else r.get("acc") for r in top.values() if r]
    best = [v for v in best if v is not None]
    average = {}
    if accs:
        average["acc"] = sum(accs) / len(accs)
    if best:
        average["acc_norm_or_acc"] = sum(best) / len(best)
    return average


def evaluate_realized(realized, tokenizer, tasks: list[str] | str, **kwargs) -> dict:
    """``evaluate_tasks`` on whatever a folder realizes: one model, or a plan set whose members each answer
    the tasks they serve (their own, or their lm-eval group's).

    For a plan set the member is chosen by the task's name (oracle routing: the evaluation knows which task
    it runs), as the SEAP paper evaluates its experts. Returns ``evaluate_tasks``' summary; for a plan set
    also ``members`` ({task: member}) and ``raw`` per task.
    """
    from prunekit.realize.base import of

    realizer = of(realized)
    names = [t for t in expand(tasks) if t != "perplexity"]
    members = {name: realizer.member_for_task(realized, name) for name in names}  # all served before any work
    if set(members.values()) == {""}:
        model, _ = realizer.model_for_task(realized, names[0]) if names else (realized, "")
        return evaluate_tasks(model, tokenizer, names, **kwargs)
    merged = {"tasks": {}, "groups": {}, "config": {"num_fewshot": {}, "versions": {}}, "raw": {}, "members": members}
    for name in names:
        model, _ = realizer.model_for_task(realized, name)
        part = evaluate_tasks(model, tokenizer, [name], **kwargs)
        merged["tasks"].update(part["tasks"])
        merged["groups"].update(part["groups"])
        for key in ("num_fewshot", "versions"):
            merged["config"][key].update(part["config"].get(key, {}))
        merged["raw"][name] = part.get("raw")
    merged["average"] = _average(merged["tasks"], merged["groups"], names)
    return merged


def metric_rows(summary: dict) -> list[tuple[str, str, float, float | None, int]]:
    """(task or group, metric, value, standard error, documents) for every reported metric, groups first."""
    rows = []
    for kind in ("groups", "tasks"):
        for name, row in sorted(summary[kind].items()):
            for metric, value in row.items():
                if metric == "n" or "_stderr" in metric or value is None:
                    continue
                base, _, filt = metric.partition("[")
                err = row.get(f"{base}_stderr" + (f"[{filt}" if filt else ""))
                rows.append((name, metric, value, err if isinstance(err, float) else None, row["n"]))
    return rows


def format_table(summary: dict) -> str:
    """Markdown: one line per task/group and metric, with standard error and number of documents."""
    lines = ["| task | metric | value | ± stderr | documents |", "|---|---|---|---|---|"]
    for name, metric, value, err, n in metric_rows(summary):
        lines.append(f"| {name} | {metric} | {value:.4f} | {'' if err is None else f'{err:.4f}'} | {n} |")
    for metric, value in summary.get("average", {}).items():
        lines.append(f"| average | {metric} | {value:.4f} | | |")
    return "\n".join(lines)
