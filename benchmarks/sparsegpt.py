"""SparseGPT's fast path against the reference loop: time, where it goes, and equality of the results.

Each run is one full prune (``prunekit.api.prune``: the sequential pipeline, calibrate + decide + realize, the same
seam as ``prunekit prune --strategy sparsegpt``) in its own process, of

1. SmolLM2-135M with the default calibration data (wiki, 32 x 512 tokens), 50% unstructured, 2:4 and 4:8;
2. one-layer synthetic Llamas (``prunekit.synthetic``) of hidden 512 / 1024 / 2048 (intermediate 11/4 of it, as
   ``benchmarks/streaming.py``), same data, 50% unstructured: the cost of one layer.

Each configuration runs twice: the reference (today's code: ``SparseGPT(fast=False)``, the reference loop per
linear, and the Hessian as one full X Xᵀ product per batch) and the fast path (the default); in alternating order,
since the machine may be shared. A run records its wall and CPU time, split into the layer forward passes, the
Hessian accumulation, the solve (``decide``) and the rest (tokenizing, catching layer 0's inputs, realizing), and
saves the pruned linears and masks; the two runs of a configuration are compared entry by entry.

    python benchmarks/sparsegpt.py [--threads 2 1] [--patterns unstructured 2:4] [--hidden 512 1024 2048]
        [--work /tmp/sgpt] [--out benchmarks/results]

``--threads``: the intra-op thread counts to run everything at (``OMP_NUM_THREADS`` of each run's process; default:
this process's). On a machine whose cores other processes also use, more than one thread makes every OpenMP
region wait for a descheduled thread, and the times become mostly that wait: a one-thread series gives figures
that measure the work.

Writes ``sparsegpt.md`` (tables), ``sparsegpt.json`` and ``sparsegpt.png``. With ``--work``, finished runs are
reused (an interrupted benchmark resumes). ``PRUNEKIT_BENCH_IN_PROCESS=1`` runs every step in this process
(smoke tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

PATHS = ("reference", "fast")


def shape(hidden: int) -> dict:
    return {"hidden": hidden, "intermediate": hidden * 11 // 4, "heads": max(4, hidden // 128),
            "kv_heads": max(1, hidden // 512)}


# ---------------------------------------------------------------------------------------------- one run
def run_one(spec: dict) -> dict:
    """One full prune as ``spec`` says (model, pattern, path, num_samples, seq_len, folder); returns its record and
    saves ``tensors.safetensors`` (pruned weights and masks of every pruned linear) in ``spec['folder']``."""
    import resource

    import torch
    from safetensors.torch import save_file

    import prunekit.observe as observe
    import prunekit.pipeline as pipeline
    from prunekit.api import prune
    from prunekit.data import CalibrationDataModule
    from prunekit.module import PrunableLM
    from prunekit.stats import Hessian
    from prunekit.strategies.sparsegpt import SparseGPT

    times: dict[str, float] = {"forward_and_hooks": 0.0, "hessian": 0.0, "check_finite": 0.0, "solve": 0.0}
    per_layer: list[float] = []

    def timed(owner, name: str, key: str, record: list | None = None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                times[key] += spent
                if record is not None:
                    record.append(spent)

        setattr(owner, name, wrapper)
        return owner, name, original

    reference = spec["path"] == "reference"
    saved_panel, saved_threads = Hessian.PANEL, torch.get_num_threads()
    torch.set_num_threads(spec["threads"])
    patches = [timed(pipeline, "_call_layer", "forward_and_hooks"), timed(Hessian, "update", "hessian"),
               timed(observe, "check_finite", "check_finite"), timed(SparseGPT, "decide", "solve", per_layer)]
    try:
        if reference:
            Hessian.PANEL = 1 << 40  # today's Hessian: the full product per batch
        start = time.perf_counter()
        module = PrunableLM(spec["model"])
        load_s = time.perf_counter() - start
        data = CalibrationDataModule(spec["model"], num_samples=spec["num_samples"], seq_len=spec["seq_len"])
        nm = spec["pattern"] != "unstructured"
        strategy = SparseGPT(pattern=spec["pattern"], sparsity=None if nm else 0.5, fast=not reference)
        load_before = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        out = prune(strategy, module, data)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        for owner, name, original in patches:
            setattr(owner, name, original)
        Hessian.PANEL = saved_panel
        torch.set_num_threads(saved_threads)
    tensors = {}
    for name, mask in out.plan.masks.items():
        tensors[f"{name}.weight"] = module.model.get_submodule(name).weight.detach().contiguous()
        tensors[f"{name}.mask"] = mask.to(torch.uint8).contiguous()
    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "tensors.safetensors"))
    forward = times["forward_and_hooks"] - times["hessian"] - times["check_finite"]
    record = {**{k: spec[k] for k in ("label", "model", "pattern", "path", "num_samples", "seq_len", "threads")},
              "load_s": load_s, "wall_s": wall, "cpu_s": cpu,
              "forward_s": forward, "hessian_s": times["hessian"], "solve_s": times["solve"],
              "other_s": wall - forward - times["hessian"] - times["solve"], "solve_per_layer_s": per_layer,
              "layers": len(per_layer), "linears": len(out.plan.masks),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}
    (folder / "result.json").write_text(json.dumps(record, indent=2))
    return record


def run(spec: dict, reuse: bool) -> dict:
    folder = Path(spec["folder"])
    if reuse and (folder / "result.json").is_file() and (folder / "tensors.safetensors").is_file():
        print(f"reusing {folder} (finished earlier)", flush=True)
        return json.loads((folder / "result.json").read_text())
    print(f"$ {spec['label']} {spec['pattern']}: {spec['path']}, {spec['threads']} threads", flush=True)
    if os.environ.get("PRUNEKIT_BENCH_IN_PROCESS") == "1":
        return run_one(spec)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], check=True, env=env)
    return json.loads((folder / "result.json").read_text())


def compare(a: Path, b: Path) -> dict:
    """Mask entries and weights of two runs' pruned linears."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "tensors.safetensors")), load_file(str(b / "tensors.safetensors"))
    if set(ta) != set(tb):
        raise SystemExit(f"{a} and {b} pruned different linears")
    masks = [k for k in ta if k.endswith(".mask")]
    weights = [k for k in ta if k.endswith(".weight")]
    diff = [float((ta[k].double() - tb[k].double()).abs().max()) for k in weights]
    return {"linears": len(masks), "mask_entries": sum(ta[k].numel() for k in masks),
            "masks_differ": sum(int((ta[k] != tb[k]).sum()) for k in masks),
            "weights_differ": sum(int((ta[k] != tb[k]).sum()) for k in weights),
            "max_abs_weight_diff": max(diff),
            "max_rel_weight_diff": max(d / float(ta[k].abs().max()) for d, k in zip(diff, weights)),
            "bitwise_equal": all(torch.equal(ta[k], tb[k]) for k in ta)}


def make_synthetic(folder: Path, hidden: int) -> Path:
    from prunekit.models import load_tokenizer
    from prunekit.synthetic import write_llama

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_llama(tmp, load_tokenizer("smollm2-135m"), layers=1, max_positions=2048, tie=True, **shape(hidden))
    tmp.rename(folder)
    return folder


# ---------------------------------------------------------------------------------------------- report
def table(r: dict) -> str:
    m = r["meta"]
    lines = [f"SparseGPT, sequential pipeline, calibration wiki {m['num_samples']} x {m['seq_len']} tokens; "
             f"{m['cpu_count']} CPU cores (shared: load avg = the machine's 1-minute load before-after the run); "
             "every run a full prune in its own process. reference = today's code (`fast=False`: the reference loop "
             "per linear; the Hessian as one full X Xᵀ product per batch); fast = the default.", "",
             "| model | pattern | threads | path | prune (s) | forward (s) | Hessian (s) | solve (s) | "
             "solve / layer (s) | other (s) | CPU (s) | peak RSS (GiB) | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["runs"]:
        lines.append(f"| {row['label']} | {row['pattern']} | {row['threads']} | {row['path']} | "
                     f"{row['wall_s']:.1f} | {row['forward_s']:.1f} | {row['hessian_s']:.1f} | {row['solve_s']:.1f} | "
                     f"{row['solve_s'] / row['layers']:.2f} | "
                     f"{row['other_s']:.1f} | {row['cpu_s']:.0f} | {row['peak_rss_gib']:.2f} | "
                     f"{row['loadavg_before']:.1f}-{row['loadavg_after']:.1f} |")
    lines += ["", "Speed-up (reference / fast) and equality of the pruned linears (fast against reference):", "",
              "| model | pattern | threads | prune | solve | Hessian | linears | mask entries differing | weights "
              "differing | max abs weight diff | max rel weight diff |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["comparisons"]:
        lines.append(f"| {c['label']} | {c['pattern']} | {c['threads']} | {c['speedup_prune']:.2f}x | "
                     f"{c['speedup_solve']:.2f}x | {c['speedup_hessian']:.2f}x | {c['linears']} | "
                     f"{c['masks_differ']} of {c['mask_entries']:,} | "
                     f"{c['weights_differ']:,} | {c['max_abs_weight_diff']:.2e} | {c['max_rel_weight_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = r["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 0.5 * len(runs) + 2.5), gridspec_kw={"width_ratios": [3, 2]})
    names = [f"{x['label']} {x['pattern']} · {x['threads']}t · {x['path']}" for x in runs]
    left = [0.0] * len(runs)
    for key, color in (("forward_s", "#8da0cb"), ("hessian_s", "#66c2a5"), ("solve_s", "#fc8d62"),
                       ("other_s", "#b3b3b3")):
        values = [max(x[key], 0.0) for x in runs]
        a.barh(range(len(runs)), values, left=left, color=color, label=key.removesuffix("_s"))
        left = [p + v for p, v in zip(left, values)]
    a.set_yticks(range(len(runs)), names, fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("seconds (full prune)")
    a.set_title("where the time goes (t = threads)", fontsize=10)
    a.legend(fontsize=8)
    comps = r["comparisons"]
    labels = [f"{c['label']} {c['pattern']} · {c['threads']}t" for c in comps]
    ys = range(len(comps))
    b.barh([y - 0.2 for y in ys], [c["speedup_solve"] for c in comps], 0.4, label="solve", color="#fc8d62")
    b.barh([y + 0.2 for y in ys], [c["speedup_prune"] for c in comps], 0.4, label="whole prune", color="#8da0cb")
    b.axvline(1, color="black", linewidth=1)
    b.set_yticks(list(ys), labels, fontsize=8)
    b.invert_yaxis()
    b.set_xlabel("speed-up of the fast path (reference / fast)")
    b.set_title("speed-up (masks identical where the table says 0)", fontsize=10)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--patterns", nargs="*", default=["unstructured", "2:4"])
    p.add_argument("--threads", type=int, nargs="+", default=None)
    p.add_argument("--hidden", type=int, nargs="*", default=[512, 1024, 2048])
    p.add_argument("--synthetic_patterns", nargs="*", default=["unstructured"])
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--work", type=Path, default=None, help="Folder for runs and synthetic models (kept; reused).")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        run_one(json.loads(args.one))
        return
    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="prunekit-sparsegpt-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or [torch.get_num_threads()]
    models = [(Path(args.model).name, args.model, args.patterns)]
    for hidden in args.hidden:
        models.append((f"synthetic-{hidden}", str(make_synthetic(work / f"llama-1x{hidden}", hidden)),
                       args.synthetic_patterns))
    configs = [(n, label, model, pattern) for n in threads for label, model, patterns in models for pattern in patterns]
    started = time.time()
    result: dict = {"meta": {"num_samples": args.num_samples, "seq_len": args.seq_len, "cpu_count": os.cpu_count(),
                             "threads": threads, "model": args.model,
                             "synthetic": {h: shape(h) for h in args.hidden}},
                    "runs": [], "comparisons": []}
    for k, (n, label, model, pattern) in enumerate(configs):
        print(f"\n[{k + 1}/{len(configs)}] {label} {pattern}, {n} threads (elapsed {time.time() - started:.0f} s)",
              flush=True)
        folders = {}
        records = {}
        for path in PATHS if k % 2 == 0 else PATHS[::-1]:
            folders[path] = work / f"{label}-{pattern.replace(':', 'of')}-{n}t-{path}"
            records[path] = run({"label": label, "model": model, "pattern": pattern, "path": path, "threads": n,
                                 "num_samples": args.num_samples, "seq_len": args.seq_len,
                                 "folder": str(folders[path])}, reuse=args.work is not None)
        ref, fast = records["reference"], records["fast"]
        result["runs"] += [ref, fast]
        result["comparisons"].append({"label": label, "pattern": pattern, "threads": n,
                                      "speedup_prune": ref["wall_s"] / fast["wall_s"],
                                      "speedup_solve": ref["solve_s"] / fast["solve_s"],
                                      "speedup_hessian": ref["hessian_s"] / fast["hessian_s"],
                                      **compare(folders["reference"], folders["fast"])})
        print(json.dumps(result["comparisons"][-1]), flush=True)
    result["total_s"] = time.time() - started
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    common.publish(args.out, "sparsegpt", result, table, plot)


if __name__ == "__main__":
    main()
