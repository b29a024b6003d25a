"""Zero-shot throughput: lm-eval's ``HFLM`` against prefix sharing (``prunekit.fastlm.PrefixSharingLM``).

Both score the same lm-eval requests of the same model instance in this process through
``prunekit.zeroshot.evaluate_tasks`` (``prefix_sharing=False`` / ``True``):

1. Each task alone (default: the seven of ``seap7``), both ways, alternating which runs first from one task to
   the next so that drift from other work on the machine falls on both; with ``--repeats N`` each way N times
   (alternating) and the fastest kept, the usual estimate on a shared machine. The 1-minute load average is
   recorded around every measurement.
2. All the tasks in one call each way, as ``prunekit eval --tasks [seap7]`` runs them (lm-eval sorts and batches
   every task's requests together).

Reported per task: log-likelihood requests, seconds inside lm-eval's ``loglikelihood`` call (the scoring; task
building and metrics are the same for both and reported as whole-call wall time), requests/s, the speed-up,
whether every metric lm-eval reports (acc, acc_norm and their standard errors) is identical, the largest
per-request difference in log-likelihood and the number of is-greedy disagreements.

    OMP_NUM_THREADS=2 flock /tmp/prunekit-bench.lock python benchmarks/zeroshot.py [--limit 100] [--tasks ...]

Writes ``zeroshot.md`` (the README table), ``zeroshot.json`` and ``zeroshot.png``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import common

SEAP7 = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]
MODES = {False: "lm-eval HFLM", True: "shared contexts"}


def run(model, tokenizer, tasks: list[str], args, sharing: bool) -> dict:
    from prunekit.zeroshot import evaluate_tasks

    load = os.getloadavg()[0]
    start = time.perf_counter()
    summary = evaluate_tasks(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                             prefix_sharing=sharing, log_samples=True)
    wall = time.perf_counter() - start
    scored = summary["config"]["scoring"]["requests"]["loglikelihood"]
    print(f"  {MODES[sharing]}: {scored['requests']} requests in {scored['seconds']:.1f} s "
          f"({scored['requests'] / scored['seconds']:.1f}/s; call {wall:.1f} s)", flush=True)
    return {"summary": summary, "requests": scored["requests"], "seconds": scored["seconds"], "wall_s": wall,
            "plain_fallback": summary["config"]["scoring"].get("plain_fallback"),
            "load": [load, os.getloadavg()[0]]}


def best(model, tokenizer, tasks: list[str], args, first: bool) -> dict[bool, dict]:
    """Each way ``args.repeats`` times, alternating (``first`` starts); the fastest scoring of each way, with the
    seconds and load averages of every repetition."""
    times: dict[bool, list] = {False: [], True: []}
    kept: dict[bool, dict] = {}
    for k in range(args.repeats):
        for sharing in ((first, not first) if k % 2 == 0 else (not first, first)):
            r = run(model, tokenizer, tasks, args, sharing)
            times[sharing].append({"seconds": r["seconds"], "wall_s": r["wall_s"], "load": r["load"]})
            if sharing not in kept or r["seconds"] < kept[sharing]["seconds"]:
                kept[sharing] = r
    for sharing, r in kept.items():
        r["repetitions"] = times[sharing]
    return kept


def compare(plain: dict, fast: dict) -> dict:
    """Metrics identical? Largest per-request |Δ log-likelihood| and is-greedy disagreements. And how close the
    rankings came to flipping: per document and ranking (log-likelihood for acc, per character for acc_norm),
    the gap between the best two choices against twice the document's largest difference in that ranking; a
    document is "at risk" when the gap is smaller (then identical metrics would be luck)."""
    a, b = plain["summary"], fast["summary"]
    diff, greedy, count, at_risk = 0.0, 0, 0, 0
    margin = {"loglik": float("inf"), "per_char": float("inf")}
    for task, docs in a["raw"]["samples"].items():
        for doc, other in zip(docs, b["raw"]["samples"][task], strict=True):
            assert doc["doc_id"] == other["doc_id"] and doc["arguments"] == other["arguments"]
            pairs = [(ref, got) for (ref,), (got,) in zip(doc["resps"], other["resps"], strict=True)]
            for ref, got in pairs:
                diff = max(diff, abs(ref[0] - got[0]))
                greedy += ref[1] != got[1]
                count += 1
            if len(pairs) < 2:
                continue
            lengths = [max(len(arg[1]), 1) for arg in doc["arguments"]]
            for space, scale in (("loglik", [1] * len(pairs)), ("per_char", lengths)):
                values = sorted((ref[0] / n for (ref, _), n in zip(pairs, scale, strict=True)), reverse=True)
                gap = values[0] - values[1]
                worst = max(abs(ref[0] - got[0]) / n for (ref, got), n in zip(pairs, scale, strict=True))
                margin[space] = min(margin[space], gap)
                at_risk += gap <= 2 * worst
    return {"identical": a["tasks"] == b["tasks"] and a["groups"] == b["groups"] and a["average"] == b["average"],
            "max_abs_diff": diff, "greedy_differs": greedy, "compared": count, "min_margin": margin,
            "at_risk": at_risk}


def row(name: str, plain: dict, fast: dict) -> dict:
    metrics = {t: {k: v for k, v in m.items() if k != "n"} for t, m in fast["summary"]["tasks"].items()}
    return {"task": name, "requests": plain["requests"],
            **{f"{key}_{mode}": run_[key] for mode, run_ in (("plain", plain), ("fast", fast))
               for key in ("seconds", "wall_s")},
            "req_s_plain": plain["requests"] / plain["seconds"], "req_s_fast": fast["requests"] / fast["seconds"],
            "speedup": plain["seconds"] / fast["seconds"], "wall_speedup": plain["wall_s"] / fast["wall_s"],
            "plain_fallback": fast["plain_fallback"], "metrics": metrics, **compare(plain, fast),
            "repetitions": {"plain": plain["repetitions"], "fast": fast["repetitions"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=SEAP7)
    p.add_argument("--limit", type=float, default=100, help="documents per task")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="measurements each way (the fastest is reported)")
    p.add_argument("--no_combined", action="store_true", help="skip the all-tasks-in-one-call comparison")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    args.limit = int(args.limit) if args.limit >= 1 else args.limit
    import lm_eval
    import torch
    import transformers

    from prunekit.models import load_model, load_tokenizer
    from prunekit.zeroshot import evaluate_tasks

    started = time.time()
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    for sharing in MODES:  # warm-up: lm-eval's imports and the first forward's allocations, not measured
        evaluate_tasks(model, tokenizer, ["copa"], limit=2, batch_size=args.batch_size, prefix_sharing=sharing)
    progress = common.Progress(len(args.tasks) + (0 if args.no_combined else 1))
    rows = []
    for i, task in enumerate(args.tasks):
        progress.step(task)
        runs = best(model, tokenizer, [task], args, first=i % 2 == 1)
        rows.append(row(task, runs[False], runs[True]))
    combined = None
    if not args.no_combined:
        progress.step(f"all {len(args.tasks)} tasks in one call")
        runs = best(model, tokenizer, args.tasks, args, first=True)
        combined = row("all, one call", runs[False], runs[True])
        combined["average"] = runs[True]["summary"]["average"]
    loads = [x for r_ in rows + ([combined] if combined else []) for mode in ("plain", "fast")
             for rep in r_["repetitions"][mode] for x in rep["load"]]
    meta = {"model": args.model, "tasks": args.tasks, "limit": args.limit, "batch_size": args.batch_size,
            "repeats": args.repeats, "load_average": [min(loads), max(loads)],
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(), "versions": {"lm_eval": lm_eval.__version__, "torch": torch.__version__,
                                                      "transformers": transformers.__version__},
            "total_s": time.time() - started}
    result = {"meta": meta, "rows": rows, "combined": combined}
    common.publish(args.out, "zeroshot", result, table, plot)


def _metric_cell(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "stderr" not in k and v is not None)


def table(r: dict) -> str:
    m = r["meta"]
    rows = r["rows"]
    total_plain, total_fast = sum(x["seconds_plain"] for x in rows), sum(x["seconds_fast"] for x in rows)
    requests = sum(x["requests"] for x in rows)
    lines = [f"{Path(m['model']).name}, first {m['limit']} documents per task, lm-eval {m['versions']['lm_eval']}, "
             f"batch size {m['batch_size']}, {m['threads']} threads on {m['cpu_count']} CPU cores (1-minute load "
             f"average {m['load_average'][0]:.1f}–{m['load_average'][1]:.1f}; fastest of {m['repeats']} each way); "
             "scoring = seconds inside lm-eval's loglikelihood call, requests/s = log-likelihood requests / scoring "
             "seconds", "",
             "| task | requests | scoring (s): HFLM → shared | HFLM (req/s) | shared contexts (req/s) | speed-up "
             "| metrics (both runs) | identical | max \\|Δ log-lik.\\| | is_greedy differs |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def line(x: dict, name: str, metrics: str) -> str:
        return (f"| {name} | {x['requests']} | {x['seconds_plain']:.1f} → {x['seconds_fast']:.1f} | "
                f"{x['req_s_plain']:.1f} | {x['req_s_fast']:.1f} | {x['speedup']:.2f}x | {metrics} | "
                f"{'yes' if x['identical'] else '**no**'} | {x['max_abs_diff']:.1e} | {x['greedy_differs']} |")

    for x in rows:
        lines.append(line(x, x["task"], _metric_cell(x["metrics"][x["task"]])))
    lines.append(f"| sum of the tasks | {requests} | {total_plain:.1f} → {total_fast:.1f} | {requests / total_plain:.1f} | "
                 f"{requests / total_fast:.1f} | {total_plain / total_fast:.2f}x | | "
                 f"{'yes' if all(x['identical'] for x in rows) else '**no**'} | "
                 f"{max(x['max_abs_diff'] for x in rows):.1e} | {sum(x['greedy_differs'] for x in rows)} |")
    c = r.get("combined")
    if c:
        lines.append(line(c, "all tasks, one call", f"mean acc {c['average'].get('acc', float('nan')):.3f}"))
        lines += ["", f"Whole `evaluate_tasks` call (task building, scoring, metrics), all tasks in one call: "
                      f"{c['wall_s_plain']:.0f} s with lm-eval's HFLM, {c['wall_s_fast']:.0f} s with shared contexts "
                      f"({c['wall_speedup']:.2f}x)."]
    gaps = {space: min(x["min_margin"][space] for x in rows) for space in ("loglik", "per_char")}
    lines += ["", f"Closest calls: the smallest gap between a document's best two choices is {gaps['loglik']:.1e} in "
                  f"log-likelihood (acc) and {gaps['per_char']:.1e} per character (acc_norm); documents whose gap is "
                  f"below twice their own largest difference (where a ranking could have flipped): "
                  f"{sum(x['at_risk'] for x in rows)}."]
    fallback = sum(x.get("plain_fallback") or 0 for x in rows)
    lines += ["", f"Requests scored by lm-eval's own path inside the fast run (longer than the model's context): "
                  f"{fallback}. Total benchmark time {m['total_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(r["rows"]) + ([r["combined"]] if r.get("combined") else [])
    names = [x["task"] for x in rows]
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [x["req_s_plain"] for x in rows], 0.4, label="lm-eval HFLM")
    ax.bar([x + 0.2 for x in xs], [x["req_s_fast"] for x in rows], 0.4, label="shared contexts (PrefixSharingLM)")
    for x, row_ in zip(xs, rows):
        ax.text(x + 0.2, row_["req_s_fast"], f"{row_['speedup']:.1f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel("log-likelihood requests / s")
    m = r["meta"]
    ax.set_title(f"{Path(m['model']).name}: lm-eval scoring throughput, first {m['limit']} documents per task, "
                 f"{m['threads']} threads (identical metrics)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
