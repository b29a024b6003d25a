"""SEAP's own commands: ``prunekit activations`` (per-task activation profiles, SEAP Figures 1 and 3) and
``prunekit sensitivity`` (one layer pruned at a time, Figures 5-6); registered through the entry-point group
``prunekit.commands`` (``prunekit.strategies.seap.commands``)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.jobs import log_and_close
from prunekit.parsers import BaseCLI


class ActivationsCLI(BaseCLI):
    """Per-task activation profiles (two random halves of each task's calibration examples), their similarity
    and a projection of per-prompt hidden states (SEAP Figures 1 and 3)."""

    command = "activations"

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--tasks", type=list[str], default=["seap7"],
                            help="Tasks or groups whose calibration examples are profiled (two random halves each).")
        parser.add_argument("--sites", type=list[str], default=["attn_in"],
                            help="Where to read activations: attn_in, mlp_in, attn_mid, mlp_mid.")
        parser.add_argument("--dims", type=int, default=32, help="Dimensions sampled (seeded) for the heatmaps.")
        parser.add_argument("--projection_samples", type=int, default=32,
                            help="Prompts per task for the 2-D projection of hidden states (0 = no projection).")
        parser.set_defaults({"data.packing": "documents", "data.sampling": "random", "data.num_samples": 64,
                             "data.corpus": "task"})

    def before_instantiate_classes(self) -> None:
        from prunekit.strategies.seap.activations import SITES
        from prunekit.tasks import leaf_tasks

        c = self.config
        if not leaf_tasks(c.tasks):
            raise PrunekitError("--tasks names no task to profile (perplexity is not a task here)")
        bad = [site for site in c.sites if site not in SITES]
        if bad or not c.sites:
            raise PrunekitError(f"unknown --sites {bad}; choose from {', '.join(SITES)}")
        if c.dims < 1:
            raise PrunekitError(f"--dims must be >= 1, got {c.dims}")
        if c.projection_samples < 0:
            raise PrunekitError(f"--projection_samples must be >= 0, got {c.projection_samples}")
        if c.data.packing != "documents" or c.data.corpus != "task":
            raise PrunekitError("activations feeds each task example on its own: keep data.packing=documents and "
                                "data.corpus=task (choose the examples with --tasks)")
        c.data.corpus_options = {"tasks": leaf_tasks(c.tasks)}  # one source per task, each sampled with the seed
        if not c.get("output_dir"):
            c.output_dir = f"runs/{Path(c.model.model).name}-activations"
        super().before_instantiate_classes()


def run_activations(cli: ActivationsCLI) -> dict:
    """Per task: profile two random halves of its calibration examples; heatmaps, similarity, safetensors."""
    from prunekit.data import sequence_loader
    from prunekit.export import scratch
    from prunekit.strategies.seap.activations import halves, profile, similarity
    from prunekit.tasks import leaf_tasks

    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    tasks, sites = leaf_tasks(cli.config.tasks), list(cli.config.sites)
    start = time.perf_counter()
    profiles: dict[str, dict[str, dict]] = {site: {} for site in sites}  # site -> task -> half -> (layers, dims)
    counts, for_projection = {}, {}
    sequences, labels = dm.calibration_sequences(), dm.calibration_labels()
    for index, task in enumerate(tasks):
        sequences_of_task = [s for s, label in zip(sequences, labels) if label == index]
        counts[task] = {}
        for_projection[task] = sequences_of_task[: cli.config.projection_samples]
        for half, part in zip(("A", "B"), halves(sequences_of_task)):
            if trainer.is_global_zero:
                print(f"profiling {task} half {half}: {len(part)} examples, {sum(x.numel() for x in part)} tokens",
                      flush=True)
            for site, value in profile(trainer, module, sequence_loader(part), sites,
                                       f"profiling {task} half {half}").items():
                profiles[site].setdefault(task, {})[half] = value.float()
            counts[task][half] = {"examples": len(part), "tokens": int(sum(x.numel() for x in part))}
    result = {"model": module.model_name, "tasks": tasks, "sites": sites, "examples": counts,
              "data": {"num_samples": dm.num_samples, "seq_len": dm.seq_len, "sampling": dm.sampling, "seed": dm.seed},
              "similarity": {site: similarity(profiles[site]) for site in sites}, "time_s": time.perf_counter() - start}
    if not trainer.is_global_zero:
        return result
    with scratch() as plot_dir:
        return _finish_activations(cli, result, profiles, tasks, sites, for_projection, plot_dir)


def _finish_activations(cli, result, profiles, tasks, sites, for_projection, plot_dir) -> dict:
    from prunekit.export import write_atomically
    from prunekit.strategies.seap.plots import activation_heatmaps, sampled_dimensions, similarity_matrix

    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    images, flat, tables = {}, {}, {}
    name = Path(module.model_name).name
    if cli.config.projection_samples and len(tasks) >= 2:
        from prunekit.arch import adapter_for
        from prunekit.strategies.seap.activations import project, projection_layers, prompt_states
        from prunekit.strategies.seap.plots import task_projection

        layers = projection_layers(len(adapter_for(module.model).layers(module.model)))
        seqs = [s for task in tasks for s in for_projection[task]]
        labels = [i for i, task in enumerate(tasks) for _ in for_projection[task]]
        print(f"projecting {len(seqs)} prompts' hidden states at layers {layers} (t-SNE)", flush=True)
        points, silhouettes = project(prompt_states(module.model, seqs, layers), labels, dm.seed)
        result["projection"] = {"layers": layers, "silhouette": silhouettes, "prompts_per_task":
                                {t: len(for_projection[t]) for t in tasks}}
        images["task_projection"] = task_projection(points, labels, tasks, layers, silhouettes,
                                                    plot_dir / "task_projection.png",
                                                    title=f"{name}: per-prompt hidden states by task (t-SNE)")
        print("  silhouette of the task labels (cosine, original space) by layer: " +
              ", ".join(f"{l}: {v:.3f}" for l, v in zip(layers, silhouettes)))
        flat.update({f"projection/silhouette_layer_{l:02d}": v for l, v in zip(layers, silhouettes)})
    for site in sites:
        width = next(iter(profiles[site].values()))["A"].shape[1]
        dims = sampled_dimensions(width, cli.config.dims, dm.seed)
        images[f"activation_heatmap_{site}"] = activation_heatmaps(
            profiles[site], plot_dir / f"activation_heatmap_{site}.png", dims,
            title=f"{name}: RMS of {site} per layer, {len(dims)} of {width} dimensions (z-score per layer)")
        sim = result["similarity"][site]
        print(f"\n{site}: dimension-wise activation profiles, cosine of centred log-norms between halves")
        if sim["matrix"] is None:
            print("  (one task: similarity across tasks needs at least two)")
            continue
        images[f"activation_similarity_{site}"] = similarity_matrix(sim, plot_dir / f"activation_similarity_{site}.png",
                                                                  title=f"{name} {site}: half A vs half B")
        print(f"  same task (A vs B): {sim['same_task']:.3f}; other tasks: {sim['other_tasks']:.3f}; "
              f"B nearest its own A: {sim['retrieval']:.0%} of tasks")
        for task, v in sim["per_task"].items():
            print(f"  {task:<16} {v:.3f}")
        flat.update({f"{site}/same_task": sim["same_task"], f"{site}/other_tasks": sim["other_tasks"],
                     f"{site}/retrieval": sim["retrieval"]})
        tables[f"similarity_{site}"] = (["half A \\ half B", *sim["tasks"]],
                                        [[t, *row] for t, row in zip(sim["tasks"], sim["matrix"])])
    log_and_close(trainer, flat, tables=tables, images=images)

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
        save_file({f"{site}/{task}/{half}": t.contiguous() for site, by_task in profiles.items()
                   for task, by_half in by_task.items() for half, t in by_half.items()},
                  str(tmp / "activations.safetensors"))
        for path in images.values():
            shutil.copy(path, tmp / Path(path).name)

    out = write_atomically(cli.config.output_dir, cli.config.overwrite, write)
    print(f"saved to {out}")
    return result


class SensitivityCLI(BaseCLI):
    """Prune one decoder layer at a time (seeded random heads and MLP channels) and measure the damage (SEAP
    Figures 5-6)."""

    command = "sensitivity"

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ratios", type=list[float], default=[0.2, 0.5, 1.0],
                            help="Fractions of one layer's heads and MLP channels to remove, in (0, 1].")
        parser.add_argument("--metric", type=str, default="perplexity",
                            help="perplexity (held-out wiki) or one lm-eval task (acc), e.g. piqa.")
        parser.add_argument("--limit", type=int | float | None, default=100, help="Documents of the task (lm-eval --limit).")
        parser.add_argument("--layers", type=list[int] | None, default=None, help="Layers to test (default: all).")
        parser.add_argument("--batch_size", type=int, default=8, help="lm-eval batch size.")

    def before_instantiate_classes(self) -> None:
        from prunekit.tasks import TASKS

        c = self.config
        if c.metric != "perplexity" and c.metric not in TASKS:
            raise PrunekitError(f"--metric must be perplexity or one task ({', '.join(t for t in TASKS if not t.startswith('mmlu_'))}, "
                                f"mmlu_<subject>), got {c.metric!r}")
        bad = [r for r in c.ratios if not 0 < r <= 1]
        if bad or not c.ratios:
            raise PrunekitError(f"--ratios must be in (0, 1], got {c.ratios}")
        if not c.get("output_dir"):
            c.output_dir = f"runs/{Path(c.model.model).name}-sensitivity-{c.metric}"
        super().before_instantiate_classes()


def run_sensitivity(cli: SensitivityCLI) -> dict:
    """Dense score, then the score with each single layer pruned at each ratio; table, plot, JSON."""
    from prunekit.arch import adapter_for
    from prunekit.evaluate import perplexity
    from prunekit.export import scratch, write_atomically
    from prunekit.progress import bar
    from prunekit.strategies.seap.plots import sensitivity as sensitivity_plot
    from prunekit.strategies.seap.sensitivity import layer_models

    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    c = cli.config
    dense_model = module.model
    n_layers = len(adapter_for(dense_model).layers(dense_model))
    layers = c.layers if c.layers is not None else list(range(n_layers))
    if c.metric == "perplexity":
        dm.check_model(dense_model.config)

    def score(model) -> float:
        if c.metric == "perplexity":
            return perplexity(trainer, model, dm, "perplexity")
        from prunekit.zeroshot import evaluate_tasks

        return evaluate_tasks(model, dm.tokenizer, [c.metric], limit=c.limit, batch_size=c.batch_size)["tasks"][c.metric]["acc"]

    if c.metric != "perplexity" and not trainer.is_global_zero:
        return {}  # lm-eval runs on rank 0 only
    start = time.perf_counter()
    dense = score(dense_model)
    rows = []
    steps = bar(layer_models(dense_model, c.ratios, dm.seed, layers), "sensitivity: layers x ratios",
                trainer.is_global_zero, total=len(layers) * len(c.ratios))
    for layer, ratio, model in steps:
        rows.append({"layer": layer, "ratio": ratio, "value": score(model)})
        del model
    name = Path(module.model_name).name
    what = "perplexity (held-out wiki, lower is better)" if c.metric == "perplexity" else f"{c.metric} acc"
    result = {"model": module.model_name, "metric": c.metric, "limit": c.limit if c.metric != "perplexity" else None,
              "ratios": c.ratios, "seed": dm.seed, "dense": dense, "rows": rows, "time_s": time.perf_counter() - start}
    if not trainer.is_global_zero:
        return result
    print(f"\n{name}: {what} with one layer pruned (random heads and MLP channels, seed {dm.seed}); dense {dense:.4g}")
    print("| layer | " + " | ".join(f"{r:.0%}" for r in c.ratios) + " |")
    print("|---|" + "---|" * len(c.ratios))
    for layer in layers:
        values = {r["ratio"]: r["value"] for r in rows if r["layer"] == layer}
        print(f"| {layer} | " + " | ".join(f"{values[r]:.4g}" for r in c.ratios) + " |")
    with scratch() as plot_dir:
        plot = sensitivity_plot(rows, what, plot_dir / "sensitivity.png", dense=dense,
                                log_scale=c.metric == "perplexity", title=f"{name}: {what}, one layer pruned at a time")
        flat = {f"sensitivity/layer_{r['layer']:02d}/{r['ratio']:g}": r["value"] for r in rows}
        log_and_close(trainer, {"dense": dense, **flat},
                      tables={"sensitivity": (["layer", "ratio", "value"],
                                              [[r["layer"], r["ratio"], r["value"]] for r in rows])},
                      images={"sensitivity": plot})

        def write(tmp: Path) -> None:
            (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
            shutil.copy(plot, tmp / "sensitivity.png")

        out = write_atomically(c.output_dir, c.overwrite, write)
    print(f"saved to {out}")
    return result
