"""Streaming prune (``--calibration.streaming true``) of synthetic Llamas: peak memory against depth, time per layer.

1. Depth: random Llamas of hidden 2048 (intermediate 5632, 16 query / 4 KV heads, SmolLM2's tokenizer and
   vocabulary) with 8, 16 and 32 layers (1.9 / 3.4 / 6.6 GB of fp32 weights, written once, a layer at a time),
   pruned to 50% by Wanda and SparseGPT in streaming mode, each in its own process: peak RSS (VmHWM), wall time,
   seconds per layer. Calibration: 32 Wikipedia windows of 512 tokens (the default).
2. Equality: on the 8-layer model, where both fit, the in-memory path too; masks and weights compared bitwise.
3. Cost per layer: 2-layer models of hidden 512 / 1024 / 2048 (same shape ratios), and the hidden-1024 model with
   8 / 16 / 32 calibration windows of 512 tokens.

    python benchmarks/streaming.py [--layers 8 16 32] [--work /big/disk] [--out benchmarks/results]

Writes ``streaming.md`` (the README table), ``streaming.json`` and ``streaming.png``. Needs about 25 GB of
free disk in ``--work`` (models and one output at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import common

METHODS = {"wanda": ["--strategy", "wanda", "--strategy.sparsity", "0.5"],
           "sparsegpt": ["--strategy", "sparsegpt", "--strategy.sparsity", "0.5"]}


def shape(hidden: int) -> dict:
    return {"hidden": hidden, "intermediate": hidden * 11 // 4, "heads": max(4, hidden // 128),
            "kv_heads": max(1, hidden // 512)}


def make(folder: Path, layers: int, hidden: int) -> Path:
    from prunekit.models import load_tokenizer
    from prunekit.synthetic import write_llama

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_llama(tmp, load_tokenizer("smollm2-135m"), layers=layers, max_positions=2048, **shape(hidden))
    tmp.rename(folder)
    return folder


def size_gb(layers: int, hidden: int) -> float:
    from prunekit.models import load_tokenizer
    from prunekit.synthetic import llama_params

    s = shape(hidden)
    return llama_params(layers, s["hidden"], s["intermediate"], s["heads"], s["kv_heads"],
                        len(load_tokenizer("smollm2-135m"))) * 4 / 1e9


def prune(model: Path, method: str, out: Path, progress, samples: int, seq_len: int, streaming: bool = True) -> dict:
    args = ["prune", "--model", str(model), *METHODS[method], "--data.num_samples", str(samples),
            "--data.seq_len", str(seq_len), "--data.eval_samples", "1", "--eval_dense", "false"]
    if streaming:
        args += ["--calibration.streaming", "true"]
    m = common.run(args, out, progress)
    return {"method": method, "streaming": streaming, "peak_rss_mb": m["peak_rss_mb"], "wall_s": m["wall_s"],
            "prune_s": m["pruned"]["calibrate_prune_s"], "seconds_per_layer": m["pruned"].get("seconds_per_layer"),
            "sparsity": m["pruned"]["sparsity"]}


def same_weights(a: Path, b: Path) -> dict:
    import torch

    from prunekit.realize import load_pruned

    sa, sb = load_pruned(str(a)).state_dict(), load_pruned(str(b)).state_dict()
    differ = [k for k in sa if k not in sb or sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k])]
    masks = [k for k in sa if k in sb and sa[k].shape == sb[k].shape and not torch.equal(sa[k] == 0, sb[k] == 0)]
    return {"tensors": len(sa), "weights_differ": len(differ), "masks_differ": len(masks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--scan_hidden", type=int, nargs="*", default=[512, 1024, 2048])
    p.add_argument("--scan_samples", type=int, nargs="*", default=[8, 16, 32])
    p.add_argument("--merge", action="store_true",
                   help="Rerun only what is asked and replace those rows in the existing streaming.json.")
    p.add_argument("--work", type=Path, default=None, help="Folder for the synthetic models (kept for reuse).")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="prunekit-streaming-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = len(args.layers) * len(args.methods) + len(args.methods) \
        + len(args.methods) * (len(args.scan_hidden) + len(args.scan_samples))
    progress = common.Progress(runs)
    started = time.time()
    result: dict = {"cpu_count": os.cpu_count(), "hidden": args.hidden, "calibration":
                    f"wiki, {args.num_samples} x {args.seq_len} tokens", "depth": [], "equality": {}, "hidden_scan": [],
                    "tokens_scan": []}

    # 1. depth (and 2. equality on the smallest)
    for layers in args.layers:
        model = make(work / f"llama-{layers}x{args.hidden}", layers, args.hidden)
        for method in args.methods:
            out = work / f"out-{method}-{layers}"
            row = prune(model, method, out, progress, args.num_samples, args.seq_len)
            row.update(layers=layers, model_gb=size_gb(layers, args.hidden))
            result["depth"].append(row)
            if layers == min(args.layers):
                memory = work / f"out-{method}-{layers}-memory"
                ref = prune(model, method, memory, progress, args.num_samples, args.seq_len, streaming=False)
                ref.update(layers=layers, model_gb=row["model_gb"])
                result["depth"].append(ref)
                result["equality"][method] = same_weights(memory, out)
                shutil.rmtree(memory)
            shutil.rmtree(out)
    # 3. cost per layer against hidden size and calibration tokens
    for hidden in args.scan_hidden:
        model = make(work / f"llama-2x{hidden}", 2, hidden)
        for method in args.methods:
            out = work / f"out-{method}-h{hidden}"
            row = prune(model, method, out, progress, args.num_samples, args.seq_len)
            row.update(hidden=hidden, tokens=args.num_samples * args.seq_len)
            result["hidden_scan"].append(row)
            shutil.rmtree(out)
    model = make(work / "llama-2x1024", 2, 1024) if args.scan_samples else None
    for samples in args.scan_samples if args.scan_samples else []:
        for method in args.methods:
            out = work / f"out-{method}-n{samples}"
            row = prune(model, method, out, progress, samples, args.seq_len)
            row.update(hidden=1024, tokens=samples * args.seq_len)
            result["tokens_scan"].append(row)
            shutil.rmtree(out)
    result["total_s"] = time.time() - started
    if args.merge and (args.out / "streaming.json").is_file():
        old = json.loads((args.out / "streaming.json").read_text())
        redone = {row["layers"] for row in result["depth"]}
        old["depth"] = sorted([row for row in old["depth"] if row["layers"] not in redone] + result["depth"],
                              key=lambda row: (row["layers"], row["method"], not row["streaming"]))
        old["equality"].update(result["equality"])
        for key in ("hidden_scan", "tokens_scan"):
            old[key] = result[key] or old[key]
        old["total_s"] = old.get("total_s", 0) + result["total_s"]
        result = old
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    common.publish(args.out, "streaming", result, table, plot)


def _per_layer(row: dict) -> float:
    s = row.get("seconds_per_layer") or []
    return sum(s) / len(s) if s else float("nan")


def table(r: dict) -> str:
    lines = [f"Synthetic Llama, hidden {r['hidden']} (intermediate {shape(r['hidden'])['intermediate']}, "
             f"{shape(r['hidden'])['heads']}/{shape(r['hidden'])['kv_heads']} heads, vocabulary 49152), fp32, 50% "
             f"unstructured; calibration {r['calibration']}; {r['cpu_count']} CPU cores; peak RSS = VmHWM of the "
             "run's process", "",
             "| layers | weights (GB) | method | mode | peak RSS (GiB) | wall (s) | s / layer |",
             "|---|---|---|---|---|---|---|"]
    for row in r["depth"]:
        lines.append(f"| {row['layers']} | {row['model_gb']:.1f} | {row['method']} | "
                     f"{'streaming' if row['streaming'] else 'in memory'} | {row['peak_rss_mb'] / 1024:.2f} | "
                     f"{row['wall_s']:.0f} | {f'{_per_layer(row):.1f}' if row['streaming'] else '-'} |")
    lines += ["", "Streaming against in memory on the smallest model (every tensor of the saved folders compared):",
              ""]
    for method, eq in r["equality"].items():
        lines.append(f"- {method}: {eq['tensors']} tensors, {eq['weights_differ']} differ in any weight, "
                     f"{eq['masks_differ']} in their mask")
    lines += ["", "Seconds per layer (streaming: read, calibrate, prune, write), 2-layer models:", "",
              "| hidden | calibration tokens | method | s / layer |", "|---|---|---|---|"]
    for row in r["hidden_scan"] + r["tokens_scan"]:
        lines.append(f"| {row['hidden']} | {row['tokens']} | {row['method']} | {_per_layer(row):.2f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    stream = [row for row in r["depth"] if row["streaming"]]
    layers = sorted({row["layers"] for row in stream})
    sizes = {row["layers"]: row["model_gb"] for row in stream}
    for method in sorted({row["method"] for row in stream}):
        rows = sorted((row for row in stream if row["method"] == method), key=lambda x: x["layers"])
        a.plot([x["layers"] for x in rows], [x["peak_rss_mb"] / 1024 for x in rows], "o-", label=f"{method}, streaming")
    for row in r["depth"]:
        if not row["streaming"]:
            a.plot([row["layers"]], [row["peak_rss_mb"] / 1024], "x", ms=10, label=f"{row['method']}, in memory")
    a.plot(layers, [sizes[n] / 1.073741824 for n in layers], "k--", label="weights alone (GiB)")
    a.set(xlabel="decoder layers", ylabel="peak RSS (GiB)", title="peak memory against depth")
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    for ax, key, label in ((b, "hidden_scan", "hidden size"), (c, "tokens_scan", "calibration tokens")):
        rows = r[key]
        for method in sorted({row["method"] for row in rows}):
            sel = [row for row in rows if row["method"] == method]
            x = [row["hidden"] if key == "hidden_scan" else row["tokens"] for row in sel]
            ax.plot(x, [_per_layer(row) for row in sel], "o-", label=method)
        ax.set(xlabel=label, ylabel="seconds per layer", title=f"time per layer against {label}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
