"""Log the achieved sparsity (overall, per layer, per projection role) once a strategy has pruned."""

from __future__ import annotations

import lightning.pytorch as pl

from prunekit.evaluate import sparsity_report, summarize_sparsity


class SparsityLogger(pl.Callback):
    """On ``on_pruning_end`` (called by every PruningStrategy), log sparsity metrics to the trainer's logger.

    The summary is also kept in ``self.summary`` for the caller (the CLI prints and saves it).
    """

    def __init__(self) -> None:
        self.summary: dict | None = None

    def on_pruning_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, strategy) -> None:
        self.summary = summarize_sparsity(sparsity_report(pl_module.model))
        if trainer.logger is None or not trainer.is_global_zero:
            return
        metrics = {"sparsity/linear": self.summary["sparsity_linear"]}
        metrics.update({f"sparsity/layer_{i:02d}": v for i, v in self.summary["per_layer"].items()})
        metrics.update({f"sparsity/role_{r}": v for r, v in self.summary["per_role"].items()})
        trainer.logger.log_metrics(metrics)
