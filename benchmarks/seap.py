"""The SEAP paper's Table 1 (and Tables 2–3) on SmolLM2: seap, seap-gen, wanda-sp and flap at 20% and 50%.

Every method uses SEAP's logistic layer schedule (first and last 2 layers dense), as the paper's Table 1.
``seap`` and ``seap-gen`` calibrate on the seven tasks' reserved calibration prompts (each rendered with its
gold answer, up to ``num_prompts`` per task: WinoGrande has 124, PIQA 170) plus ``num_prompts`` wiki
paragraphs (the general source, seap-gen's weight 3 against 2 per task), in one pass whose saved statistics
every later seap/seap-gen run reads (``prunekit prune --statistics``); ``seap`` makes one expert per task and each task is scored
with its own expert (oracle routing, as the paper), plus a task router trained on calibration prompts and
scored on held-out ones. The baselines calibrate on wiki windows. Each model gets perplexity (wiki
held-out) and lm-eval accuracy on the seven tasks (first ``limit`` documents each); one ``prunekit bench``
process measures decode tokens/s (Table 2; seap's experts have the same per-layer widths as seap-gen under
the logistic schedule, so seap-gen's folder stands for them). ``--allocations`` adds the UL/AL/LB comparison
of seap (Table 3) at the first ratio.

    python benchmarks/seap.py [--ratios 0.2 0.5] [--limit 100] [--num_prompts 200] [--allocations]
                              [--work DIR (keep runs; resume)] [--no-bench]

Writes ``seap.md``, ``seap.json``, ``seap_accuracy.png``, ``seap_accuracy_above_chance.png`` and
``seap_perplexity.png`` (logistic schedule; the tasks "above chance" are those the dense model beats blind
answering on).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import common

TASKS = ["winogrande", "openbookqa", "hellaswag", "piqa", "arc_easy", "arc_challenge", "boolq"]  # Table 1 order
# What answering blindly scores: 1 / choices, and for BoolQ always "yes" (62% of its validation split). A task the
# dense model does not beat this on measures how pruning moves the model's answer prior, not what it kept.
CHANCE = {"winogrande": 0.5, "openbookqa": 0.25, "hellaswag": 0.25, "piqa": 0.5, "arc_easy": 0.25,
          "arc_challenge": 0.25, "boolq": 0.62}
LOGISTIC = ["--strategy.allocation", "logistic"]


def task_data(num_prompts: int) -> list[str]:
    return ["--data.corpus", "task", "--data.corpus_options", f"{{tasks: [seap7], general: wiki}}",
            "--data.packing", "documents", "--data.sampling", "random", "--data.num_samples", str(num_prompts),
            "--data.allow_fewer", "true"]  # WinoGrande reserves 124 calibration prompts, PIQA 170


def methods(num_prompts: int, allocation: str = "logistic") -> dict[str, list[str]]:
    alloc = ["--strategy.allocation", allocation]
    return {
        "seap": ["--strategy", "seap", "--strategy.tasks", "[all]", *alloc, *task_data(num_prompts)],
        "seap-gen": ["--strategy", "seap-gen", *alloc, *task_data(num_prompts)],
        "wanda-sp": ["--strategy", "wanda-sp", *alloc],
        "flap": ["--strategy", "flap", *alloc],
    }


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument("--limit", type=float, default=100, help="documents per task (0 = all)")
    parser.add_argument("--num_prompts", type=int, default=200, help="calibration prompts per task (seap, seap-gen)")
    parser.add_argument("--methods", nargs="+", default=list(methods(1)), choices=list(methods(1)))
    parser.add_argument("--allocations", action="store_true", help="also seap with uniform and adaptive (Table 3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True,
                        help="measure decode tokens/s (--no-bench: accuracy and perplexity only)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep every run's folder here and reuse finished ones (resume); default: a temporary folder")
    args = parser.parse_args()
    data = common.data_flags(args)
    task_flags = ["--tasks", "[perplexity,seap7]", *(["--limit", f"{args.limit:g}"] if args.limit else [])]
    runs = [(m, r, "logistic") for r in args.ratios for m in args.methods]
    if args.allocations:
        runs += [("seap", args.ratios[0], a) for a in ("uniform", "adaptive")]
    progress = common.Progress(2 + 2 * len(runs))
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        dense = common.run(["eval", *data, *task_flags, *common.dense_cache_flags(args)], work / "dense-eval",
                           progress, reuse=True)
        rows.append(_row("dense", "-", 0.0, dense, None))
        folders, statistics = {}, None
        for method, ratio, allocation in runs:
            name = f"{method}-{allocation}-{int(round(ratio * 100))}"
            options = methods(args.num_prompts, allocation)[method]
            if method in ("seap", "seap-gen"):  # one calibration pass serves every seap/seap-gen run
                options += (["--statistics", str(statistics)] if statistics else ["--save_statistics", "true"])
            if method == "seap" and any(r.get("router") for r in rows):
                options += ["--strategy.router", "false"]  # the router does not depend on the ratio: trained once
            pruned = common.run(["prune", *data, *options, "--strategy.sparsity", str(ratio), "--eval_dense", "false"],
                                work / name, progress, reuse=True)
            if method in ("seap", "seap-gen") and statistics is None:
                statistics = work / name / "statistics.safetensors"
            # a task-routed folder's own perplexity is the dense model's; the experts' come from the prune step
            flags = ["--tasks", "[seap7]", *task_flags[2:]] if method == "seap" else task_flags
            evaluated = common.run(["eval", *data, "--model", str(work / name), *flags], work / f"{name}-eval",
                                   progress, reuse=True)
            rows.append(_row(method, allocation, ratio, evaluated, pruned))
            if method != "seap":
                folders[name] = str(work / name)
        speed = {}
        bench_out = work / "bench.json"
        cmd = [common.prunekit(), "bench", "--model", args.model, "--pruned", json.dumps(list(folders.values())),
               "--batch_sizes", "[1]", "--repeats", str(args.repeats), "--peak_memory", "false", "--output", str(bench_out)]
        progress.step("bench")
        if args.bench:
            print("$", " ".join(cmd[1:]), flush=True)
            common.command(cmd[1:])
            speed = {r["model"]: r for r in json.loads(bench_out.read_text())}
    for row in rows:
        key = Path(args.model).name if row["method"] == "dense" else f"{row['method']}-{row['allocation']}-{int(round(row['ratio'] * 100))}"
        if row["method"] == "seap":  # experts share seap-gen's per-layer widths under the same schedule
            key = key.replace("seap-", "seap-gen-", 1)
        if key in speed:
            row["decode_tok_s"], row["decode_speedup"] = speed[key]["decode_tok_s"], speed[key]["decode_speedup"]
    meta = {"model": args.model, "limit": args.limit, "num_prompts": args.num_prompts,
            "calibration": f"seap/seap-gen: up to {args.num_prompts} answered prompts per task (WinoGrande has 124, "
                           f"PIQA 170) + {args.num_prompts} wiki paragraphs, one pass; "
                           f"baselines: wiki, {args.num_samples} x {args.seq_len} tokens",
            "perplexity": f"wiki held-out, {args.eval_samples} x {args.seq_len} tokens",
            "cpu_count": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS"), "total_s": time.time() - started}
    signal = signal_tasks(rows[0])
    for r in rows:
        r["average_above_chance"] = sum(r[f"acc/{t}"] for t in signal) / len(signal) if signal else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seap.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = format_table(rows, meta)
    (args.out / "seap.md").write_text(table + "\n")
    print("\n" + table)
    plots(rows, meta, args.out)


def plots(rows: list[dict], meta: dict, out: Path) -> None:
    """Accuracy (all seven tasks, and the above-chance ones) and perplexity against the ratio, logistic schedule."""
    from prunekit.plots import metric_vs_ratio

    signal = signal_tasks(rows[0])
    logistic = [r for r in rows if r["allocation"] == "logistic"]
    name, limit = Path(meta["model"]).name, f", first {meta['limit']:g} docs" if meta["limit"] else ""
    metric_vs_ratio(logistic, "average_acc", out / "seap_accuracy.png", dense=rows[0]["average_acc"],
                    title=f"{name}: mean acc, seven tasks{limit}")
    metric_vs_ratio(logistic, "average_above_chance", out / "seap_accuracy_above_chance.png",
                    dense=rows[0]["average_above_chance"], title=f"{name}: mean acc, {', '.join(signal)}{limit}")
    metric_vs_ratio(logistic, "perplexity", out / "seap_perplexity.png", dense=rows[0]["perplexity"],
                    log_scale=True, title=f"{name}: perplexity, {meta['perplexity']}")


def _row(method: str, allocation: str, ratio: float, ev: dict, pruned: dict | None) -> dict:
    tasks = ev.get("tasks", {}).get("tasks", {})
    row = {"method": method, "allocation": allocation, "ratio": ratio, "perplexity": ev.get("perplexity"),
           **{f"acc/{t}": tasks.get(t, {}).get("acc") for t in TASKS},
           **{f"acc_norm/{t}": tasks.get(t, {}).get("acc_norm") for t in TASKS},
           "average_acc": ev.get("tasks", {}).get("average", {}).get("acc"),
           "params": ev["params_total"], "experts": ev.get("tasks", {}).get("members")}
    if pruned is not None:
        row["prune_s"] = pruned["pruned"]["calibrate_prune_s"]
        members = pruned["pruned"].get("members")
        if members:  # seap: per-expert removed fraction and perplexity, the router's held-out figures
            row["removed"] = sum(e["pruned_fraction"] for e in members.values()) / len(members)
            row["expert_perplexity"] = {t: e["perplexity"] for t, e in members.items()}
            task_ppl = [p for t, p in row["expert_perplexity"].items() if t in TASKS]
            row["perplexity"] = sum(task_ppl) / len(task_ppl)  # the mean over the seven task experts
            row["router"] = pruned["pruned"].get("router")
            row["params"] = sum(e["params_total"] for e in members.values()) / len(members)
        else:
            row["removed"] = pruned["pruned"]["pruned_fraction"]
    return row


def signal_tasks(dense: dict) -> list[str]:
    """The tasks the dense model scores above chance on (``CHANCE``)."""
    return [t for t in TASKS if dense.get(f"acc/{t}") is not None and dense[f"acc/{t}"] > CHANCE[t]]


def format_table(rows: list[dict], meta: dict) -> str:
    signal = signal_tasks(rows[0])
    head = ["method", "schedule", "ratio", *TASKS, "average", "average above chance", "perplexity", "params",
            "decode tok/s (b=1)"]
    lines = common.task_table_head(meta, "SEAP Table 1", head)
    for r in rows:
        speed = f"{r['decode_tok_s']:.1f} ({r['decode_speedup']:.2f}x)" if "decode_tok_s" in r else "-"
        ratio = f"{r['ratio']:.0%}" if r["method"] != "dense" else "-"
        above = f"{r['average_above_chance']:.3f}" if r.get("average_above_chance") is not None else "-"
        lines.append(f"| {r['method']} | {r['allocation']} | {ratio} | " + " | ".join(common.acc_cells(r, TASKS)) +
                     f" | {above} | {r['perplexity']:.2f} | {r['params'] / 1e6:.1f}M | {speed} |")
    lines += ["", f"\"average above chance\": the tasks the dense model beats blind answering on ({', '.join(signal)}; "
              "chance = 1/choices, BoolQ's = 0.62 for always \"yes\"). seap's perplexity is the mean over its seven "
              "task experts (each expert's is in seap.json)."]
    routers = [r for r in rows if r.get("router")]
    if routers:
        rt = routers[0]["router"]
        lines += ["", f"Task router (seap): held-out accuracy {rt['accuracy']:.3f} over {len(rt['per_task'])} tasks "
                  f"(chance {rt['chance']:.2f}), macro F1 {rt['macro_f1']:.3f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
