"""Python entry point: prune a model with a strategy in a few lines, without the command line.

    from prunekit.api import prune
    from prunekit.data import CalibrationDataModule
    from prunekit.strategies.wanda import Wanda

    out = prune(Wanda(sparsity=0.5), "smollm2-135m", CalibrationDataModule("smollm2-135m"))
    out.realized      # the pruned model (or a plan set's RoutedModel)
    out.plan          # what the strategy decided
    out.calibration   # the plan and the reduced observations (out.calibration.observed())

The same seam as ``prunekit prune``: the strategy's pipeline calibrates (run by a Lightning ``Trainer``: pass
your own for several devices), the strategy decides, the plan's realizer realizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from torch import nn


@dataclass
class Outcome:
    realized: Any
    plan: Any
    calibration: Any


class _Holder(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def default_trainer(**kwargs) -> pl.Trainer:
    """A one-process CPU trainer without logger, checkpoints or progress bars."""
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, inference_mode=False)
    options.update(kwargs)
    return pl.Trainer(**options)


def plan(strategy, model, data=None, trainer: pl.Trainer | None = None, context=None, keep: bool = True):
    """Calibrate and decide: the strategy's ``Calibration`` (plan + observations, unless ``keep=False``).
    ``model``: a zoo name or folder, an ``nn.Module`` or a ``PrunableLM``. The sequential pipeline realizes each
    layer as it goes."""
    from prunekit.pipeline import calibrate, context_for

    module = _module(model)
    trainer = trainer or default_trainer()
    tokenizer = getattr(data, "tokenizer", None) if data is not None and getattr(data, "tokenizer_name", None) else None
    context = context or context_for(trainer, data, tokenizer, getattr(data, "seed", 0))
    return calibrate(trainer, module, data, strategy, context, keep=keep), module


def prune(strategy, model, data=None, trainer: pl.Trainer | None = None, context=None,
          keep: bool = True) -> Outcome:
    """Calibrate, decide and realize (in place where the plan kind allows)."""
    from prunekit.realize import realizer_for

    calibration, module = plan(strategy, model, data, trainer, context, keep)
    tokenizer = getattr(data, "tokenizer", None) if data is not None and getattr(data, "tokenizer_name", None) else None
    realized = realizer_for(calibration.plan).apply(module.model, calibration.plan, tokenizer=tokenizer)
    return Outcome(realized, calibration.plan, calibration)


def _module(model) -> pl.LightningModule:
    if isinstance(model, pl.LightningModule):
        return model
    if isinstance(model, nn.Module):
        return _Holder(model)
    from prunekit.module import PrunableLM

    return PrunableLM(str(model))
