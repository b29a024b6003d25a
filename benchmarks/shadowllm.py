"""ShadowLLM and DejaVu on SmolLM2-135M: criteria predictability (Spearman ρ), static criteria pruning (global and
local), dynamic pruning with a layer-0 predictor vs per-layer predictors, and decode latency.

    python benchmarks/shadowllm.py [--per_task 32] [--limit 40] [--windows 16] [--probes grasp] [--out benchmarks/results]

- Calibration: the reserved calibration examples of the shadow7 tasks (PIQA, COPA, OpenBookQA, WinoGrande, BoolQ
  for RTE, HellaSwag, ARC-e), rendered by lm-eval with the gold answer, a seeded random ``--per_task`` of each;
  ONE gradient pass records every criterion's per-example head and neuron scores and the predictors' inputs
  (the same records ``shadowllm``, ``dejavu`` and ``shadowllm-static`` use). Evaluation reads only the tasks'
  evaluation documents and held-out wiki windows, never a calibration example.
- Spearman: for every criterion, a ShadowLLM predictor (layer-0 feature → all layers) and DejaVu-style per-layer
  predictors (each layer's input → that layer), trained on the same seeded 75 %, ρ per example on the other 25 %.
- Static: each criterion aggregated per task then over tasks, cut globally at 10/30/50 % of head units (KV
  groups) and neurons; plainact also locally (30/50 %). ``--probes grasp`` adds the multi-pass grasp (its own
  double-backward pass; slow on 2 cores, so not in the default run). Wiki perplexity and the seven-task accuracy (mean, and the mean
  over the tasks the dense model beats chance on).
- Dynamic: shadowllm (plainact, one layer-0 predictor, global) vs dejavu (l2_norm, per-layer predictors, local)
  at 30/50/70 %, prompt sparse (the reference); perplexity in prefix mode (select at the half window), lm-eval
  requests in class mode (select at the request's last token).
- Latency: ``prunekit bench`` of dense, a static cut of the same width (plainact, query heads, layers 1–29) and
  both dynamic models at 50 %.

Writes ``shadowllm.md`` (the README tables), ``shadowllm.json`` and ``shadowllm.png``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from pathlib import Path

import common
import torch

CRITERIA = ["plainact", "l2_norm", "grad_norm", "fisher", "snip"]
TASKS = ["piqa", "copa", "openbookqa", "winogrande", "boolq", "hellaswag", "arc_easy"]
CHANCE = {"piqa": 0.5, "copa": 0.5, "openbookqa": 0.25, "winogrande": 0.5, "boolq": 0.62, "hellaswag": 0.25,
          "arc_easy": 0.25}


def collector(model, criteria: list[str]):
    """A strategy that only records: every criterion per example and per task, and the predictors' inputs."""
    from prunekit.arch import adapter_for
    from prunekit.plans import WeightMask
    from prunekit.strategy import PruningStrategy
    from prunekit.strategies.shadowllm import traces
    from prunekit.strategies.shadowllm.criteria import get

    n = len(adapter_for(model).layers(model))

    class Collect(PruningStrategy):
        name = "collect"
        pipeline = "gradient"

        def observers(self, model, layer):
            out = []
            for c in criteria:
                out += traces.observers(model, get(c), list(range(n)), per_source=True)
            return out + traces.feature_observers(model, list(range(1, n)))

        def check(self, model):
            pass

        def decide(self, model, observed, layer, context):
            self.observed, self.sources = observed, context.sources
            return WeightMask({})

    return Collect()


def probe_pass(strategy, model, dm):
    """A multi-pass criterion over the calibration examples (what the ``probe`` pipeline runs), per task."""
    from prunekit.observe import as_batch
    from prunekit.pipeline import _ProbeStore
    from prunekit.stats import Comm

    store = _ProbeStore(dm.calibration_sources())
    seen = 0
    for raw in dm.predict_dataloader():
        batch = as_batch(raw, seen)
        seen += batch.size
        store.add(strategy.probe_batch(model, batch), batch)
    store.reduce(Comm.local())
    return store.results()


def evaluate(model, tokenizer, dm, tasks, limit, cache: bool = False) -> dict:
    from prunekit.api import default_trainer
    from prunekit.evaluate import perplexity
    from prunekit.zeroshot import evaluate_tasks

    row = {"perplexity": perplexity(default_trainer(), model, dm)}
    summary = evaluate_tasks(model, tokenizer, tasks, limit=limit, cache=cache)
    for t in tasks:
        row[f"acc/{t}"] = summary["tasks"][t].get("acc")
    row["average_acc"] = sum(row[f"acc/{t}"] for t in tasks) / len(tasks)
    return row


def above_chance(row: dict, signal: list[str]) -> float | None:
    return sum(row[f"acc/{t}"] for t in signal) / len(signal) if signal else None


def install(model, runtime) -> None:
    from prunekit.plans import RuntimePolicy
    from prunekit.realize import realizer_for

    realizer_for(RuntimePolicy(runtime)).apply(model, RuntimePolicy(runtime))


def uninstall(model) -> None:
    from prunekit.realize.runtime import runtime_of

    runtime = runtime_of(model)
    if runtime is not None:
        runtime.remove(model)
        model.__dict__.pop("_prunekit_runtime", None)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--per_task", type=int, default=32, help="calibration examples per task")
    parser.add_argument("--limit", type=float, default=40, help="lm-eval documents per task")
    parser.add_argument("--windows", type=int, default=16, help="held-out wiki windows for perplexity")
    parser.add_argument("--criteria", nargs="+", default=CRITERIA)
    parser.add_argument("--probes", nargs="*", default=[], help="multi-pass criteria for the static table")
    parser.add_argument("--static", nargs="+", type=float, default=[0.1, 0.3, 0.5], help="static sparsities")
    parser.add_argument("--local", nargs="+", type=float, default=[0.3, 0.5], help="plainact local sparsities")
    parser.add_argument("--dynamic", nargs="+", type=float, default=[0.3, 0.5, 0.7], help="dynamic sparsities")
    parser.add_argument("--hidden", type=int, default=256, help="predictor hidden width")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--holdout", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3, help="bench repeats")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from prunekit.api import plan
    from prunekit.arch import adapter_for
    from prunekit.data import CalibrationDataModule
    from prunekit.models import load_model, load_tokenizer
    from prunekit.pipeline import Context
    from prunekit.realize import realizer_for
    from prunekit.strategies.shadowllm import traces
    from prunekit.strategies.shadowllm.criteria import get
    from prunekit.strategies.shadowllm.runtime import ShadowRuntime
    from prunekit.strategies.shadowllm.static import ShadowStatic
    from prunekit.strategies.shadowllm.strategy import train_predictors

    started = time.time()
    progress = common.Progress(6 + bool(args.probes))
    limit = int(args.limit) if args.limit >= 1 else args.limit
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    n_layers = len(adapter_for(model).layers(model))
    dynamic_layers = list(range(1, n_layers))
    dm = CalibrationDataModule(args.model, corpus="task", corpus_options={"tasks": ["shadow7"]}, packing="documents",
                               sampling="random", num_samples=args.per_task, allow_fewer=True, seq_len=args.seq_len,
                               eval_samples=args.windows)
    results: dict = {"meta": {"model": args.model, "per_task": args.per_task, "limit": args.limit,
                              "windows": args.windows, "seq_len": args.seq_len, "hidden": args.hidden,
                              "epochs": args.epochs, "holdout": args.holdout, "tasks": args.tasks,
                              "calibration": dm.describe_calibration(), "cpu_count": os.cpu_count(),
                              "threads": torch.get_num_threads()}}

    # 1. one gradient pass: every criterion, per example and task; the predictors' inputs
    progress.step("calibration: every criterion per example (forward + backward)")
    t0 = time.time()
    collect = collector(model, args.criteria)
    plan(collect, model, dm, keep=False)
    observed, sources = collect.observed, collect.sources
    results["meta"]["trace_s"] = time.time() - t0
    feats = traces.features(observed, dynamic_layers)
    tables = {c: traces.per_example(model, observed, get(c), dynamic_layers) for c in args.criteria}
    print(f"  traced {int(feats['index'].numel())} examples in {results['meta']['trace_s']:.0f} s", flush=True)

    # 1b. multi-pass criteria (static only): their own pass, through the strategy's probe step
    probed = {}
    for name in args.probes:
        progress.step(f"calibration: {name} per example (probe pass)")
        t0 = time.time()
        probed[name] = probe_pass(ShadowStatic(criterion=name), model, dm)
        results["meta"][f"{name}_s"] = time.time() - t0
        print(f"  {name}: {results['meta'][f'{name}_s']:.0f} s", flush=True)

    # 2. predictability: Spearman rho on held-out examples, both designs, every criterion
    progress.step("predictors: Spearman on held-out examples")
    fit = dict(hidden=args.hidden, epochs=args.epochs, holdout=args.holdout, seed=0)
    spearman, predictors = {}, {}
    for c in args.criteria:
        for design in ("shadowllm", "dejavu"):
            t0 = time.time()
            net, blocks, report = train_predictors(design, tables[c], feats, dynamic_layers, **fit)
            spearman[f"{design}/{c}"] = {**report["spearman"], "seconds": time.time() - t0}
            predictors[(design, c)] = (net, blocks)
            print(f"  {design} {c}: {spearman[f'{design}/{c}']}", flush=True)
    results["spearman"] = spearman

    # 3. dense and static criteria
    progress.step("dense and static criteria (global; plainact local)")
    dense = evaluate(model, tokenizer, dm, args.tasks, limit, cache=args.dense_cache)
    dense["params"] = params(model)
    signal = [t for t in args.tasks if dense[f"acc/{t}"] > CHANCE[t]]
    dense["average_above_chance"] = above_chance(dense, signal)
    results["dense"], results["meta"]["above_chance_tasks"] = dense, signal
    print(f"  dense: {dense}", flush=True)
    static = []
    context = Context(sources)
    runs = [(c, p, "global") for c in [*args.criteria, *args.probes] for p in args.static] + \
        [("plainact", p, "local") for p in args.local if "plainact" in args.criteria]
    for c, p, scope in runs:
        strategy = ShadowStatic(criterion=c, sparsity=p, scope=scope)
        cut_plan = strategy.decide(model, probed.get(c, observed), None, context)
        pruned = realizer_for(cut_plan).apply(copy.deepcopy(model), cut_plan)
        row = {"criterion": c, "sparsity": p, "scope": scope, **evaluate(pruned, tokenizer, dm, args.tasks, limit),
               "params": params(pruned)}
        row["average_above_chance"] = above_chance(row, signal)
        static.append(row)
        print(f"  {c} {scope} {p}: ppl {row['perplexity']:.2f} acc {row['average_acc']:.3f}", flush=True)
        del pruned
    results["static"] = static

    # 4. dynamic: shadowllm vs dejavu
    progress.step("dynamic: shadowllm (plainact, layer-0 predictor, global) vs dejavu (l2_norm, per layer, local)")
    dynamic = []
    for design, c, scope in (("shadowllm", "plainact", "global"), ("dejavu", "l2_norm", "local")):
        if c not in args.criteria:
            continue
        net, blocks = predictors[(design, c)]
        for p in args.dynamic:
            install(model, ShadowRuntime(net, blocks, design=design, sparsity=p, scope=scope))
            row = {"design": design, "criterion": c, "scope": scope, "sparsity": p,
                   **evaluate(model, tokenizer, dm, args.tasks, limit)}
            uninstall(model)
            row["average_above_chance"] = above_chance(row, signal)
            dynamic.append(row)
            print(f"  {design} {p}: ppl {row['perplexity']:.2f} acc {row['average_acc']:.3f}", flush=True)
    results["dynamic"] = dynamic

    # 5. latency
    progress.step("decode latency (prunekit bench)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = []
        for design, c, scope in (("shadowllm", "plainact", "global"), ("dejavu", "l2_norm", "local")):
            if (design, c) not in predictors:
                continue
            net, blocks = predictors[(design, c)]
            m = copy.deepcopy(model)
            install(m, ShadowRuntime(net, blocks, design=design, sparsity=0.5, scope=scope))
            folder = work / f"{design}50"
            _save(m, folder, tokenizer, {"strategy": f"{design} 50%"})
            folders.append(str(folder))
            del m
        if "plainact" in args.criteria:
            strategy = ShadowStatic(criterion="plainact", sparsity=0.5, scope="local", head_unit="query",
                                    layers=dynamic_layers)
            cut_plan = strategy.decide(model, observed, None, context)
            folder = work / "static-plainact50"
            _save(realizer_for(cut_plan).apply(copy.deepcopy(model), cut_plan), folder, tokenizer,
                  {"strategy": "static cut: plainact 50% local, query heads, layers 1-29"}, cut_plan)
            folders.insert(0, str(folder))
        del observed, collect
        bench_out = work / "bench.json"
        cmd = ["bench", "--model", args.model, "--pruned", json.dumps(folders), "--batch_sizes", "[1]",
               "--repeats", str(args.repeats), "--peak_memory", "false", "--output", str(bench_out)]
        print("$", " ".join(cmd), flush=True)
        common.command(cmd)
        results["speed"] = json.loads(bench_out.read_text())
    results["meta"]["total_s"] = time.time() - started
    write(results, args.out)


def _save(model, folder: Path, tokenizer, pruned_by: dict, plan=None) -> None:
    from prunekit.plans import RuntimePolicy
    from prunekit.realize import realizer_for
    from prunekit.realize.runtime import runtime_of

    runtime = runtime_of(model)
    plan = plan if plan is not None else RuntimePolicy(runtime)
    folder.mkdir(parents=True)
    realizer_for(plan).save(model, folder, tokenizer)
    (folder / "prunekit.json").write_text(json.dumps({"plan": plan.kind, "pruned_by": pruned_by}))


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "shadowllm.json").write_text(json.dumps(results, indent=2))
    table = format_tables(results)
    (out / "shadowllm.md").write_text(table + "\n")
    print("\n" + table)
    plot(results, out / "shadowllm.png")


def _acc(row: dict, tasks: list[str]) -> str:
    cells = [f"{row[f'acc/{t}']:.3f}" for t in tasks]
    above = row.get("average_above_chance")
    return " | ".join(cells + [f"{row['average_acc']:.3f}", f"{above:.3f}" if above is not None else "-"])


def format_tables(r: dict) -> str:
    m = r["meta"]
    tasks = m["tasks"]
    limit = f"first {m['limit']:g} documents per task"
    lines = [f"{Path(m['model']).name}; calibration: {m['calibration']}; predictors: hidden {m['hidden']}, "
             f"{m['epochs']} epochs, held-out {m['holdout']:.0%} of the examples; lm-eval acc, {limit}; perplexity "
             f"on {m['windows']} held-out wiki windows of {m['seq_len']} tokens; {m['cpu_count']} CPU cores.", "",
             "**Predictability** — mean per-example Spearman ρ between predicted and true scores on held-out "
             "examples (layers 1–29):", "",
             "| criterion | ShadowLLM (layer-0 predictor) heads | neurons | DejaVu-style (per-layer) heads | neurons |",
             "|---|---|---|---|---|"]
    for c in dict.fromkeys(k.split("/")[1] for k in r["spearman"]):
        s, d = r["spearman"].get(f"shadowllm/{c}", {}), r["spearman"].get(f"dejavu/{c}", {})
        lines.append(f"| {c} | {s.get('heads', float('nan')):.3f} | {s.get('neurons', float('nan')):.3f} | "
                     f"{d.get('heads', float('nan')):.3f} | {d.get('neurons', float('nan')):.3f} |")
    head = ["method", "sparsity", "perplexity", *tasks, "average", "above chance", "params"]
    lines += ["", "**Static criteria** (aggregated per task, then over tasks; cut; global unless marked local). "
              f"\"above chance\": the mean over the tasks the dense model beats chance on ({', '.join(m['above_chance_tasks'])}; "
              "BoolQ's chance is 0.62, always \"yes\"):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    d = r["dense"]
    lines.append(f"| dense | 0 | {d['perplexity']:.2f} | {_acc(d, tasks)} | {d['params'] / 1e6:.1f}M |")
    for row in r["static"]:
        name = row["criterion"] + (" (local)" if row["scope"] == "local" else "")
        lines.append(f"| {name} | {row['sparsity']:.0%} | {row['perplexity']:.2f} | {_acc(row, tasks)} | "
                     f"{row['params'] / 1e6:.1f}M |")
    head = ["method", "sparsity", "perplexity", *tasks, "average", "above chance"]
    lines += ["", "**Dynamic** (per input; layer 0 dense; sparsity p of the heads and neurons of layers 1–29; prompt "
              "sparse; perplexity selects at each window's token 255 and scores all 512 tokens; lm-eval requests "
              "select at their last token):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| dense | 0 | {d['perplexity']:.2f} | {_acc(d, tasks)} |")
    for row in r["dynamic"]:
        name = f"{row['design']} ({row['criterion']}, {row['scope']})"
        lines.append(f"| {name} | {row['sparsity']:.0%} | {row['perplexity']:.2f} | {_acc(row, tasks)} |")
    if r.get("speed"):
        lines += ["", "**Decode latency** (`prunekit bench`, batch 1):", "",
                  "| model | decode tok/s | ms/token | speed-up | ideal (MACs) | gather ms |", "|---|---|---|---|---|---|"]
        for row in r["speed"]:
            gather = f"{row['gather_ms']:.1f}" if "gather_ms" in row else "–"
            tok_s = row.get("decode_tok_s") or 0
            lines.append(f"| {row.get('model')} | {tok_s:.1f} | {1000 / tok_s if tok_s else float('nan'):.1f} | "
                         f"{row.get('decode_speedup', 1):.2f}× | {row.get('ideal_speedup', 1):.2f}× | {gather} |")
    lines += ["", f"Total {m.get('total_s', 0) / 60:.0f} min; one gradient pass over the calibration examples "
              f"{m.get('trace_s', 0):.0f} s."]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for c in dict.fromkeys(row["criterion"] for row in r["static"] if row["scope"] == "global"):
        rows = [row for row in r["static"] if row["criterion"] == c and row["scope"] == "global"]
        axes[0].plot([row["sparsity"] for row in rows], [row["average_acc"] for row in rows], marker="o", label=c)
    axes[0].axhline(r["dense"]["average_acc"], color="grey", ls="--", label="dense")
    axes[0].set(xlabel="sparsity (global)", ylabel="mean acc, seven tasks", title="static criteria")
    axes[0].legend(fontsize=8)
    for design in dict.fromkeys(row["design"] for row in r["dynamic"]):
        rows = [row for row in r["dynamic"] if row["design"] == design]
        axes[1].plot([row["sparsity"] for row in rows], [row["average_acc"] for row in rows], marker="o",
                     label=f"{design} ({rows[0]['criterion']})")
    axes[1].axhline(r["dense"]["average_acc"], color="grey", ls="--", label="dense")
    axes[1].set(xlabel="sparsity (per input)", ylabel="mean acc, seven tasks", title="dynamic")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{Path(r['meta']['model']).name}: ShadowLLM criteria and predictors")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
