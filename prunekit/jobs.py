"""The jobs behind the commands: straight lines over the seam, with no method names and no mode flags.

``prune``: check → (dense evaluation) → calibrate + decide (the strategy's pipeline) → realize (the plan's
realizer) → report → evaluate → save. ``eval``: load what a folder realizes → perplexity of every model it
holds → lm-eval tasks, each on the model that answers it. Every output folder is written atomically
(``prunekit.export.write_atomically``) and plots live in a scratch folder that is removed on any exit.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.export import scratch, write_atomically
from prunekit.pipeline import notify


# ---------------------------------------------------------------------------------------------- shared
def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def print_table(rows: list[dict]) -> None:
    """Model, perplexity, pruned fraction (zero or removed projection weights), parameters, time."""
    width = max([36, *(len(r["name"]) for r in rows)])
    head = f"| {'model':<{width}} | {'perplexity':>10} | {'pruned':>8} | {'non-zero / total params':>23} | {'time (s)':>8} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        params = f"{_fmt_params(r['params_nonzero'])} / {_fmt_params(r['params_total'])}"
        t = f"{r['time_s']:.1f}" if r.get("time_s") is not None else ""
        ppl = f"{r['perplexity']:>10.3f}" if r.get("perplexity") is not None else f"{'-':>10}"
        print(f"| {r['name']:<{width}} | {ppl} | {r.get('pruned_fraction', 0.0):>8.1%} | {params:>23} | {t:>8} |")


def log_and_close(trainer, metrics: dict, hparams: dict | None = None, tables: dict | None = None,
                  images: dict | None = None) -> None:
    """Log final metrics (rank 0) and close the logger, so W&B writes its run summary even offline.

    ``tables`` ({key: (columns, rows)}) and ``images`` ({key: png path}) go to loggers that take them
    (W&B); every logger gets the metrics, and the same tables/images are always saved in the output folder.
    """
    logger = trainer.logger
    if logger is None or not trainer.is_global_zero:
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


def peak_rss_mb() -> float:
    from prunekit.memory import peak_rss_mb as peak

    return peak()


# ---------------------------------------------------------------------------------------------- prune
def find_strategy(trainer):
    from prunekit.strategy import PruningStrategy

    found = [cb for cb in trainer.callbacks if isinstance(cb, PruningStrategy)]
    if len(found) != 1:
        raise PrunekitError(f"expected exactly one pruning strategy (--strategy), found {len(found)}")
    return found[0]


def prune(cli) -> dict:
    """The ``prune`` job (see the module docstring); returns what ``metrics.json`` holds."""
    from prunekit import statistics as saved_stats
    from prunekit.evaluate import linear_totals, parameter_counts, perplexity, sparsity_rows, summarize_sparsity
    from prunekit.pipeline import FromStatistics, Context, calibrate
    from prunekit.realize import realizer_for

    if getattr(cli.model, "streamer", None) is not None:
        return prune_streaming(cli)
    start = time.perf_counter()
    c, trainer, module, dm = cli.config, cli.trainer, cli.model, cli.datamodule
    strategy = find_strategy(trainer)
    model = module.model
    if c.calibration.memory is not None:
        raise PrunekitError("--calibration.memory budgets a streaming run's layer and activations: add "
                            "--calibration.streaming true (or drop the budget)")

    # 1. check everything cheap before any heavy work
    strategy.check(model)
    dm.check_model(model.config)
    if c.force and not c.statistics:
        raise PrunekitError("--force only accepts --statistics of another model or data; there is no --statistics")
    if (c.statistics or c.save_statistics) and strategy.pipeline == "none":
        raise PrunekitError(f"{strategy.name} observes nothing (a data-free method): drop --statistics / "
                            "--save_statistics")
    if c.statistics and c.save_statistics:
        raise PrunekitError("--save_statistics with --statistics would only copy the file it reads; drop one")
    data_settings = dm.describe()
    sources, pipeline, notes = None, None, []
    dense_print = saved_stats.model_fingerprint(model) if (c.statistics or c.save_statistics) else None
    if c.statistics:
        if strategy.pipeline not in ("all-at-once", "gradient"):
            raise PrunekitError(f"--statistics replaces a pass over the dense model, but {strategy.name} runs the "
                                f"{strategy.pipeline} pipeline (sequential needs the inputs of already-pruned layers: "
                                "use --strategy.mode all-at-once, or calibrate)")
        tensors, meta = saved_stats.read(c.statistics)
        if meta.get("pipeline") not in (None, "all-at-once", "gradient"):
            raise PrunekitError(f"{c.statistics} holds statistics of the {meta['pipeline']} pipeline (observed on a "
                                "model pruned layer by layer); prune from statistics of an all-at-once pass")
        notes = saved_stats.check(meta, c.statistics, dense_print, dm.fingerprint(), c.force)
        sources = meta.get("sources")
        data_settings = {**(meta.get("data") or {}), "statistics": str(c.statistics)}
        pipeline = FromStatistics(tensors, str(c.statistics))
    elif strategy.pipeline != "none":
        dm.calibration_sequences()
        sources = dm.calibration_sources()
    dm.evaluation_windows()
    for note in notes:
        print(note, flush=True)

    dense_totals = linear_totals(model)
    result: dict[str, Any] = {"model": module.model_name, **strategy.describe(),
                              "pipeline": "statistics" if c.statistics else strategy.pipeline,
                              "data": {**data_settings, "eval_corpus": dm.eval_corpus,
                                       "eval_windows": int(dm.evaluation_windows().shape[0])},
                              "world_size": trainer.world_size}
    # the dense row counts the zeros the checkpoint already has (Gemma's Q4_K_M dequantizes to 4.5% exact zeros),
    # as the pruned row does, so the two "pruned" figures compare
    dense = {**parameter_counts(model), "pruned_fraction": summarize_sparsity(sparsity_rows(model))["sparsity_linear"]}
    if c.eval_dense:
        t = time.perf_counter()
        dense["perplexity"] = perplexity(trainer, model, dm, "dense perplexity")
        dense["eval_s"] = time.perf_counter() - t
    result["dense"] = dense
    from prunekit.surgery import structure

    result["dense_structure"] = structure(model)

    # 2. calibrate and decide, 3. realize
    t = time.perf_counter()
    context = Context(sources, dm.tokenizer, dm.seed, trainer.is_global_zero, trainer.world_size)
    calibration = calibrate(trainer, module, dm if pipeline is None else None, strategy, context, pipeline,
                            keep=c.save_statistics)
    plan = calibration.plan
    realizer = realizer_for(plan)
    realized = realizer.apply(model, plan, tokenizer=dm.tokenizer)
    calibrate_s = time.perf_counter() - t

    # 4. report and evaluate
    report = realizer.report(realized, dense_totals)
    report["calibrate_prune_s"] = calibrate_s
    from prunekit.realize.runtime import runtime_of

    notes = runtime_of(realized).notes(dm.seq_len) if runtime_of(realized) is not None else []
    if notes:
        report["runtime_notes"] = notes
    result["plan"] = plan.kind
    evaluated = []
    for label, member in realizer.members(realized):
        t = time.perf_counter()
        ppl = perplexity(trainer, member, dm, f"pruned perplexity{': ' + label if label else ''}")
        evaluated.append((label, ppl, time.perf_counter() - t))
    for label, ppl, seconds in evaluated:
        target = report["members"][label] if label else report
        target["perplexity"], target["eval_s"] = ppl, seconds
    result["pruned"] = report
    notify(trainer, "on_pruning_end", module, report)
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    if not trainer.is_global_zero:
        return result

    # 5. save, then tell
    calibration_text = (f"statistics of an earlier pass, read from {c.statistics}" if c.statistics else
                        dm.describe_calibration() if strategy.pipeline != "none" else "none (data-free method)")
    config_text = cli.parser.dump(cli.config, skip_none=False)
    with scratch() as plots:
        images = _plots(result, plots)
        flat = _flat_metrics(result)
        log_and_close(trainer, flat, strategy.describe(), tables=_tables(result), images=images)

        def write(tmp: Path) -> None:
            if c.save_model:
                result["saved"] = realizer.save(realized, tmp, dm.tokenizer)
            _write_records(tmp, config_text, result, plan.kind, strategy, module.model_name, images)
            if c.save_statistics:
                meta = {"strategy": strategy.name, "pipeline": calibration.pipeline, "sources": sources,
                        "model": module.model_name, "model_fingerprint": dense_print,
                        "data_fingerprint": dm.fingerprint(), "data": dm.describe()}
                saved_stats.save(tmp / saved_stats.FILE, calibration.state(), meta)
            notify(trainer, "on_save", module, tmp)

        out = write_atomically(c.output_dir, c.overwrite, write)

    _print_prune(result, strategy, calibration_text, dm, trainer)
    _print_saved(out, result)
    return result


def prune_streaming(cli) -> dict:
    """The ``prune`` job of a streaming run (``--calibration.streaming true``, ``prunekit.streaming``): check →
    catch the calibration inputs → per layer: read, calibrate, decide, realize, write → report.

    Perplexity needs every layer at once, so a streaming run measures none: evaluate the output folder with
    ``prunekit eval`` where it fits. The output folder is written in place of a temporary one only once every
    layer is done; an interrupted run leaves nothing.
    """
    from prunekit.pipeline import Context
    from prunekit.realize.base import linear_totals
    from prunekit.streaming import ShardWriter, StreamingRun, save_metadata
    from prunekit.surgery import structure

    start = time.perf_counter()
    c, trainer, module, dm = cli.config, cli.trainer, cli.model, cli.datamodule
    strategy = find_strategy(trainer)
    model = module.model

    # 1. check everything cheap before any heavy work
    strategy.check(model)
    dm.check_model(model.config)
    if c.statistics or c.save_statistics:
        raise PrunekitError("--statistics and --save_statistics hold the observers of a whole-model pass; a streaming "
                            "run observes one layer at a time: drop them, or prune in memory")
    set_ranks = getattr(trainer.strategy, "set_world_ranks", None)
    if callable(set_ranks):  # ranks are known before the first pass (only rank 0 writes)
        set_ranks()
    run = StreamingRun(trainer, module, dm if strategy.pipeline != "none" else None, strategy, None,
                       module.streamer, c.calibration, c.output_dir)
    run.check()  # streamable, and the budget holds a layer: before the data is built
    sources = None
    if strategy.pipeline != "none":
        dm.calibration_sequences()
        sources = dm.calibration_sources()
    run.context = Context(sources, dm.tokenizer, dm.seed, trainer.is_global_zero, trainer.world_size)
    dense_totals = linear_totals(model)  # shapes only: the layers are on the meta device
    result: dict[str, Any] = {"model": module.model_name, **strategy.describe(), "pipeline": strategy.pipeline,
                              "streaming": True, "memory_budget": c.calibration.memory,
                              "data": {**dm.describe()} if strategy.pipeline != "none" else {},
                              "world_size": trainer.world_size,
                              "dense": {"params_total": dense_totals["params"], "pruned_fraction": 0.0},
                              "dense_structure": structure(model)}
    n_layers = len(module.streamer.layers)
    config_text = cli.parser.dump(cli.config, skip_none=False)

    def body(tmp: Path | None) -> None:
        t = time.perf_counter()
        writer = ShardWriter(tmp, n_layers) if tmp is not None and c.save_model else None
        run.run(writer)
        notify(trainer, "on_calibration_end", module, strategy)
        rest = module.streamer.rest_state() if tmp is not None else {}
        if writer is not None:
            result["saved"] = save_metadata(model, tmp, dm.tokenizer, writer, rest)
        report = run.report(dense_totals, rest)
        report["calibrate_prune_s"] = time.perf_counter() - t
        report["seconds_per_layer"] = run.seconds_per_layer
        report["activations_offloaded"] = run.offload is not None
        result["plan"] = run.kind
        result["pruned"] = report
        notify(trainer, "on_pruning_end", module, report)
        result["wall_s"] = time.perf_counter() - start
        result["peak_rss_mb"] = peak_rss_mb()
        if tmp is None:
            return
        with scratch() as plots:
            images = _plots(result, plots)
            log_and_close(trainer, _flat_metrics(result), strategy.describe(), tables=_tables(result), images=images)
            _write_records(tmp, config_text, result, run.kind, strategy, module.model_name, images)
            notify(trainer, "on_save", module, tmp)

    notify(trainer, "on_calibration_start", module, strategy)
    try:
        run.catch()
        if not trainer.is_global_zero:
            body(None)
            return result
        out = write_atomically(c.output_dir, c.overwrite, body)
    finally:
        run.close()
    calibration_text = dm.describe_calibration() if strategy.pipeline != "none" else "none (data-free method)"
    _print_prune(result, strategy, calibration_text, dm, trainer, streaming=True)
    _print_saved(out, result)
    return result


def _write_records(tmp: Path, config_text: str, result: dict, kind: str, strategy, source: str,
                   images: dict[str, Path]) -> None:
    """What every prune output folder holds besides the model: the resolved config, the metrics, the record of
    how it was made and loads (``prunekit.json``), and the plots."""
    (tmp / "config.yaml").write_text(config_text)
    (tmp / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default))
    record = {"plan": kind, "pruned_by": strategy.describe(), "source": source, "loading": result.get("saved", {})}
    (tmp / "prunekit.json").write_text(json.dumps(record, indent=2))
    for path in images.values():
        shutil.copy(path, tmp / Path(path).name)


def _print_saved(out: Path, result: dict) -> None:
    print(f"saved to {out}")
    if "saved" in result:
        print(f"reload with {result['saved']['loadable_with']}")
        if result["saved"].get("note"):
            print(f"note: {result['saved']['note']}")
        if result["saved"].get("decode"):
            print(f"decode fast with {result['saved']['decode']}")


def _json_default(o):
    import torch

    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _flat_metrics(result: dict) -> dict:
    """What loggers get: perplexities and the removed fraction of the projections (zero or cut), per member."""
    pruned, dense = result["pruned"], result["dense"]
    flat = {"pruned_fraction": pruned["pruned_fraction"], "params_total": pruned["params_total"],
            "params_nonzero": pruned["params_nonzero"], "calibrate_prune_s": pruned["calibrate_prune_s"]}
    if "perplexity" in pruned:
        flat["perplexity"] = pruned["perplexity"]
    for name, row in pruned.get("members", {}).items():
        flat.update({f"{name}/perplexity": row.get("perplexity"), f"{name}/pruned_fraction": row["pruned_fraction"]})
    if "perplexity" in dense:
        flat["perplexity_dense"] = dense["perplexity"]
    router = pruned.get("router") or {}
    flat.update({f"router/{k}": v for k, v in router.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {k: v for k, v in flat.items() if v is not None}


def _tables(result: dict) -> dict:
    pruned = result["pruned"]
    if "members" in pruned:
        rows = [[name, l["layer"], l.get("heads"), l.get("mlp_channels")] for name, m in pruned["members"].items()
                for l in m.get("layers", [])]
        return {"members": (["member", "layer", "heads", "mlp_channels"], rows)}
    layers = pruned.get("layers", [])
    columns = sorted({k for row in layers for k in row})
    return {"per_layer": (columns, [[row.get(k) for k in columns] for row in layers])}


def _plots(result: dict, folder: Path) -> dict[str, Path]:
    from prunekit.plots import layer_profile, members_profile

    if "members" in result["pruned"]:
        return {"members_profile": members_profile(result, folder / "members_profile.png")}
    return {"layer_profile": layer_profile(result, folder / "layer_profile.png")}


def _print_prune(result: dict, strategy, calibration_text: str, dm, trainer, streaming: bool = False) -> None:
    pruned, dense = result["pruned"], result["dense"]
    print()
    if streaming:
        where = "offloaded to disk" if pruned.get("activations_offloaded") else "in memory"
        print(f"calibration: {calibration_text}; streaming, one layer at a time (activations {where}); no "
              f"perplexity (it needs every layer at once: run prunekit eval on the output); processes: "
              f"{trainer.world_size}")
    else:
        print(f"calibration: {calibration_text}; evaluation: {dm.eval_corpus} held-out, "
              f"{result['data']['eval_windows']} x {dm.seq_len} tokens; processes: {trainer.world_size}")
    rows = []
    if "perplexity" in dense:
        rows.append({"name": f"dense {Path(result['model']).name}", **dense, "time_s": None})
    if "members" in pruned:
        rows += [{"name": f"{strategy.name}: {name}", **row, "time_s": None} for name, row in pruned["members"].items()]
    else:
        rows.append({"name": strategy.label(), **pruned, "time_s": pruned["calibrate_prune_s"]})
    print_table(rows)
    if "members" in pruned:
        print(f"one plan per member ({len(pruned['members'])}); calibration + planning "
              f"{pruned['calibrate_prune_s']:.1f} s")
        summary = (pruned.get("router") or {}).get("summary")
        if summary:
            print("\n".join(summary) if isinstance(summary, list) else summary)
    elif "structure" in pruned:
        widths = " ".join(f"{i}:{l['mlp_channels']}/{l['heads']}" for i, l in enumerate(pruned["structure"]))
        print(f"per-layer widths (MLP channels / attention heads): {widths}")
        print(f"removed: {pruned['pruned_fraction']:.1%} of attention+MLP weights (requested "
              f"{strategy.sparsity:.0%}), {pruned['params_removed_fraction']:.1%} of all parameters")
    elif "runtime" not in pruned or max(pruned["per_layer_sparsity"].values(), default=0) >= 0.005:
        # (a runtime over a dense model has no zeros worth a line)
        per_layer = " ".join(f"{i}:{v:.0%}" for i, v in pruned["per_layer_sparsity"].items())
        print(f"per-layer sparsity: {per_layer}")
    if "runtime" in pruned:
        print("runtime: " + ", ".join(f"{k}={v}" for k, v in pruned["runtime"].items()))
        for note in pruned.get("runtime_notes", []):
            print(note)
    print(f"peak memory (RSS): {result['peak_rss_mb']:.0f} MB; wall time: {result['wall_s']:.1f} s")


# ---------------------------------------------------------------------------------------------- eval
def evaluate(cli) -> dict:
    """The ``eval`` job: perplexity of every model a folder realizes, then lm-eval tasks on rank 0."""
    from prunekit.evaluate import parameter_counts, perplexity, sparsity_rows, summarize_sparsity
    from prunekit.realize import evaluation_models
    from prunekit.tasks import expand

    c, trainer, module, dm = cli.config, cli.trainer, cli.model, cli.datamodule
    if getattr(module, "streamer", None) is not None:
        raise PrunekitError("--model.streaming applies to prune (--calibration.streaming); eval loads the whole model")
    names = expand(c.tasks)
    realized = module.realized
    if c.get("runtime"):
        from prunekit.realize.runtime import runtime_of

        runtime = runtime_of(module.model)
        if runtime is None:
            raise PrunekitError(f"--runtime sets options of a dynamic method's runtime, but {module.model_name} "
                                "has none (it was not pruned by a method that installs a runtime)")
        runtime.configure(**c.runtime)
    tasks = [n for n in names if n != "perplexity"]
    if tasks:  # every requested task has a model to answer it, before any work
        from prunekit.realize.base import of

        for name in tasks:
            of(realized).member_for_task(realized, name)
    start = time.perf_counter()
    sparsity = summarize_sparsity(sparsity_rows(module.model))["sparsity_linear"]
    result: dict[str, Any] = {"model": module.model_name, **parameter_counts(module.model), "sparsity": sparsity,
                              "pruned_fraction": sparsity}  # zeros: a cut folder's dense size is not known here
    if "perplexity" in names:
        from prunekit.realize.base import linear_totals, static_report

        dm.check_model(module.model.config)
        dense = linear_totals(module.model)  # a plan set's members are measured against its dense model
        scores = {}
        for label, model in evaluation_models(realized):
            row = {**parameter_counts(model), "perplexity": perplexity(
                trainer, model, dm, f"perplexity{': ' + label if label else ''}")}
            if label:
                row["pruned_fraction"] = static_report(model, dense)["pruned_fraction"]
            scores[label] = row
        result.update({"eval_windows": int(dm.evaluation_windows().shape[0]), "seq_len": dm.seq_len,
                       "eval_corpus": dm.eval_corpus})
        from prunekit.realize.runtime import runtime_of

        runtime = runtime_of(module.model)
        if runtime is not None:
            result["runtime"], result["runtime_notes"] = runtime.describe(), runtime.notes(dm.seq_len)
        if "" in scores:
            result["perplexity"] = scores[""]["perplexity"]
        else:
            result["members"] = scores
    result["time_s"] = time.perf_counter() - start
    if not trainer.is_global_zero:  # lm-eval runs on rank 0 only (it takes one model instance)
        return result
    raw = None
    if tasks:
        from prunekit.zeroshot import evaluate_realized

        t = time.perf_counter()
        summary = evaluate_realized(realized, dm.tokenizer, tasks, limit=c.limit, num_fewshot=c.num_fewshot,
                                    batch_size=c.batch_size, max_gen_toks=c.max_gen_toks,
                                    prefix_sharing=c.prefix_sharing, cache=c.tasks_cache)
        raw = summary.pop("raw")
        result["tasks"] = summary
        result["tasks_time_s"] = time.perf_counter() - t
    _print_eval(result, c, dm)
    flat = {k: result[k] for k in ("perplexity", "sparsity") if k in result}
    flat.update({f"{name}/perplexity": row["perplexity"] for name, row in result.get("members", {}).items()})
    tables = {}
    if "tasks" in result:
        from prunekit.zeroshot import metric_rows

        rows = metric_rows(result["tasks"])
        flat.update({f"{name}/{metric}": value for name, metric, value, _, _ in rows})
        flat.update({f"average/{m}": v for m, v in result["tasks"]["average"].items()})
        tables["tasks"] = (["task", "metric", "value", "stderr", "documents"], [list(r) for r in rows])
    log_and_close(trainer, flat, tables=tables)
    if c.output_dir:
        def write(tmp: Path) -> None:
            (tmp / "metrics.json").write_text(json.dumps(result, indent=2))
            if raw is not None:
                from lm_eval.utils import handle_non_serializable

                (tmp / "lm_eval_results.json").write_text(json.dumps(raw, indent=2, default=handle_non_serializable))

        write_atomically(c.output_dir, c.overwrite, write)
    return result


def _print_eval(result: dict, c, dm) -> None:
    if "perplexity" in result or "members" in result:
        print(f"\nevaluation: {dm.eval_corpus} held-out, {result['eval_windows']} x {dm.seq_len} tokens "
              "('pruned' counts zero weights; weights removed by structured pruning show in the parameter count)")
        rows = []
        if "perplexity" in result:
            rows.append({"name": Path(result["model"]).name, **result})
        rows += [{"name": f"member: {name}", **row} for name, row in result.get("members", {}).items()]
        print_table(rows)
    for note in result.get("runtime_notes", []):
        print(note)
    if "tasks" in result:
        from prunekit.zeroshot import format_table

        print(f"\nlm-eval tasks ({'first ' + str(c.limit) + ' documents each' if c.limit else 'all evaluation documents'}):")
        if result["tasks"].get("members"):
            print("each task scored with its member: " + ", ".join(f"{t} → {m}" for t, m in result["tasks"]["members"].items()))
        print(format_table(result["tasks"]))
        scoring = result["tasks"].get("config", {}).get("scoring", {})
        ll = scoring.get("requests", {}).get("loglikelihood")
        if result["tasks"].get("cached"):
            print(f"(lm-eval results reused from {result['tasks']['cached']})")
        elif ll and ll["seconds"] > 0:
            how = "shared contexts" if scoring.get("prefix_sharing") else "lm-eval's HFLM"
            print(f"{ll['requests']} log-likelihood requests in {ll['seconds']:.1f} s "
                  f"({ll['requests'] / ll['seconds']:.1f}/s, {how})")
