"""``prunekit`` command line: ``prune``, ``eval``, ``activations``, ``sensitivity``, ``bench`` and ``strategies``.

``prune``, ``eval``, ``activations`` and ``sensitivity`` are LightningCLI parsers (jsonargparse): every option works from YAML (``--config``),
dotted overrides (``--strategy.sparsity 0.6``, ``--trainer.devices 2``) and ``--print_config``. Shorthands:
``--strategy wanda`` names a registered strategy; ``--model smollm2-135m`` sets ``--model.model``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from prunekit import registry
from prunekit.errors import PrunekitError

log = logging.getLogger("prunekit")

USAGE = """usage: prunekit {prune,eval,activations,sensitivity,bench,strategies} [options]

  prune        calibrate, prune, evaluate and save a model   (prunekit prune --help)
  eval         perplexity and lm-eval tasks of a model or pruned folder  (prunekit eval --help)
  activations  per-task activation heatmaps and their similarity  (prunekit activations --help)
  sensitivity  prune one layer at a time, measure the damage  (prunekit sensitivity --help)
  strategies   list the registered pruning strategies
  bench        prefill/decode tokens/s of a model vs pruned folders  (prunekit bench --help)

examples:
  prunekit prune --config configs/wanda.yaml
  prunekit prune --config configs/wanda.yaml --strategy.sparsity 0.6 --output_dir runs/wanda-60
  prunekit prune --strategy sparsegpt --strategy.pattern 2:4 --output_dir runs/sgpt-24
  prunekit eval --model runs/wanda-60
  prunekit eval --model runs/wanda-60 --tasks [perplexity,seap7] --limit 200
  prunekit bench --model smollm2-135m --pruned [runs/flap-20]
  prunekit activations --tasks [seap7] --data.num_samples 64 --output_dir runs/activations
  prunekit sensitivity --metric piqa --limit 100 --output_dir runs/sensitivity
"""


def _trainer_defaults() -> dict:
    from prunekit.callbacks import SparsityLogger

    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs", "name": "prunekit"}},
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "inference_mode": False,
        "callbacks": [SparsityLogger()],
    }


def _rewrite_shorthands(args: list[str]) -> list[str]:
    """``--strategy NAME`` → its class path; ``--model NAME_OR_FOLDER`` → ``--model.model``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if key in ("--strategy", "--model"):
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
                i += 1
            if key == "--strategy" and value in registry.available():
                value = registry.class_path(value)
            elif key == "--strategy" and "." not in value and not value.startswith("{") and value:
                registry.get(value)  # raises: unknown strategy, lists the available ones
            if key == "--model" and not value.endswith((".yaml", ".yml", ".json")) and not value.startswith("{"):
                key = "--model.model"
            out += [key, value]
        else:
            out.append(arg)
        i += 1
    return out


class _BaseCLI(LightningCLI):
    def __init__(self, args: list[str], **kwargs) -> None:
        from prunekit.data import CalibrationDataModule
        from prunekit.module import PrunableLM

        super().__init__(
            PrunableLM,
            CalibrationDataModule,
            args=_rewrite_shorthands(args),
            run=False,
            save_config_callback=None,
            trainer_defaults=_trainer_defaults(),
            seed_everything_default=0,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_argument("--output_dir", type=str | None, default=None, help="Folder for the results.")
        parser.add_argument("--overwrite", type=bool, default=False, help="Replace an existing output folder.")

    def before_instantiate_classes(self) -> None:
        from prunekit.export import check_output_dir

        if self.config.get("output_dir"):
            check_output_dir(self.config.output_dir, self.config.overwrite, source=self.config.model.model)

    @property
    def is_global_zero(self) -> bool:
        return self.trainer.is_global_zero


class PruneCLI(_BaseCLI):
    def add_arguments_to_parser(self, parser) -> None:
        from prunekit.strategy import PruningStrategy

        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(PruningStrategy, "strategy", subclass_mode=True, required=True)
        parser.add_argument("--eval_dense", type=bool, default=True, help="Also evaluate the dense model first.")
        parser.add_argument("--save_model", type=bool, default=True, help="Save the pruned model (safetensors).")
        parser.add_argument("--save_statistics", type=bool, default=False,
                            help="Save the reduced calibration statistics to statistics.safetensors.")
        parser.add_argument("--statistics", type=str | None, default=None,
                            help="Prune from a statistics.safetensors saved by --save_statistics (same model and "
                                 "calibration data) instead of calibrating; all-at-once mode.")
        parser.add_argument("--router", type=bool, default=True,
                            help="With task experts (seap --strategy.tasks): also train a task router (saved in the folder).")
        parser.add_argument("--router_per_task", type=int, default=200,
                            help="Router training prompts per task (calibration split) and held-out prompts per task.")

    def before_instantiate_classes(self) -> None:
        if not self.config.get("output_dir"):
            c = self.config
            what = c.strategy.init_args.get("pattern", "unstructured")
            if what == "unstructured":
                what = f"{c.strategy.init_args.get('sparsity') or 0.5:g}"
            name = c.strategy.class_path.rsplit(".", 1)[-1].lower()
            c.output_dir = f"runs/{Path(c.model.model).name}-{name}-{what.replace(':', 'of')}"
        super().before_instantiate_classes()


def _strategy_of(trainer):
    from prunekit.strategy import PruningStrategy

    found = [cb for cb in trainer.callbacks if isinstance(cb, PruningStrategy)]
    if len(found) != 1:
        raise PrunekitError(f"expected exactly one pruning strategy, found {len(found)}")
    return found[0]


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _print_table(rows: list[dict]) -> None:
    head = f"| {'model':<36} | {'perplexity':>10} | {'pruned':>8} | {'non-zero / total params':>23} | {'time (s)':>8} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        params = f"{_fmt_params(r['params_nonzero'])} / {_fmt_params(r['params_total'])}"
        t = f"{r['time_s']:.1f}" if r.get("time_s") is not None else ""
        print(f"| {r['name']:<36} | {r['perplexity']:>10.3f} | {r.get('pruned_fraction', r.get('sparsity', 0.0)):>8.1%} | {params:>23} | {t:>8} |")


def _log_and_close(trainer, metrics: dict, hparams: dict | None = None, tables: dict | None = None,
                   images: dict | None = None) -> None:
    """Log final metrics (rank 0) and close the logger, so W&B writes its run summary even offline.

    ``tables`` ({key: (columns, rows)}) and ``images`` ({key: png path}) go to loggers that take them
    (W&B); every logger gets the metrics, and the same tables/images are always saved in the output folder.
    """
    logger = trainer.logger
    if logger is None:
        return
    if hparams:
        logger.log_hyperparams(hparams)
    logger.log_metrics(metrics)
    for key, (columns, rows) in (tables or {}).items():
        if callable(getattr(logger, "log_table", None)):
            logger.log_table(key=key, columns=columns, data=rows)
    for key, path in (images or {}).items():
        if callable(getattr(logger, "log_image", None)):
            logger.log_image(key=key, images=[str(path)])
    logger.finalize("success")
    run = getattr(logger, "_experiment", None)  # WandbLogger's run, if one was started
    if run is not None and callable(getattr(run, "finish", None)):
        run.finish()


def _peak_rss_mb() -> float:
    from prunekit.memory import peak_rss_mb

    return peak_rss_mb()


def run_prune(cli: PruneCLI) -> dict:
    """The ``prune`` job: dense eval, calibrate + prune, pruned eval, report, atomic save."""
    from prunekit.evaluate import linear_counts, parameter_counts, perplexity, sparsity_report, summarize_sparsity
    from prunekit.export import write_atomically

    start = time.perf_counter()
    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    strategy = _strategy_of(trainer)
    strategy.keep_statistics = strategy.keep_statistics or cli.config.save_statistics
    # Validate everything cheap before the expensive passes: targets, N:M widths, both corpora.
    dm.check_model(module.model.config)
    strategy.targets(module.model)
    saved = None
    if cli.config.statistics:  # read once, before any work: a wrong or missing file fails here
        saved = strategy.load_statistics(module.model, cli.config.statistics)
    elif strategy.needs_calibration:
        dm.calibration_sequences()
    dm.evaluation_windows()
    dense_summary = summarize_sparsity(sparsity_report(module.model))
    result: dict = {
        "model": module.model_name,
        **strategy.describe(),
        "data": {"corpus": dm.corpus, "num_samples": dm.num_samples, "seq_len": dm.seq_len,
                 "sampling": dm.sampling, "seed": dm.seed, "packing": dm.packing, "eval_corpus": dm.eval_corpus,
                 "eval_windows": int(dm.evaluation_windows().shape[0])},
        "world_size": trainer.world_size,
    }
    if cli.config.statistics:
        result["data"]["statistics"] = str(cli.config.statistics)
    dense_linear, dense_nonzero = linear_counts(module.model)
    dense = {**parameter_counts(module.model), "sparsity": dense_summary["sparsity_linear"],
             "pruned_fraction": 1 - dense_nonzero / dense_linear}
    if cli.config.eval_dense:
        t = time.perf_counter()
        dense["perplexity"] = perplexity(trainer, module, dm)
        dense["eval_s"] = time.perf_counter() - t
    result["dense"] = dense

    from prunekit.structured import StructuredStrategy
    from prunekit.surgery import structure

    structured = isinstance(strategy, StructuredStrategy)
    if structured:
        result["dense_structure"] = structure(module.model)
    strategy.run(trainer, module, dm, statistics=saved)
    if getattr(strategy, "experts_", None):
        return _finish_experts(cli, strategy, result, dense_linear, start)
    summary = summarize_sparsity(sparsity_report(module.model))
    t = time.perf_counter()
    pruned = {**parameter_counts(module.model), "sparsity": summary["sparsity_linear"],
              "pruned_fraction": 1 - linear_counts(module.model)[1] / dense_linear,
              "perplexity": perplexity(trainer, module, dm), "eval_s": time.perf_counter() - t,
              "calibrate_prune_s": strategy.timings["prune_s"]}
    pruned["params_removed_fraction"] = 1 - pruned["params_total"] / dense["params_total"]  # of all parameters
    result["pruned"] = pruned
    result["per_layer_sparsity"] = summary["per_layer"]
    result["per_role_sparsity"] = summary["per_role"]
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = _peak_rss_mb()
    if not trainer.is_global_zero:
        return result

    how = [strategy.pattern if strategy.nm else f"{strategy.sparsity:.0%}", strategy.mode]
    if structured:  # the layer allocation tells UL-UM from AL-AM
        how.insert(1, strategy.allocation)
    label = f"{strategy.name} ({', '.join(how)})"
    if structured:
        result["structure"] = structure(module.model)
    rows = []
    if "perplexity" in dense:
        rows.append({"name": f"dense {Path(module.model_name).name}", **dense, "time_s": None})
    rows.append({"name": label, **pruned, "time_s": pruned["calibrate_prune_s"]})
    print()
    print(f"calibration: {_calibration_text(cli, strategy, dm)}; "
          f"evaluation: {dm.eval_corpus} held-out, {result['data']['eval_windows']} x {dm.seq_len} tokens; "
          f"processes: {trainer.world_size}")
    _print_table(rows)
    if "structure" in result:
        widths = " ".join(f"{i}:{l['mlp_channels']}/{l['heads']}" for i, l in enumerate(result["structure"]))
        print(f"per-layer widths (MLP channels / attention heads): {widths}")
        print(f"removed: {pruned['pruned_fraction']:.1%} of attention+MLP weights "
              f"(requested {strategy.sparsity:.0%}), {pruned['params_removed_fraction']:.1%} of all parameters")
    else:
        per_layer = " ".join(f"{i}:{v:.0%}" for i, v in summary["per_layer"].items())
        print(f"per-layer sparsity: {per_layer}")
    print(f"peak memory (RSS): {result['peak_rss_mb']:.0f} MB; wall time: {result['wall_s']:.1f} s")

    flat = {"perplexity": pruned["perplexity"], "sparsity": pruned["sparsity"],
            "params_nonzero": pruned["params_nonzero"], "calibrate_prune_s": pruned["calibrate_prune_s"]}
    if "perplexity" in dense:
        flat["perplexity_dense"] = dense["perplexity"]
    import tempfile

    from prunekit.plots import layer_profile

    plot_dir = Path(tempfile.mkdtemp(prefix="prunekit-plots-"))
    profile = layer_profile(result, plot_dir / "layer_profile.png")
    layers = result.get("structure") or [{"layer": i, "sparsity": v} for i, v in summary["per_layer"].items()]
    columns = sorted({k for row in layers for k in row if k != "biased"})
    table = (columns, [[row.get(c) for c in columns] for row in layers])
    _log_and_close(trainer, flat, strategy.describe(), tables={"per_layer": table}, images={"layer_profile": profile})

    config_text = cli.parser.dump(cli.config, skip_none=False)
    plain: list[bool] = []

    def write(tmp: Path) -> None:
        if cli.config.save_model:
            from prunekit.export import save_pruned

            plain.append(save_pruned(module.model, tmp, dm.tokenizer))
        _write_records(tmp, config_text, result, strategy, module.model_name, profile)

    out = write_atomically(cli.config.output_dir, cli.config.overwrite, write)
    shutil.rmtree(plot_dir, ignore_errors=True)
    print(f"saved to {out}")
    if plain and "structure" in result:
        how = ("transformers.AutoModelForCausalLM.from_pretrained or prunekit.load_pruned" if plain[0] else
               "prunekit.load_pruned (per-layer widths; plain AutoModelForCausalLM needs uniform widths)")
        print(f"reload with {how}")
    return result


def _calibration_text(cli, strategy, dm) -> str:
    if cli.config.statistics:
        return f"statistics of an earlier pass, read from {cli.config.statistics}"
    return dm.describe_calibration() if strategy.needs_calibration else "none (data-free method)"


def _write_records(folder: Path, config_text: str, result: dict, strategy, source: str, image: Path) -> None:
    """What every prune output folder holds besides the model: config, metrics, provenance, plot, statistics."""
    (folder / "config.yaml").write_text(config_text)
    (folder / "metrics.json").write_text(json.dumps(result, indent=2))
    (folder / "prunekit.json").write_text(json.dumps({"pruned_by": strategy.describe(), "source": source}, indent=2))
    shutil.copy(image, folder / image.name)
    if strategy.statistics_:
        from safetensors.torch import save_file

        flat = {f"{n}.{k}": v.contiguous() for n, d in strategy.statistics_.items() for k, v in d.items()}
        meta = {"strategy": strategy.name, "sources": json.dumps(strategy.sources_ or None)}
        save_file(flat, str(folder / "statistics.safetensors"), metadata=meta)  # --save_statistics


def _expert_perplexities(trainer, module, dm, routed) -> dict[str, dict]:
    """Per expert of a task-routed model: parameters, removed fraction, held-out perplexity, widths."""
    from prunekit.evaluate import linear_counts, parameter_counts, perplexity
    from prunekit.surgery import structure

    dense_linear = linear_counts(module.model)[0]
    rows = {}
    for task in routed.tasks:
        expert = routed.model_for(task)
        rows[task] = {**parameter_counts(expert), "pruned_fraction": 1 - linear_counts(expert)[1] / dense_linear,
                      "perplexity": perplexity(trainer, module, dm, expert), "structure": structure(expert)}
    return rows


def _finish_experts(cli, strategy, result: dict, dense_linear: int, start: float) -> dict:
    """``seap --strategy.tasks``: evaluate each task's expert and save a task-routed folder."""
    import tempfile

    from prunekit.export import write_atomically
    from prunekit.plots import expert_profile
    from prunekit.routing import TaskRoutedModel

    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    routed = TaskRoutedModel(module.model, {t: e["plan"] for t, e in strategy.experts_.items()},
                             {t: e["bias"] for t, e in strategy.experts_.items()}, strategy.allow_empty,
                             max_cached=1, tokenizer=dm.tokenizer,
                             meta={"pruned_by": strategy.describe(), "source": module.model_name})
    result["experts"] = _expert_perplexities(trainer, module, dm, routed)
    result["calibrate_prune_s"] = strategy.timings["prune_s"]
    from prunekit.tasks import LM_EVAL_GROUPS, TASKS

    routable = [t for t in routed.tasks if t in TASKS or t in LM_EVAL_GROUPS]  # a text corpus has no prompts
    if cli.config.router and len(routable) >= 2 and trainer.is_global_zero:
        from prunekit.router import train_router

        t = time.perf_counter()
        routed.router, result["router"] = train_router(module.model, dm.tokenizer, routable,
                                                       per_task=cli.config.router_per_task,
                                                       held_out=cli.config.router_per_task, seed=dm.seed)
        result["router"]["train_s"] = time.perf_counter() - t
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = _peak_rss_mb()
    if not trainer.is_global_zero:
        return result
    dense = result["dense"]
    print(f"\ncalibration: {_calibration_text(cli, strategy, dm)}; evaluation: {dm.eval_corpus} held-out, "
          f"{result['data']['eval_windows']} x {dm.seq_len} tokens; processes: {trainer.world_size}")
    rows = [{"name": f"dense {Path(module.model_name).name}", **dense, "time_s": None}] if "perplexity" in dense else []
    rows += [{"name": f"{strategy.name} expert: {task}", **row, "time_s": None} for task, row in result["experts"].items()]
    _print_table(rows)
    print(f"one plan per task ({strategy.allocation}, {strategy.sparsity:.0%}); calibration + planning "
          f"{result['calibrate_prune_s']:.1f} s; peak memory (RSS): {result['peak_rss_mb']:.0f} MB")
    if "router" in result:
        r = result["router"]
        print(f"task router (mean input embedding → linear, {len(routable)} tasks, chance {r['chance']:.2f}): held-out "
              f"accuracy {r['accuracy']:.3f}, macro F1 {r['macro_f1']:.3f}")
        for task, m in r["per_task"].items():
            print(f"  {task:<16} precision {m['precision']:.3f}  recall {m['recall']:.3f}  F1 {m['f1']:.3f}  "
                  f"({m['train']} training / {m['held_out']} held-out prompts)")
    flat = {f"{task}/{k}": row[k] for task, row in result["experts"].items() for k in ("perplexity", "pruned_fraction")}
    if "router" in result:
        flat.update({"router/accuracy": result["router"]["accuracy"], "router/macro_f1": result["router"]["macro_f1"]})
    if "perplexity" in dense:
        flat["perplexity_dense"] = dense["perplexity"]
    plot_dir = Path(tempfile.mkdtemp(prefix="prunekit-plots-"))
    profile = expert_profile(result, plot_dir / "experts_profile.png")
    table = (["task", "layer", "heads", "mlp_channels"],
             [[t, i, l["heads"], l["mlp_channels"]] for t, row in result["experts"].items() for i, l in enumerate(row["structure"])])
    _log_and_close(trainer, flat, strategy.describe(), tables={"experts": table}, images={"experts_profile": profile})
    config_text = cli.parser.dump(cli.config, skip_none=False)

    def write(tmp: Path) -> None:
        routed.save(tmp)
        _write_records(tmp, config_text, result, strategy, module.model_name, profile)

    out = write_atomically(cli.config.output_dir, cli.config.overwrite, write)
    shutil.rmtree(plot_dir, ignore_errors=True)
    print(f"saved to {out} (a task-routed model: prunekit eval --model {out} --tasks [...] scores each task with its "
          "expert; prunekit.routing.TaskRoutedModel.load in Python)")
    return result


class EvalCLI(_BaseCLI):
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--tasks", type=list[str], default=["perplexity"],
                            help="perplexity, lm-eval tasks (piqa, arc_easy, …, mmlu, gsm8k) or groups (seap7, "
                                 "zeroshot); see README 'Zero-shot tasks'.")
        parser.add_argument("--limit", type=int | float | None, default=None,
                            help="First N evaluation documents per task (a fraction if below 1).")
        parser.add_argument("--num_fewshot", type=int | None, default=None,
                            help="Few-shot examples (default: each task's own, 0 except gsm8k's 5).")
        parser.add_argument("--batch_size", type=int, default=8, help="lm-eval batch size.")
        parser.add_argument("--max_gen_toks", type=int | None, default=None,
                            help="Generated tokens per answer for generation tasks (lm-eval default 256).")

    def before_instantiate_classes(self) -> None:
        from prunekit.tasks import expand

        expand(self.config.tasks)  # an unknown task fails before the model is loaded
        super().before_instantiate_classes()


def run_eval(cli: EvalCLI) -> dict:
    from prunekit.evaluate import parameter_counts, perplexity, sparsity_report, summarize_sparsity
    from prunekit.export import write_atomically
    from prunekit.tasks import expand

    from prunekit.routing import TaskRoutedModel, is_routed

    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    names = expand(cli.config.tasks)
    routed = TaskRoutedModel.load(module.model_name, dense=module.model, max_cached=1) if is_routed(module.model_name) else None
    if routed is not None:  # every requested task needs an expert before any work
        for name in names:
            if name != "perplexity":
                routed.expert_for(name)
    t = time.perf_counter()
    result = {"model": module.model_name, **parameter_counts(module.model),
              "sparsity": summarize_sparsity(sparsity_report(module.model))["sparsity_linear"]}
    if "perplexity" in names:
        dm.check_model(module.model.config)
        result.update({"perplexity": perplexity(trainer, module, dm),
                       "eval_windows": int(dm.evaluation_windows().shape[0]), "seq_len": dm.seq_len,
                       "eval_corpus": dm.eval_corpus})
        if routed is not None:
            result["experts"] = _expert_perplexities(trainer, module, dm, routed)
    result["time_s"] = time.perf_counter() - t
    if not trainer.is_global_zero:  # lm-eval runs on rank 0 only (it takes one model instance)
        return result
    raw = None
    if any(n != "perplexity" for n in names):
        from prunekit.zeroshot import evaluate_tasks, format_table, metric_rows

        t = time.perf_counter()
        options = {"limit": cli.config.limit, "num_fewshot": cli.config.num_fewshot,
                   "batch_size": cli.config.batch_size, "max_gen_toks": cli.config.max_gen_toks}
        if routed is not None:
            from prunekit.zeroshot import evaluate_routed

            summary = evaluate_routed(routed, dm.tokenizer, names, **options)
        else:
            summary = evaluate_tasks(module.model, dm.tokenizer, names, **options)
        raw = summary.pop("raw")
        result["tasks"] = summary
        result["tasks_time_s"] = time.perf_counter() - t
    if "perplexity" in result:
        print(f"\nevaluation: {dm.eval_corpus} held-out, {result['eval_windows']} x {dm.seq_len} tokens "
              "('pruned' counts zero weights; weights removed by structured pruning show in the parameter count)")
        rows = [{"name": Path(module.model_name).name + (" (dense)" if routed else ""), **result}]
        rows += [{"name": f"expert: {task}", **row} for task, row in result.get("experts", {}).items()]
        _print_table(rows)
    flat = {k: result[k] for k in ("perplexity", "sparsity") if k in result}
    tables = {}
    if "tasks" in result:
        print(f"\nlm-eval tasks ({'first ' + str(cli.config.limit) + ' documents each' if cli.config.limit else 'all evaluation documents'}):")
        if routed is not None:
            print("each task scored with its expert: " + ", ".join(f"{t} → {e}" for t, e in result["tasks"]["experts"].items()))
        print(format_table(result["tasks"]))
        rows = metric_rows(result["tasks"])
        flat.update({f"{name}/{metric}": value for name, metric, value, _, _ in rows})
        flat.update({f"average/{m}": v for m, v in result["tasks"]["average"].items()})
        tables["tasks"] = (["task", "metric", "value", "stderr", "documents"], [list(r) for r in rows])
    _log_and_close(trainer, flat, tables=tables)
    if cli.config.output_dir:
        def write(tmp: Path) -> None:
            (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
            if raw is not None:
                from lm_eval.utils import handle_non_serializable

                (tmp / "lm_eval_results.json").write_text(json.dumps(raw, indent=2, default=handle_non_serializable))

        write_atomically(cli.config.output_dir, cli.config.overwrite, write)
    return result


class ActivationsCLI(_BaseCLI):
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
        from prunekit.activations import SITES
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
    import tempfile

    from prunekit.activations import halves, profile, similarity
    from prunekit.data import sequence_loader
    from prunekit.export import write_atomically
    from prunekit.plots import activation_heatmaps, sampled_dimensions, similarity_matrix
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
            for site, value in profile(trainer, module, sequence_loader(part), sites).items():
                profiles[site].setdefault(task, {})[half] = value.float()
            counts[task][half] = {"examples": len(part), "tokens": int(sum(x.numel() for x in part))}
    result = {"model": module.model_name, "tasks": tasks, "sites": sites, "examples": counts,
              "data": {"num_samples": dm.num_samples, "seq_len": dm.seq_len, "sampling": dm.sampling, "seed": dm.seed},
              "similarity": {site: similarity(profiles[site]) for site in sites}, "time_s": time.perf_counter() - start}
    if not trainer.is_global_zero:
        return result
    plot_dir = Path(tempfile.mkdtemp(prefix="prunekit-plots-"))
    images, flat, tables = {}, {}, {}
    name = Path(module.model_name).name
    if cli.config.projection_samples and len(tasks) >= 2:
        from prunekit.activations import project, projection_layers, prompt_states
        from prunekit.arch import adapter_for
        from prunekit.plots import task_projection

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
    _log_and_close(trainer, flat, tables=tables, images=images)

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
        save_file({f"{site}/{task}/{half}": t.contiguous() for site, by_task in profiles.items()
                   for task, by_half in by_task.items() for half, t in by_half.items()},
                  str(tmp / "activations.safetensors"))
        for path in images.values():
            shutil.copy(path, tmp / Path(path).name)

    out = write_atomically(cli.config.output_dir, cli.config.overwrite, write)
    shutil.rmtree(plot_dir, ignore_errors=True)
    print(f"saved to {out}")
    return result


class SensitivityCLI(_BaseCLI):
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
    import tempfile

    from tqdm.auto import tqdm

    from prunekit.arch import adapter_for
    from prunekit.evaluate import perplexity
    from prunekit.export import write_atomically
    from prunekit.plots import sensitivity as sensitivity_plot
    from prunekit.sensitivity import layer_models

    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    c = cli.config
    dense_model = module.model
    n_layers = len(adapter_for(dense_model).layers(dense_model))
    layers = c.layers if c.layers is not None else list(range(n_layers))
    if c.metric == "perplexity":
        dm.check_model(dense_model.config)

    def score(model) -> float:
        if c.metric == "perplexity":
            return perplexity(trainer, module, dm, model)
        from prunekit.zeroshot import evaluate_tasks

        return evaluate_tasks(model, dm.tokenizer, [c.metric], limit=c.limit, batch_size=c.batch_size)["tasks"][c.metric]["acc"]

    if c.metric != "perplexity" and not trainer.is_global_zero:
        return {}  # lm-eval runs on rank 0 only
    start = time.perf_counter()
    dense = score(dense_model)
    rows = []
    bar = tqdm(layer_models(dense_model, c.ratios, dm.seed, layers), total=len(layers) * len(c.ratios),
               desc="sensitivity", disable=not trainer.is_global_zero)
    for layer, ratio, model in bar:
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
    plot_dir = Path(tempfile.mkdtemp(prefix="prunekit-plots-"))
    plot = sensitivity_plot(rows, what, plot_dir / "sensitivity.png", dense=dense, log_scale=c.metric == "perplexity",
                            title=f"{name}: {what}, one layer pruned at a time")
    flat = {f"sensitivity/layer_{r['layer']:02d}/{r['ratio']:g}": r["value"] for r in rows}
    _log_and_close(trainer, {"dense": dense, **flat}, tables={"sensitivity": (["layer", "ratio", "value"],
                                                                          [[r["layer"], r["ratio"], r["value"]] for r in rows])},
                   images={"sensitivity": plot})

    def write(tmp: Path) -> None:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
        shutil.copy(plot, tmp / "sensitivity.png")

    out = write_atomically(c.output_dir, c.overwrite, write)
    shutil.rmtree(plot_dir, ignore_errors=True)
    print(f"saved to {out}")
    return result


def list_strategies() -> None:
    strategies = registry.available()
    width = max((len(n) for n in strategies), default=4)
    for name, info in strategies.items():
        print(f"{name:<{width}}  {info.description()}  [{info.distribution}]")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from prunekit._quiet import quiet

    quiet()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "strategies":
            list_strategies()
        elif command == "prune":
            run_prune(PruneCLI(rest))
        elif command == "eval":
            run_eval(EvalCLI(rest))
        elif command == "activations":
            run_activations(ActivationsCLI(rest))
        elif command == "sensitivity":
            run_sensitivity(SensitivityCLI(rest))
        elif command == "bench":
            from jsonargparse import CLI

            from prunekit.bench import main as bench_main

            CLI(bench_main, args=rest)
        else:
            print(f"prunekit: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
    except Exception as e:  # noqa: BLE001 - bad input arrives wrapped by jsonargparse/Lightning
        cause = _prunekit_cause(e)
        if cause is None:
            raise
        print(f"prunekit {command}: error: {cause}", file=sys.stderr)
        return 2
    return 0


def _prunekit_cause(e: BaseException | None) -> PrunekitError | None:
    """The PrunekitError behind ``e`` (jsonargparse wraps errors raised while instantiating classes)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, PrunekitError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
