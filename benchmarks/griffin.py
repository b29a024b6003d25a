"""GRIFFIN on SmolLM2-135M: split-protocol perplexity, density and prompt-length sweeps, class-mode zero-shot,
expert overlap between tasks, greedy agreement with dense, GRIFFIN on a FLAP cut, and decode speed.

    python benchmarks/griffin.py [--out benchmarks/results] [--windows 16] [--sweep_windows 6] [--limit 100]

- Split perplexity: held-out wiki windows of 512 tokens (``--seq_len``; the same windows ``prunekit eval`` uses);
  the first 256 tokens are the prompt, the last 256 are scored in generation. Computed with the runtime's ``prefix`` mode (one
  forward per window), shown equal to prefill + token-by-token cached decoding on the first windows.
- Density sweep 0.1…0.9 (the paper's Fig. 5) and prompt-length sweep (Fig. 7: prompt P, the next 128 tokens
  scored) for GRIFFIN and the magnitude baseline.
- Zero-shot (the paper's Table 4 protocol, ``class`` mode): lm-eval acc on PIQA, ARC-e, ARC-c, HellaSwag, BoolQ,
  COPA — dense, GRIFFIN, magnitude.
- Jaccard overlap of expert sets between prompts of the same and of different tasks (Fig. 3).
- Greedy agreement with the dense model over 64 new tokens (a fidelity figure).
- GRIFFIN on a FLAP 20% cut (``prunekit prune --model <flap folder> --strategy griffin``) vs each alone.
- Speed: one ``prunekit bench`` process, dense vs GRIFFIN (per-sequence and shared batch rule) vs a static cut of
  the same MLP width (GRIFFIN's magnitude experts cut out physically), batch 1 and 4, with the gather cost.

Writes ``griffin.md`` (the README tables), ``griffin.json``, ``griffin.png`` and ``griffin_jaccard.png``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import common
import torch

TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "boolq", "copa"]
VARIANTS = ["topk", "magnitude", "sample", "topk_sample", "random"]
DENSITIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
PROMPT_LENGTHS = [8, 16, 32, 64, 128, 256, 384]


def install(model, **options):
    """Install a GRIFFIN runtime on ``model`` (replacing one already there); returns the runtime."""
    from prunekit.plans import RuntimePolicy
    from prunekit.realize import realizer_for
    from prunekit.strategies.griffin.runtime import GriffinRuntime

    runtime = GriffinRuntime(**options)
    realizer_for(RuntimePolicy(runtime)).apply(model, RuntimePolicy(runtime))
    return runtime


def uninstall(model) -> None:
    from prunekit.realize.runtime import runtime_of

    runtime = runtime_of(model)
    if runtime is not None:
        runtime.remove(model)
        model.__dict__.pop("_prunekit_runtime", None)


def static_cut(model_name: str, density: float, folder: Path) -> None:
    """The magnitude baseline's experts cut out physically: the static model of the same MLP width."""
    from prunekit.arch import adapter_for
    from prunekit.models import load_model, load_tokenizer
    from prunekit.plans import LayerCut, UnitCut
    from prunekit.realize import realizer_for
    from prunekit.strategies.griffin.runtime import magnitude_scores

    model = load_model(model_name)
    refs: dict[int, dict] = {}
    for ref in adapter_for(model).linears(model):
        refs.setdefault(ref.layer, {})[ref.role] = ref.weight
    cuts = {}
    for i, roles in refs.items():
        scores = magnitude_scores({r: w for r, w in roles.items() if r in ("gate", "up", "fc1")})
        keep = set(scores.topk(int(density * scores.numel())).indices.tolist())
        cuts[i] = LayerCut([], [c for c in range(scores.numel()) if c not in keep])
    plan = UnitCut(cuts)
    realizer = realizer_for(plan)
    realizer.save(realizer.apply(model, plan), folder, load_tokenizer(model_name))
    (folder / "prunekit.json").write_text(json.dumps({"plan": "unit_cut", "pruned_by": {
        "strategy": f"static cut: GRIFFIN magnitude experts, density {density}"}}))


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--windows", type=int, default=16, help="held-out windows (--seq_len tokens) for split perplexity")
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="zero-shot tasks (class mode)")
    parser.add_argument("--densities", nargs="+", type=float, default=DENSITIES, help="density sweep")
    parser.add_argument("--prompt_lengths", nargs="+", type=int, default=PROMPT_LENGTHS, help="prompt-length sweep")
    parser.add_argument("--limit", type=float, default=100, help="lm-eval documents per task (class mode)")
    parser.add_argument("--sweep_windows", type=int, default=6, help="windows for the density and prompt sweeps")
    parser.add_argument("--decode_check", type=int, default=2, help="windows scored token by token too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed_only", action="store_true",
                        help="re-measure only the speed section (on a quiet machine) into an existing griffin.json")
    args = parser.parse_args()
    if args.speed_only:
        results = json.loads((args.out / "griffin.json").read_text())
        with tempfile.TemporaryDirectory() as tmp:
            results["speed"] = speed(args, Path(tmp), common.Progress(3))
        write(results, args.out)
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from prunekit.data import CalibrationDataModule
    from prunekit.models import load_model, load_tokenizer
    from prunekit.strategies.griffin import protocol
    from prunekit.tasks import prompt_pairs
    from prunekit.zeroshot import evaluate_tasks

    started = time.time()
    progress = common.Progress(11)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    seq, half = args.seq_len, args.seq_len // 2
    after = min(128, seq // 4)  # tokens scored after each prompt in the prompt-length sweep
    lengths_p = [p for p in args.prompt_lengths if p + after <= seq]
    dm = CalibrationDataModule(args.model, seq_len=seq, eval_samples=args.windows)
    windows = dm.evaluation_windows()
    few = windows[:args.sweep_windows]
    results: dict = {"meta": {"model": args.model, "windows": int(windows.shape[0]), "seq_len": seq, "after": after,
                              "sweep_windows": int(few.shape[0]), "densities": args.densities,
                              "limit": args.limit, "cpu_count": os.cpu_count(),
                              "threads": torch.get_num_threads()}}

    # 1. split perplexity at density 0.5, every variant; prefix mode vs token-by-token decoding
    progress.step("split perplexity, density 0.5")
    split = {"dense": protocol.split_perplexity(model, windows, half)}
    for variant in VARIANTS:
        install(model, density=0.5, variant=variant)
        split[variant] = protocol.split_perplexity(model, windows, half)
        print(f"  {variant}: {split[variant]:.3f} (dense {split['dense']:.3f})", flush=True)
    install(model, density=0.5)
    check = windows[:args.decode_check]
    prefix_nll = protocol.split_nll(model, check, half, how="prefix")
    decode_nll = protocol.split_nll(model, check, half, how="decode")
    results["prefix_vs_decode"] = {"windows": int(check.shape[0]), "prefix_nll": prefix_nll[0],
                                   "decode_nll": decode_nll[0], "tokens": prefix_nll[1],
                                   "max_abs_diff_mean_nll": abs(prefix_nll[0] - decode_nll[0]) / prefix_nll[1]}
    uninstall(model)
    results["split"] = split

    # 2. density sweep and 3. prompt-length sweep
    progress.step("density sweep")
    sweep = []
    for variant in ("topk", "magnitude"):
        for d in args.densities:
            install(model, density=d, variant=variant)
            sweep.append({"variant": variant, "density": d, "perplexity": protocol.split_perplexity(model, few, half)})
            print(f"  {variant} {d}: {sweep[-1]['perplexity']:.3f}", flush=True)
    uninstall(model)
    results["density_sweep"] = sweep
    progress.step("prompt-length sweep")
    lengths = []
    for p in lengths_p:
        row = {"prompt_len": p, "dense": protocol.split_perplexity(model, few, p, after)}
        for variant in ("topk", "magnitude"):
            install(model, density=0.5, variant=variant)
            row[variant] = protocol.split_perplexity(model, few, p, after)
            uninstall(model)
        lengths.append(row)
        print(f"  P={p}: {row}", flush=True)
    results["prompt_sweep"] = lengths

    # 4. class-mode zero-shot
    progress.step("zero-shot, class mode")
    limit = int(args.limit) if args.limit >= 1 else args.limit
    zeroshot = {}
    for name, options in (("dense", None), ("griffin", {"variant": "topk"}), ("magnitude", {"variant": "magnitude"})):
        if options:
            install(model, density=0.5, mode="class", **options)
        summary = evaluate_tasks(model, tokenizer, args.tasks, limit=limit, cache=args.dense_cache and not options)
        uninstall(model)
        zeroshot[name] = {t: summary["tasks"][t].get("acc") for t in args.tasks}
        zeroshot[name]["average"] = summary["average"].get("acc")
        print(f"  {name}: {zeroshot[name]}", flush=True)
    results["zeroshot"] = zeroshot
    results["meta"]["tasks"] = args.tasks

    # 5. expert overlap between tasks
    progress.step("expert overlap (Jaccard)")
    per_task = 6
    prompts, labels = [], []
    for task in ("piqa", "arc_easy", "hellaswag", "boolq"):
        for context, _ in prompt_pairs(task, "evaluation")[:per_task]:
            prompts.append(tokenizer(context, return_tensors="pt").input_ids[0])
            labels.append(task)
    install(model, density=0.5)
    sets = protocol.expert_sets(model, prompts)
    uninstall(model)
    n = len(sets)
    matrix = [[protocol.jaccard(sets[i], sets[j]) for j in range(n)] for i in range(n)]
    same = [matrix[i][j] for i in range(n) for j in range(n) if i < j and labels[i] == labels[j]]
    other = [matrix[i][j] for i in range(n) for j in range(n) if i < j and labels[i] != labels[j]]
    results["jaccard"] = {"labels": labels, "matrix": matrix, "same_task": sum(same) / len(same),
                          "different_task": sum(other) / len(other), "density": 0.5,
                          "chance": 0.5 / (2 - 0.5)}  # two random half-sets: E|A∩B|/|A∪B| ≈ d/(2−d)

    # 6. greedy agreement with dense
    progress.step("greedy agreement with dense")
    import copy

    gen_prompts = [w[:min(128, half)] for w in windows[:8]]
    agreement = {}
    for name, options in (("griffin", {"variant": "topk"}), ("magnitude", {"variant": "magnitude"})):
        pruned = copy.deepcopy(model)
        install(pruned, density=0.5, **options)
        agreement[name] = protocol.generation_agreement(model, pruned, gen_prompts, 64, tokenizer.pad_token_id or 0)
        print(f"  {name}: {agreement[name]}", flush=True)
        del pruned
    results["agreement"] = agreement

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = ["--model", args.model, "--data.seq_len", str(seq), "--data.eval_samples", str(args.windows)]
        # 7. GRIFFIN on FLAP 20% (both through the command line), vs each alone
        flap = common.run(["prune", *data, "--strategy", "flap", "--strategy.sparsity", "0.2", "--eval_dense", "false",
                           "--data.num_samples", str(args.num_samples)], work / "flap20", progress)
        both = common.run(["prune", "--model", str(work / "flap20"), "--data.seq_len", str(seq), "--data.eval_samples",
                           str(args.windows), "--strategy", "griffin", "--strategy.density", "0.5",
                           "--eval_dense", "false"], work / "flap20-griffin", progress)
        cut = load_model(str(work / "flap20"))
        composed = load_model(str(work / "flap20-griffin"))
        install(model, density=0.5)
        results["composition"] = {
            "dense": split["dense"], "griffin": protocol.split_perplexity(model, windows, half),
            "flap20": protocol.split_perplexity(cut, windows, half),
            "flap20+griffin": protocol.split_perplexity(composed, windows, half),
            "flap20_params": flap["pruned"]["params_total"], "composed_eval_perplexity": both["pruned"]["perplexity"],
            "flap20_eval_perplexity": flap["pruned"]["perplexity"]}
        uninstall(model)
        del cut, composed, model

        results["speed"] = speed(args, work, progress)
    results["meta"]["total_s"] = time.time() - started
    write(results, args.out)


def speed(args, work: Path, progress) -> list[dict]:
    """One ``prunekit bench`` process: dense, the static cut, GRIFFIN per sequence and with the shared rule."""
    quick = ["--eval_dense", "false", "--data.eval_samples", "1", "--data.seq_len", str(args.seq_len)]
    common.run(["prune", "--model", args.model, "--strategy", "griffin", "--strategy.density", "0.5", *quick],
               work / "griffin50", progress)
    common.run(["prune", "--model", args.model, "--strategy", "griffin", "--strategy.density", "0.5",
                "--strategy.batch_rule", "shared", *quick], work / "griffin50-shared", progress)
    static_cut(args.model, 0.5, work / "static-mlp50")
    bench_out = work / "bench.json"
    folders = [str(work / n) for n in ("static-mlp50", "griffin50", "griffin50-shared")]
    cmd = ["bench", "--model", args.model, "--pruned", json.dumps(folders), "--batch_sizes", "[1, 4]",
           "--repeats", str(args.repeats), "--peak_memory", "false", "--output", str(bench_out)]
    print("$", " ".join(cmd), flush=True)
    common.command(cmd)
    return json.loads(bench_out.read_text())


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "griffin.json").write_text(json.dumps(results, indent=2))
    table = format_tables(results)
    (out / "griffin.md").write_text(table + "\n")
    print("\n" + table)
    plot(results, out / "griffin.png")
    plot_jaccard(results["jaccard"], out / "griffin_jaccard.png")


def format_tables(r: dict) -> str:
    m = r["meta"]
    name = Path(m["model"]).name
    s = r["split"]
    lines = [f"{name}, GRIFFIN at density 0.5 (MLP neurons kept in generation); split perplexity on {m['windows']} "
             f"held-out wiki windows of {m['seq_len']} tokens: prompt = the first {m['seq_len'] // 2}, the last "
             f"{m['seq_len'] - m['seq_len'] // 2} scored in generation; "
             f"{m['cpu_count']} CPU cores", "",
             "| model | split perplexity |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in s.items()]
    pd = r["prefix_vs_decode"]
    lines += ["", f"prefix mode vs prefill + token-by-token cached decoding, {pd['windows']} windows "
              f"({pd['tokens']} tokens): summed NLL {pd['prefix_nll']:.4f} vs {pd['decode_nll']:.4f} "
              f"(difference {pd['max_abs_diff_mean_nll']:.2e} per token)", ""]
    lines += [f"Density sweep (split perplexity, the first {m['sweep_windows']} windows):", "",
              "| density | " + " | ".join(f"{d:g}" for d in m["densities"]) + " |", "|---|" + "---|" * len(m["densities"])]
    for variant in ("topk", "magnitude"):
        row = [x["perplexity"] for x in r["density_sweep"] if x["variant"] == variant]
        lines.append(f"| {'griffin' if variant == 'topk' else variant} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    lines += ["", f"Prompt-length sweep (the {m['after']} tokens after a prompt of P tokens, density 0.5, the first "
              f"{m['sweep_windows']} windows):", "",
              "| P | dense | griffin | magnitude |", "|---|---|---|---|"]
    lines += [f"| {x['prompt_len']} | {x['dense']:.2f} | {x['topk']:.2f} | {x['magnitude']:.2f} |" for x in r["prompt_sweep"]]
    z = r["zeroshot"]
    limit = f"first {m['limit']:g} documents per task" if m["limit"] else "all documents"
    lines += ["", f"Zero-shot, class mode (experts from every token but the last; the last position sparse), lm-eval "
              f"acc, {limit}:", "", "| model | " + " | ".join(m["tasks"]) + " | average |",
              "|---|" + "---|" * (len(m["tasks"]) + 1)]
    for k, row in z.items():
        lines.append(f"| {k} | " + " | ".join(f"{row[t]:.3f}" for t in m["tasks"]) + f" | {row['average']:.3f} |")
    j = r["jaccard"]
    lines += ["", f"Expert overlap (Jaccard, mean over layers, density 0.5): same task {j['same_task']:.3f}, "
              f"different tasks {j['different_task']:.3f} (two random half-sets: {j['chance']:.3f})"]
    a = r["agreement"]
    lines += ["", f"Greedy agreement with the dense model, 8 wiki prompts of {min(128, m['seq_len'] // 2)} tokens, 64 new "
              "tokens (fidelity, not quality):", "", "| model | same token at the same position | tokens before the first difference |",
              "|---|---|---|"]
    lines += [f"| {k} | {v['token_agreement']:.1%} | {v['tokens_before_first_difference']:.1f} |" for k, v in a.items()]
    c = r["composition"]
    lines += ["", "GRIFFIN on a FLAP 20% cut (one folder: `prunekit prune --model <flap folder> --strategy griffin`), "
              "split perplexity:", "", "| dense | griffin 0.5 | flap 20% | flap 20% + griffin 0.5 |", "|---|---|---|---|",
              f"| {c['dense']:.3f} | {c['griffin']:.3f} | {c['flap20']:.3f} | {c['flap20+griffin']:.3f} |"]
    lines += ["", "Decode speed (one `prunekit bench` process, prompt 128 tokens, 32 new tokens, median of interleaved "
              "repetitions; gather = the per-sequence weight gather of the first generation step):", "",
              "| model | batch | decode tok/s | vs static cut | without the gather: tok/s, vs static cut | ms/token "
              "| gather ms / MB |", "|---|---|---|---|---|---|---|"]
    for row in r["speed"]:
        static = next(x for x in r["speed"] if x["model"] == "static-mlp50" and x["batch"] == row["batch"])
        gather = f"{row['gather_ms']:.1f} / {row['gather_mb']:.1f}" if "gather_ms" in row else "-"
        excl = row.get("decode_tok_s_excl_gather")
        excl = f"{excl:.1f}, {excl / static['decode_tok_s']:.3f}" if excl else "-"
        lines.append(f"| {row['model']} | {row['batch']} | {row['decode_tok_s']:.1f} | "
                     f"{row['decode_tok_s'] / static['decode_tok_s']:.3f} | {excl} | {row['latency_ms_per_token']:.1f} "
                     f"| {gather} |")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, label in (("topk", "GRIFFIN"), ("magnitude", "magnitude")):
        pts = [(x["density"], x["perplexity"]) for x in r["density_sweep"] if x["variant"] == variant]
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    left.axhline(r["split"]["dense"], color="black", linestyle="--", linewidth=1, label="dense")
    left.set_yscale("log")
    left.set_xlabel("density (fraction of MLP neurons kept in generation)")
    left.set_ylabel("split perplexity (log scale)")
    left.set_title(f"density sweep (prompt {r['meta']['seq_len'] // 2}, the rest scored)", fontsize=9)
    left.legend(fontsize=8)
    xs = [x["prompt_len"] for x in r["prompt_sweep"]]
    for key, label in (("dense", "dense"), ("topk", "GRIFFIN 0.5"), ("magnitude", "magnitude 0.5")):
        right.plot(xs, [x[key] for x in r["prompt_sweep"]], marker="o", label=label)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("prompt tokens P")
    right.set_ylabel(f"perplexity of the next {r['meta']['after']} tokens (log scale)")
    right.set_title("prompt-length sweep", fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(f"GRIFFIN on {Path(r['meta']['model']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_jaccard(j: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    image = ax.imshow(j["matrix"], cmap="viridis")
    ticks = [i for i, label in enumerate(j["labels"]) if i == 0 or j["labels"][i - 1] != label]
    ax.set_xticks(ticks, [j["labels"][i] for i in ticks], rotation=30, fontsize=8)
    ax.set_yticks(ticks, [j["labels"][i] for i in ticks], fontsize=8)
    ax.set_title(f"expert-set Jaccard between prompts, mean over layers\nsame task {j['same_task']:.2f}, "
                 f"different tasks {j['different_task']:.2f}, random half-sets {j['chance']:.2f}", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
