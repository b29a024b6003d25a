"""Decode speed of cut (structurally pruned) models: transformers' generate against prunekit's fast decode paths.

1. SmolLM2-135M dense, FLAP at 50% (its default AL-AM allocation, per-layer widths) and Wanda-sp at 50% (UL-UM),
   each pruned once by ``prunekit prune`` (kept in ``--work``); then one ``prunekit bench`` process measures
   batch 1 and 4 along the three decode paths (``--decode generate static compiled``): tokens/s, speed-up,
   the ideal speed-up (ratio of weight multiply-accumulates per token) and measured/ideal.
2. Size: random Llamas (``prunekit.synthetic``, SmolLM2's tokenizer and tied embeddings) of hidden 576 / 1024 /
   2048 / 3072 with Llama-like proportions (intermediate ≈ 2.7 × hidden, head size 64-128, GQA), cut to 50% by
   magnitude-sp (data-free, uniform widths); one ``prunekit bench`` process per size at batch 1: measured/ideal
   against model size. Depth is chosen so the unpruned LM head takes about SmolLM2's share of the weights (30 / 16
   / 8 / 6 layers; the 576-wide one is SmolLM2-135M's shape), hence about the same ideal speed-up (≈1.6) at every
   size. The fixed per-layer cost (norms, rotary, attention, dispatch) does not grow with width while the matrix
   products grow with its square, so measured/ideal should approach 1 as the model grows.

    OMP_NUM_THREADS=2 python benchmarks/decode.py [--work runs/decode-bench] [--lock /tmp/prunekit-bench.lock]

``--lock FILE`` holds an exclusive lock (``flock``) around each timing process only, so several benchmarks on one
machine do not time each other. Writes ``decode.md`` (README tables), ``decode.json`` (every row of every bench
run, CPU-time figures included) and ``decode.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import common

METHODS = {"flap-50": ["--strategy", "flap", "--strategy.sparsity", "0.5"],
           "wanda-sp-50": ["--strategy", "wanda-sp", "--strategy.sparsity", "0.5"]}
# hidden: (intermediate, query heads, KV heads, layers); 576 is SmolLM2-135M's shape, 3072 Llama-3.2-3B's widths;
# layers such that the tied 49152 x hidden head is ~21% of the weights, as in SmolLM2-135M
SHAPES = {576: (1536, 9, 3, 30), 1024: (2816, 16, 4, 16), 2048: (5632, 32, 8, 8), 3072: (8192, 24, 8, 6)}
PATHS = ["generate", "static", "compiled"]


@contextlib.contextmanager
def locked(path: str | None):
    """An exclusive ``flock`` on ``path`` (the same lock the ``flock`` command takes), or nothing."""
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bench(model: str, folders: list[Path], out: Path, batch_sizes: list[int], paths: list[str], repeats: int,
          progress: common.Progress, lock: str | None, prompt_len: int, new_tokens: int) -> list[dict]:
    progress.step(f"bench {Path(model).name} vs {', '.join(f.name for f in folders)}")
    cmd = ["bench", "--model", model, "--pruned", json.dumps([str(f) for f in folders]), "--batch_sizes",
           json.dumps(batch_sizes), "--decode", json.dumps(paths), "--repeats", str(repeats), "--prompt_len",
           str(prompt_len), "--new_tokens", str(new_tokens), "--peak_memory", "false", "--output", str(out)]
    print("$ prunekit", " ".join(cmd), flush=True)
    with locked(lock):
        common.command(cmd)
    return json.loads(out.read_text())


def make(folder: Path, layers: int, hidden: int) -> Path:
    from prunekit.models import load_tokenizer
    from prunekit.synthetic import write_llama

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    intermediate, heads, kv, _ = SHAPES[hidden]
    write_llama(tmp, load_tokenizer("smollm2-135m"), layers=layers, hidden=hidden, intermediate=intermediate,
                heads=heads, kv_heads=kv, max_positions=2048, tie=True)
    tmp.rename(folder)
    return folder


def smollm2(args, work: Path, progress: common.Progress) -> dict:
    folders = []
    for name, flags in METHODS.items():
        out = work / name
        common.run(["prune", *flags, "--model", args.model, "--data.eval_samples", "4", "--eval_dense", "false"], out,
                   progress, reuse=True)
        folders.append(out)
    rows = bench(args.model, folders, work / "bench-smollm2.json", [1, 4], args.paths, args.repeats, progress,
                 args.lock, args.prompt_len, args.new_tokens)
    return {"model": args.model, "rows": rows}


def sizes(args, work: Path, progress: common.Progress) -> list[dict]:
    from prunekit.synthetic import llama_params

    result = []
    for hidden in args.hidden:
        intermediate, heads, kv, layers = SHAPES[hidden]
        layers = args.layers or layers
        model = make(work / f"llama-{layers}x{hidden}", layers, hidden)
        cut = work / f"llama-{layers}x{hidden}-magnitude-sp-50"
        common.run(["prune", "--model", str(model), "--strategy", "magnitude-sp", "--strategy.sparsity", "0.5",
                    "--data.num_samples", "1", "--data.seq_len", "64", "--data.eval_samples", "1", "--eval_dense",
                    "false"], cut, progress, reuse=True)
        rows = bench(str(model), [cut], work / f"bench-{hidden}.json", [1], args.size_paths, args.size_repeats,
                     progress, args.lock, args.prompt_len, args.new_tokens)
        result.append({"hidden": hidden, "layers": layers, "intermediate": intermediate, "heads": heads,
                       "kv_heads": kv, "params": llama_params(layers, hidden, intermediate, heads, kv, 49152,
                                                              tie=True), "rows": rows})
        if not args.keep:
            shutil.rmtree(model)
            shutil.rmtree(cut)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--parts", nargs="+", default=["smollm2", "sizes"], choices=["smollm2", "sizes"],
                   help="What to run; a part not run keeps its rows from an existing decode.json.")
    p.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS, help="Decode paths for SmolLM2.")
    p.add_argument("--size_paths", nargs="+", default=PATHS, choices=PATHS, help="Decode paths for the size scan.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size_repeats", type=int, default=5)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="Depth of every synthetic model (default: SHAPES').")
    p.add_argument("--lock", default=None, help="flock this file around each timing process.")
    p.add_argument("--work", type=Path, default=None, help="Folder for pruned and synthetic models (kept, reused).")
    p.add_argument("--keep", action="store_true", help="Keep the synthetic models and their cuts in --work.")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="prunekit-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = (len(METHODS) + 1 if "smollm2" in args.parts else 0) \
        + (2 * len(args.hidden) if "sizes" in args.parts else 0)
    progress = common.Progress(steps)
    started = time.time()
    old = json.loads((args.out / "decode.json").read_text()) if (args.out / "decode.json").is_file() else {}
    result = {"meta": {"threads": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
                       "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                       "size_repeats": args.size_repeats}}
    result["smollm2"] = smollm2(args, work, progress) if "smollm2" in args.parts else old.get("smollm2")
    result["sizes"] = sizes(args, work, progress) if "sizes" in args.parts else old.get("sizes")
    result["meta"]["total_s"] = time.time() - started
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    common.publish(args.out, "decode", result, table, plot)


def _row(rows: list[dict], model: str, path: str, batch: int) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["decode"] == path and r["batch"] == batch), None)


def _cell(row: dict | None) -> list[str]:
    if row is None:
        return ["-", "-", "-"]
    return [f"{row['decode_tok_s']:.1f}", f"{row['decode_speedup']:.2f}x", f"{row['decode_vs_ideal']:.2f}"]


def table(r: dict) -> str:
    meta = r["meta"]
    lines = []
    if r.get("smollm2"):
        rows = r["smollm2"]["rows"]
        models = list(dict.fromkeys(row["model"] for row in rows))
        paths = [p for p in PATHS if any(row["decode"] == p for row in rows)]
        lines += [f"{Path(r['smollm2']['model']).name}: greedy decode, prompt {meta['prompt_len']} tokens, "
                  f"{meta['new_tokens']} new tokens, median of {meta['repeats']} interleaved repetitions; "
                  f"{meta['threads'] or 'default'} threads on {meta['cpu_count']} CPU cores", "",
                  "| model | params | ideal | decode path | tok/s (b=1) | speed-up (b=1) | measured/ideal (b=1) "
                  "| tok/s (b=4) | speed-up (b=4) | measured/ideal (b=4) | compile s (b=1 / b=4) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for path in paths:
            for model in models:
                one, four = _row(rows, model, path, 1), _row(rows, model, path, 4)
                first = one or four
                compiled = " / ".join(f"{x['compile_s']:.0f}" for x in (one, four) if x and "compile_s" in x) or "-"
                lines.append(f"| {model} | {first['params'] / 1e6:.1f}M | {first['ideal_speedup']:.2f}x | {path} | "
                             + " | ".join(_cell(one) + _cell(four)) + f" | {compiled} |")
    if r.get("sizes"):
        scan = r["sizes"]
        paths = [p for p in PATHS if any(row["decode"] == p for s in scan for row in s["rows"])]
        lines += ["", "Synthetic Llamas (random weights, vocabulary 49152, tied embeddings, fp32) cut to 50% by "
                  "magnitude-sp; batch 1, prompt "
                  f"{meta['prompt_len']} tokens, {meta['new_tokens']} new tokens, median of {meta['size_repeats']} "
                  "interleaved repetitions", "",
                  "| hidden | intermediate | heads (KV) | layers | params | ideal | " +
                  " | ".join(f"{p}: dense / cut ms per token | {p}: measured/ideal" for p in paths) + " |",
                  "|---|---|---|---|---|---|" + "---|---|" * len(paths)]
        for s in scan:
            dense = next(row for row in s["rows"] if row["ideal_speedup"] == 1)
            cells = []
            for p in paths:
                d = next(row for row in s["rows"] if row["model"] == dense["model"] and row["decode"] == p)
                c = next(row for row in s["rows"] if row["model"] != dense["model"] and row["decode"] == p)
                cells += [f"{d['latency_ms_per_token']:.1f} / {c['latency_ms_per_token']:.1f}",
                          f"{c['decode_vs_ideal']:.2f}"]
            cut = next(row for row in s["rows"] if row["model"] != dense["model"])
            lines.append(f"| {s['hidden']} | {s['intermediate']} | {s['heads']} ({s['kv_heads']}) | {s['layers']} | "
                         f"{s['params'] / 1e6:.0f}M | {cut['ideal_speedup']:.2f}x | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6))
    colors = {"generate": "tab:gray", "static": "tab:blue", "compiled": "tab:green"}
    if r.get("smollm2"):
        rows = [row for row in r["smollm2"]["rows"] if row["ideal_speedup"] > 1]
        groups = list(dict.fromkeys((row["model"], row["batch"]) for row in rows))
        paths = [p for p in PATHS if any(row["decode"] == p for row in rows)]
        width = 0.8 / len(paths)
        for i, p in enumerate(paths):
            values = [next((row["decode_vs_ideal"] for row in rows if (row["model"], row["batch"]) == g
                            and row["decode"] == p), 0) for g in groups]
            a.bar([k + (i - (len(paths) - 1) / 2) * width for k in range(len(groups))], values, width, label=p,
                  color=colors[p])
        a.set_xticks(range(len(groups)), [f"{m}\nbatch {bs}" for m, bs in groups], fontsize=8)
        a.axhline(1.0, color="k", lw=0.8)
        a.axhline(0.9, color="r", ls="--", lw=0.8, label="target 0.9")
        a.set(ylabel="measured / ideal decode speed-up", title=f"{Path(r['smollm2']['model']).name}, 50% structured")
        a.set_ylim(0, 1.15)
        a.legend(fontsize=8, loc="lower right")
    if r.get("sizes"):
        for p in PATHS:
            pts = []
            for s in r["sizes"]:
                cut = next((row for row in s["rows"] if row["ideal_speedup"] > 1 and row["decode"] == p), None)
                if cut:
                    pts.append((s["params"] / 1e6, cut["decode_vs_ideal"], s["hidden"]))
            if pts:
                b.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", color=colors[p], label=f"{p} (synthetic)")
                if p == "compiled":
                    for x, y, h in pts:
                        b.annotate(f"hidden {h}", (x, y), textcoords="offset points", xytext=(0, -13), fontsize=7,
                                   ha="center")
        if r.get("smollm2"):
            for row in r["smollm2"]["rows"]:
                if row["ideal_speedup"] > 1 and row["batch"] == 1:
                    b.plot([_dense_params(r) / 1e6], [row["decode_vs_ideal"]],
                           "x" if row["model"].startswith("flap") else "+", ms=9, color=colors[row["decode"]])
            b.plot([], [], "kx", label="SmolLM2 FLAP-50 (b=1)")
            b.plot([], [], "k+", label="SmolLM2 Wanda-sp-50 (b=1)")
        b.set_xscale("log")
        b.axhline(1.0, color="k", lw=0.8)
        b.axhline(0.9, color="r", ls="--", lw=0.8)
        b.set(xlabel="dense parameters (millions, log)", ylabel="measured / ideal decode speed-up (batch 1)",
              title="50% structured cut: measured / ideal against model size")
        b.set_ylim(0, 1.15)
        b.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _dense_params(r: dict) -> float:
    return next(row["params"] for row in r["smollm2"]["rows"] if row["ideal_speedup"] == 1)


if __name__ == "__main__":
    main()
