"""Results suite: method × ratio → perplexity, each task's accuracy, average, parameters, decode tokens/s, plots.

Each method prunes the model in its own ``prunekit prune`` process (saving the pruned folder), each folder is
evaluated by ``prunekit eval --tasks [perplexity, <tasks>]`` in its own process, and one ``prunekit bench``
process measures decode speed of all folders against the dense model (interleaved repetitions).

    python benchmarks/suite.py [--tasks seap7] [--limit 200] [--ratios 0.2 0.5] [--out benchmarks/results]

Writes ``suite.md`` (table), ``suite.json`` and ``suite_perplexity.png`` / ``suite_accuracy.png``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import common

METHODS = {  # name -> prune options; unstructured methods zero weights, structured ones cut them
    "wanda": ["--strategy", "wanda"],
    "sparsegpt": ["--strategy", "sparsegpt"],
    "wanda-sp": ["--strategy", "wanda-sp"],
    "flap": ["--strategy", "flap"],
}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument("--tasks", default="seap7", help="comma-separated tasks or groups for prunekit eval")
    parser.add_argument("--limit", type=float, default=200, help="documents per task (0 = all)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = common.data_flags(args)
    task_flags = ["--tasks", f"[perplexity,{args.tasks}]", *(["--limit", f"{args.limit:g}"] if args.limit else [])]
    started = time.time()
    rows = []
    progress = common.Progress(2 + 2 * len(args.methods) * len(args.ratios))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        evaluations = {"dense": common.run(["eval", *data, *task_flags], work / "dense-eval", progress)}
        folders = {}
        for method in args.methods:
            for ratio in args.ratios:
                name = f"{method}-{int(round(ratio * 100))}"
                pruned = common.run(["prune", *data, *METHODS[method], "--strategy.sparsity", str(ratio),
                                     "--eval_dense", "false"], work / name, progress)
                evaluations[name] = {**common.run(["eval", *data, "--model", str(work / name), *task_flags],
                                                  work / f"{name}-eval", progress),
                                     "prune_s": pruned["pruned"]["calibrate_prune_s"], "method": method, "ratio": ratio}
                folders[name] = str(work / name)
        bench_out = work / "bench.json"
        cmd = [common.prunekit(), "bench", "--model", args.model, "--pruned", json.dumps(list(folders.values())),
               "--batch_sizes", "[1]", "--repeats", str(args.repeats), "--peak_memory", "false",
               "--output", str(bench_out)]
        progress.step("bench")
        print("$", " ".join(cmd[1:]), flush=True)
        common.command(cmd[1:])
        speed = {r["model"]: r for r in json.loads(bench_out.read_text())}
    dense_name = Path(args.model).name
    task_names = sorted(evaluations["dense"].get("tasks", {}).get("tasks", {}))
    for name, ev in evaluations.items():
        folder = dense_name if name == "dense" else name
        accs = {t: v.get("acc") for t, v in ev.get("tasks", {}).get("tasks", {}).items()}
        rows.append({"name": name, "method": ev.get("method", "dense"), "ratio": ev.get("ratio", 0.0),
                     "perplexity": ev["perplexity"], "params": ev["params_total"], "params_nonzero": ev["params_nonzero"],
                     **{f"acc/{t}": a for t, a in accs.items()},
                     "average_acc": ev.get("tasks", {}).get("average", {}).get("acc"),
                     "decode_tok_s": speed[folder]["decode_tok_s"], "decode_speedup": speed[folder]["decode_speedup"],
                     "prune_s": ev.get("prune_s")})
    meta = {"model": args.model, "tasks": args.tasks, "limit": args.limit,
            "calibration": f"wiki, {args.num_samples} x {args.seq_len} tokens",
            "perplexity": f"wiki held-out, {args.eval_samples} x {args.seq_len} tokens",
            "threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(), "total_s": time.time() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = format_table(rows, task_names, meta)
    (args.out / "suite.md").write_text(table + "\n")
    print("\n" + table)
    from prunekit.plots import metric_vs_ratio

    dense = rows[0]
    pruned_rows = [r for r in rows if r["method"] != "dense"]
    model = Path(args.model).name
    metric_vs_ratio(pruned_rows, "perplexity", args.out / "suite_perplexity.png", title=f"{model}: {meta['perplexity']}",
                    log_scale=True, dense=dense["perplexity"])
    metric_vs_ratio(pruned_rows, "average_acc", args.out / "suite_accuracy.png",
                    title=f"{model}: mean acc over {args.tasks}" + (f" (first {args.limit:g} docs each)" if args.limit else ""),
                    dense=dense["average_acc"])


def format_table(rows: list[dict], task_names: list[str], meta: dict) -> str:
    head = ["model", "ratio", "perplexity", *task_names, "average acc", "params (non-zero)", "decode tok/s (b=1)",
            "pruning (s)"]
    lines = common.task_table_head(meta, "results suite", head)
    for r in rows:
        t = f"{r['prune_s']:.0f}" if r.get("prune_s") is not None else "-"
        lines.append(f"| {r['name']} | {r['ratio']:.0%} | {r['perplexity']:.2f} | " +
                     " | ".join(common.acc_cells(r, task_names)) +
                     f" | {r['params_nonzero'] / 1e6:.1f}M | {r['decode_tok_s']:.1f} ({r['decode_speedup']:.2f}x) | {t} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
