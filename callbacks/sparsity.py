"""Log what pruning removed (overall, per layer, per projection role) once a plan is realized."""

from __future__ import annotations

import lightning.pytorch as pl


class SparsityLogger(pl.Callback):
    """On ``on_pruning_end`` (sent by the prune job with the realizer's report), log to the trainer's logger:
    ``pruned/fraction`` — the fraction of attention+MLP weights that are zero *or removed* (what the requested
    ratio means for every plan kind) — the fraction of all parameters removed, and per layer the zero fraction
    (weight masks) or kept MLP channels and heads (unit cuts). The report is kept in ``self.report``."""

    def __init__(self) -> None:
        self.report: dict | None = None

    def on_pruning_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: dict) -> None:
        self.report = report
        if trainer.logger is None or not trainer.is_global_zero:
            return
        metrics = {"pruned/fraction": report["pruned_fraction"],
                   "pruned/params_removed_fraction": report.get("params_removed_fraction", 0.0)}
        if "sparsity" in report:
            metrics["pruned/zero_fraction"] = report["sparsity"]
        for row in report.get("layers", []):
            for key, value in row.items():
                if key != "layer" and isinstance(value, (int, float)):
                    metrics[f"layers/{row['layer']:02d}/{key}"] = value
        for role, value in report.get("per_role_sparsity", {}).items():
            metrics[f"roles/{role}/zero_fraction"] = value
        for name, member in report.get("members", {}).items():
            metrics[f"members/{name}/pruned_fraction"] = member["pruned_fraction"]
        trainer.logger.log_metrics(metrics)
