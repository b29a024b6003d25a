"""Results suite: method × ratio → perplexity, each task's accuracy, average, parameters, decode tokens/s, plots.

Each method prunes the model in its own ``prunekit prune`` process (saving the pruned folder), each folder is
evaluated by ``prunekit eval --tasks [perplexity, <tasks>]`` in its own process, and one ``prunekit bench``
process measures decode speed of all folders against the dense model (interleaved repetitions).

    python benchmarks/suite.py [--model gemma3-270m] [--methods all] [--tasks seap7] [--limit 200] [--ratios 0.2 0.5]
                               [--work runs/suite-gemma] [--name suite-gemma3-270m] [--out benchmarks/results]

Methods: ``magnitude``, ``wanda``, ``sparsegpt`` (unstructured at each ratio), ``wanda-2:4``, ``sparsegpt-2:4``
(the pattern fixes the ratio: run once), ``wanda-sp``, ``flap`` (structured, default head unit: whole KV groups),
``wanda-sp-query``, ``flap-query`` (single query heads as the head unit), ``seap``, ``seap-gen`` (task experts
and SEAP-gen, calibrated on ``--task_prompts`` answered prompts per task of seap7 plus as many wiki paragraphs),
``griffin`` (density 1 − ratio of the MLP neurons in generation), ``shadowllm`` and ``dejavu`` (dynamic, per
input; predictors trained on ``--task_prompts`` task documents per shadow7 task). ``all`` runs every method.

Writes ``<name>.md`` (table), ``<name>.json`` and ``<name>_perplexity.png`` / ``<name>_accuracy.png``; ``--work``
keeps every run and resumes an interrupted suite: finished steps are reused, and so is the speed measurement when
every model of the run was measured in it (a later run with ``--tasks`` over a finished ``--tasks none`` suite
adds the zero-shot columns without re-timing anything). ``--tasks none``: perplexity, size and speed only.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import common

UNSTRUCTURED = {"magnitude": ["--strategy", "magnitude"], "wanda": ["--strategy", "wanda"],
                "sparsegpt": ["--strategy", "sparsegpt"]}
PATTERNS = {"wanda-2:4": ["--strategy", "wanda", "--strategy.pattern", "2:4"],
            "sparsegpt-2:4": ["--strategy", "sparsegpt", "--strategy.pattern", "2:4"]}
STRUCTURED = {"wanda-sp": ["--strategy", "wanda-sp"], "flap": ["--strategy", "flap"],
              "wanda-sp-query": ["--strategy", "wanda-sp", "--strategy.head_unit", "query"],
              "flap-query": ["--strategy", "flap", "--strategy.head_unit", "query"]}
TASK_EXPERTS = {"seap": ["--config", "configs/seap.yaml"], "seap-gen": ["--config", "configs/seap-gen.yaml"]}
DYNAMIC = {"griffin": ["--config", "configs/griffin.yaml"], "shadowllm": ["--config", "configs/shadowllm.yaml"],
           "dejavu": ["--config", "configs/dejavu.yaml"]}
METHODS = {**UNSTRUCTURED, **PATTERNS, **STRUCTURED, **TASK_EXPERTS, **DYNAMIC}
DEFAULT_METHODS = ["wanda", "sparsegpt", "wanda-sp", "flap"]
ROOT = Path(__file__).resolve().parents[1]


def prune_options(method: str, ratio: float, task_prompts: int) -> list[str]:
    """The ``prunekit prune`` options of a method at a ratio (config paths made absolute)."""
    opts = [str(ROOT / o) if o.startswith("configs/") else o for o in METHODS[method]]
    if method in PATTERNS:
        return opts
    if method == "griffin":
        return [*opts, "--strategy.density", str(round(1 - ratio, 6))]
    opts += ["--strategy.sparsity", str(ratio)]
    if method in TASK_EXPERTS:
        opts += ["--config", str(ROOT / "configs/data/seap-tasks.yaml"), "--data.num_samples", str(task_prompts)]
    if method in ("shadowllm", "dejavu"):
        opts += ["--config", str(ROOT / "configs/data/shadow-tasks.yaml"), "--data.num_samples", str(task_prompts)]
    return opts


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=[*METHODS, "all"])
    parser.add_argument("--task_prompts", type=int, default=64,
                        help="task-calibrated methods (seap, seap-gen, shadowllm, dejavu): documents per task")
    parser.add_argument("--name", default="suite", help="file stem of the table, JSON and plots")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep every run here and reuse finished ones (default: a temporary folder)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument("--structured_ratios", nargs="+", type=float, default=None,
                        help="ratios of the structured and task-expert methods (default: --ratios)")
    parser.add_argument("--tasks", default="seap7",
                        help="comma-separated tasks or groups for prunekit eval ('none': perplexity, size and speed only)")
    parser.add_argument("--limit", type=float, default=200, help="documents per task (0 = all)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if "all" in args.methods:
        args.methods = list(METHODS)
    data = common.data_flags(args)
    task_flags = ["--tasks", f"[perplexity,{args.tasks}]", *(["--limit", f"{args.limit:g}"] if args.limit else [])]
    tasks_only = ["--tasks", f"[{args.tasks}]", *task_flags[2:]]
    if args.tasks == "none":  # perplexity, size and speed only: no zero-shot step for the pruned models
        task_flags, tasks_only = ["--tasks", "[perplexity]"], None
    started = time.time()
    rows = []
    structured = args.structured_ratios or args.ratios
    runs = [(m, None) if m in PATTERNS else (m, r) for m in args.methods
            for r in (structured if m in STRUCTURED or m in TASK_EXPERTS else args.ratios)]
    runs = list(dict.fromkeys(runs))  # a pattern runs once
    progress = common.Progress(2 + (2 if tasks_only else 1) * len(runs))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        reuse = args.work is not None
        evaluations = {"dense": common.run(["eval", *data, *task_flags, *common.dense_cache_flags(args)],
                                           work / "dense-eval", progress, reuse)}
        folders = {}
        for method, ratio in runs:
            name = method if ratio is None else f"{method}-{int(round(ratio * 100))}"
            pruned = common.run(["prune", *data, *prune_options(method, ratio, args.task_prompts),
                                 "--eval_dense", "false"], work / name, progress, reuse)
            # the prune step already measured perplexity on the same held-out windows: the eval step scores tasks
            scored = (common.run(["eval", *data, "--model", str(work / name), *tasks_only], work / f"{name}-eval",
                                 progress, reuse) if tasks_only else
                      {k: pruned["pruned"][k] for k in ("params_total", "params_nonzero")})
            evaluations[name] = {**_with_perplexity(scored, pruned["pruned"]),
                                 "prune_s": pruned["pruned"]["calibrate_prune_s"], "method": method,
                                 "ratio": 0.5 if ratio is None else ratio,
                                 "pruned_fraction": None if method in DYNAMIC else max(
                                     pruned["pruned"].get("pruned_fraction") or 0,
                                     pruned["pruned"].get("params_removed_fraction") or 0)}
            folders[name] = str(work / name)
        bench_out = work / "bench.json"
        cmd = [common.prunekit(), "bench", "--model", args.model, "--pruned", json.dumps(list(folders.values())),
               "--batch_sizes", "[1]", "--repeats", str(args.repeats), "--peak_memory", "false",
               "--output", str(bench_out)]
        progress.step("bench")
        speed = {r["model"]: r for r in json.loads(bench_out.read_text())} if reuse and bench_out.is_file() else {}
        if all(Path(f).name in speed for f in [args.model, *folders.values()]):
            print(f"reusing {bench_out} (every model measured earlier, in one process)", flush=True)
        else:
            print("$", " ".join(cmd[1:]), flush=True)
            common.command(cmd[1:])
            speed = {r["model"]: r for r in json.loads(bench_out.read_text())}
    dense_name = Path(args.model).name
    task_names = sorted(evaluations["dense"].get("tasks", {}).get("tasks", {})) if tasks_only else []
    for name, ev in evaluations.items():
        folder = dense_name if name == "dense" else name
        if "perplexity" not in ev and "wiki" in ev.get("members", {}):
            # a plan set (seap): its row shows the general (wiki) expert's perplexity and size; tasks use their own
            ev = {**ev, **{k: ev["members"]["wiki"][k] for k in ("perplexity", "params_total", "params_nonzero")}}
        accs = {t: v.get("acc") for t, v in ev.get("tasks", {}).get("tasks", {}).items()}
        rows.append({"name": name, "method": ev.get("method", "dense"), "ratio": ev.get("ratio", 0.0),
                     "perplexity": ev["perplexity"], "params": ev["params_total"], "params_nonzero": ev["params_nonzero"],
                     **{f"acc/{t}": a for t, a in accs.items()},
                     "average_acc": ev.get("tasks", {}).get("average", {}).get("acc"),
                     "decode_tok_s": speed[folder]["decode_tok_s"], "decode_speedup": speed[folder]["decode_speedup"],
                     "prune_s": ev.get("prune_s"), "pruned_fraction": ev.get("pruned_fraction")})
    meta = {"model": args.model, "tasks": args.tasks, "limit": args.limit,
            "calibration": f"wiki, {args.num_samples} x {args.seq_len} tokens",
            "perplexity": f"wiki held-out, {args.eval_samples} x {args.seq_len} tokens",
            "threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(), "total_s": time.time() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = format_table(rows, task_names, meta)
    (args.out / f"{args.name}.md").write_text(table + "\n")
    print("\n" + table)
    from prunekit.plots import metric_vs_ratio

    dense = rows[0]
    pruned_rows = [r for r in rows if r["method"] != "dense"]
    model = Path(args.model).name
    metric_vs_ratio(pruned_rows, "perplexity", args.out / f"{args.name}_perplexity.png", title=f"{model}: {meta['perplexity']}",
                    log_scale=True, dense=dense["perplexity"])
    if not task_names:
        return
    metric_vs_ratio(pruned_rows, "average_acc", args.out / f"{args.name}_accuracy.png",
                    title=f"{model}: mean acc over {args.tasks}" + (f" (first {args.limit:g} docs each)" if args.limit else ""),
                    dense=dense["average_acc"])


def _with_perplexity(evaluation: dict, pruned: dict) -> dict:
    """An eval step's metrics with the prune step's perplexity (a plan set's: its members', wiki's in the row)."""
    if "perplexity" in pruned:
        return {**evaluation, "perplexity": pruned["perplexity"]}
    if "wiki" in pruned.get("members", {}):
        return {**evaluation, "members": {**evaluation.get("members", {}), "wiki": pruned["members"]["wiki"]}}
    return evaluation


def format_table(rows: list[dict], task_names: list[str], meta: dict) -> str:
    accuracy = ["average acc"] if task_names else []  # --tasks none: perplexity, size and speed only
    head = ["model", "ratio (achieved)", "perplexity", *task_names, *accuracy, "params (non-zero)",
            "decode tok/s (b=1)", "pruning (s)"]
    lines = common.task_table_head(meta, "results suite", head, tasks=bool(task_names))
    for r in rows:
        t = f"{r['prune_s']:.0f}" if r.get("prune_s") is not None else "-"
        # dynamic methods zero nothing in the weights: their ratio is per input, no achieved fraction
        achieved = f" ({r['pruned_fraction']:.1%})" if r.get("pruned_fraction") else ""
        cells = [r["name"], f"{r['ratio']:.0%}{achieved}", f"{r['perplexity']:.2f}",
                 *(common.acc_cells(r, task_names) if task_names else []), f"{r['params_nonzero'] / 1e6:.1f}M",
                 f"{r['decode_tok_s']:.1f} ({r['decode_speedup']:.2f}x)", t]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
