"""Evaluation of a (pruned) model: perplexity on held-out windows, run by Lightning across processes."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torchmetrics.text import Perplexity

from prunekit.pipeline import Pass
from prunekit.realize.runtime import scoring
from prunekit.realize.base import linear_totals, parameter_counts, sparsity_rows, summarize_sparsity

__all__ = ["PerplexityPass", "linear_totals", "parameter_counts", "perplexity", "sparsity_rows",
           "summarize_sparsity"]


class PerplexityPass(Pass):
    """Exp of the mean next-token NLL over the batches, in a torchmetrics ``Perplexity`` (synchronised across
    processes on ``compute``)."""

    def __init__(self, model: torch.nn.Module, description: str = "perplexity") -> None:
        super().__init__(model, description)
        self.metric = Perplexity()

    def predict_step(self, batch, batch_idx: int) -> None:
        ids = batch[0] if isinstance(batch, (list, tuple)) else batch["input_ids"] if isinstance(batch, dict) else batch
        ids = ids.to(self.device)
        with scoring(self.model, "perplexity", seq_len=ids.shape[1]):  # a runtime's teacher-forced protocol
            logits = self.model(input_ids=ids, use_cache=False).logits
        self.metric.update(logits[:, :-1].float(), ids[:, 1:])
        return None


def perplexity(trainer: pl.Trainer, model: torch.nn.Module, data, description: str = "perplexity") -> float:
    """Perplexity of ``model`` over ``data``'s evaluation windows (``eval_dataloader()``, or a DataLoader).

    Every window is scored by exactly one process; torchmetrics sums log-probabilities and counts across
    processes in ``compute``.
    """
    loader = data.eval_dataloader() if hasattr(data, "eval_dataloader") else data
    run = PerplexityPass(model, description)
    with torch.no_grad():
        trainer.predict(run, dataloaders=loader, return_predictions=False)
    return float(run.metric.compute())
