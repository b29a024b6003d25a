"""Structured pruning on SmolLM2-135M: quality, size, real speed and pruning cost at 20% and 50%.

Each method removes the given fraction of attention+MLP weights, physically (heads and MLP channels), in its
own ``prunekit prune`` process: calibrated on the same contiguous Wikipedia windows and evaluated on the same
held-out windows. Then one ``prunekit bench`` process measures the dense model and every pruned folder with
interleaved repetitions (prefill and greedy-decode tokens/s at batch 1 and 4; speed-up next to the ideal one,
the ratio of weight multiply-accumulates per token) and each one's peak memory in a fresh process.

    python benchmarks/structured.py [--out benchmarks/results] [--num_samples 32] [--eval_samples 40]

Writes ``structured.md`` (the README table), ``structured.json`` and ``structured.png``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import common

FLAP_AL = ["--strategy", "flap", "--strategy.allocation", "adaptive"]
FLAP_UL = ["--strategy", "flap", "--strategy.allocation", "uniform"]
METHODS = [  # (name, structure, options)
    ("magnitude-sp", "UL-UM", ["--strategy", "magnitude-sp"]),
    ("wanda-sp", "UL-UM", ["--strategy", "wanda-sp"]),
    ("flap", "UL-UM", FLAP_UL),
    ("flap", "AL-AM", FLAP_AL),
    ("flap", "AL-AM, empty layers allowed", [*FLAP_AL, "--strategy.allow_empty", "true"]),
]
RATIOS = (0.2, 0.5)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = common.data_flags(args)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        progress = common.Progress(2 + len(RATIOS) * len(METHODS))
        dense = common.run(["eval", *data], work / "dense", progress)
        folders = []
        for ratio in RATIOS:
            for i, (method, structure, options) in enumerate(METHODS):
                folder = work / f"{method}-{structure.split(',')[0]}-{i}-{int(ratio * 100)}"
                m = common.run(["prune", *data, *options, "--strategy.sparsity", str(ratio), "--eval_dense", "false"], folder,
                               progress)
                p = m["pruned"]
                layers = p["structure"]
                rows.append({"method": method, "structure": structure, "ratio": ratio, "folder": folder.name,
                             "perplexity": p["perplexity"], "removed_linear": p["pruned_fraction"],
                             "removed_params": p["params_removed_fraction"], "params": p["params_total"],
                             "prune_s": p["calibrate_prune_s"], "prune_peak_rss_mb": m["peak_rss_mb"],
                             "heads": [l["heads"] for l in layers], "mlp_channels": [l["mlp_channels"] for l in layers]})
                folders.append(str(folder))
        bench_out = work / "bench.json"
        cmd = [common.prunekit(), "bench", "--model", args.model, "--pruned", json.dumps(folders), "--batch_sizes", "[1, 4]",
               "--repeats", str(args.repeats), "--output", str(bench_out)]
        progress.step("bench")
        print("$", " ".join(cmd[1:]), flush=True)
        common.command(cmd[1:])
        speed = json.loads(bench_out.read_text())
    dense_name = Path(args.model).name
    dense_row = {"method": "dense", "structure": "-", "ratio": 0.0, "folder": dense_name,
                 "perplexity": dense["perplexity"], "removed_linear": 0.0, "removed_params": 0.0,
                 "params": dense["params_total"], "prune_s": None, "prune_peak_rss_mb": None}
    rows.insert(0, dense_row)
    for row in rows:
        for b in (1, 4):
            s = next(r for r in speed if r["model"] == row["folder"] and r["batch"] == b)
            row[f"b{b}"] = {k: s[k] for k in ("prefill_tok_s", "decode_tok_s", "latency_ms_per_token", "decode_speedup",
                                               "prefill_speedup", "ideal_speedup", "decode_vs_ideal", "peak_rss_mb")}
    meta = {"model": args.model, "calibration": f"wiki, {args.num_samples} x {args.seq_len} tokens, contiguous",
            "evaluation": f"wiki held-out, {args.eval_samples} x {args.seq_len} tokens",
            "bench": f"prompt 128 tokens, 32 new tokens, median of {args.repeats} interleaved repetitions",
            "threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
            "total_s": time.time() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps({"meta": meta, "rows": rows, "bench": speed}, indent=2))
    table = format_table(rows, meta)
    (args.out / "structured.md").write_text(table + "\n")
    print("\n" + table)
    plot(rows, args.out / "structured.png", meta)


def format_table(rows: list[dict], meta: dict) -> str:
    lines = [f"{Path(meta['model']).name}, structured ({meta['calibration']}; evaluation {meta['evaluation']}; speed: "
             f"{meta['bench']}; {meta['cpu_count']} CPU cores)", "",
             "| method | structure | requested | removed (attn+MLP / all params) | params | perplexity "
             "| prefill tok/s (b=1) | decode tok/s b=1: speed-up / ideal | decode b=4: speed-up / ideal "
             "| pruning (s) | peak MB (b=1 run) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b1, b4 = r["b1"], r["b4"]
        t = f"{r['prune_s']:.1f}" if r["prune_s"] is not None else "-"
        req = f"{r['ratio']:.0%}" if r["method"] != "dense" else "-"
        lines.append(
            f"| {r['method']} | {r['structure']} | {req} | {r['removed_linear']:.1%} / {r['removed_params']:.1%} | "
            f"{r['params'] / 1e6:.1f}M | {r['perplexity']:.2f} | {b1['prefill_tok_s']:.0f} | "
            f"{b1['decode_tok_s']:.1f}: {b1['decode_speedup']:.2f}x / {b1['ideal_speedup']:.2f}x | "
            f"{b4['decode_tok_s']:.1f}: {b4['decode_speedup']:.2f}x / {b4['ideal_speedup']:.2f}x | {t} | "
            f"{b1['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"{m} {s.split(',')[0]}" + (" +empty" if "empty" in s else "") for m, s, _ in METHODS]
    width = 0.38
    dense = rows[0]
    for j, ratio in enumerate(RATIOS):
        sel = [r for r in rows if r["ratio"] == ratio]
        xs = [i + (j - 0.5) * width for i in range(len(sel))]
        bars = left.bar(xs, [r["perplexity"] for r in sel], width, label=f"{ratio:.0%}")
        left.bar_label(bars, fmt="%.0f", fontsize=7)
        right.scatter([r["b1"]["ideal_speedup"] for r in sel], [r["b1"]["decode_speedup"] for r in sel],
                      label=f"{ratio:.0%}, batch 1", marker="o")
        right.scatter([r["b4"]["ideal_speedup"] for r in sel], [r["b4"]["decode_speedup"] for r in sel],
                      label=f"{ratio:.0%}, batch 4", marker="^")
    left.axhline(dense["perplexity"], color="black", linestyle="--", linewidth=1, label=f"dense ({dense['perplexity']:.1f})")
    left.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("perplexity (log scale, lower is better)")
    left.set_title(f"quality ({meta['evaluation']})", fontsize=9)
    left.legend(fontsize=8)
    top = max(r[f"b{b}"]["ideal_speedup"] for r in rows for b in (1, 4)) * 1.05
    right.plot([1, top], [1, top], color="black", linewidth=1, label="ideal (MAC ratio)")
    right.plot([1, top], [1, 0.9 * top], color="grey", linestyle="--", linewidth=1, label="0.9 of ideal")
    right.set_xlabel("ideal decode speed-up")
    right.set_ylabel("measured decode speed-up")
    right.set_title(f"speed ({meta['bench']})", fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(f"{Path(meta['model']).name}, structured pruning", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
