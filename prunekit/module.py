"""PrunableLM: the LightningModule around the Hugging Face causal LM that a run calibrates, prunes and evaluates.

It only holds the model (``--model.*`` options); the passes that run over it — calibration
(``prunekit.pipeline.ObservePass``) and evaluation (``prunekit.evaluate.PerplexityPass``) — are their own
small LightningModules, so no mode flag travels between them.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch

from prunekit.models import DEFAULT_MODEL, load_model


class PrunableLM(pl.LightningModule):
    """A causal LM to calibrate, prune and evaluate.

    Args:
        model: zoo name (``smollm2-135m``), local Hugging Face folder (a prunekit output folder too), or hub id.
        dtype: weights' dtype while pruning (``float32`` recommended on CPU).
        streaming: build the model on the meta device and read its decoder layers one at a time from the source's
            safetensors shards (``prunekit.streaming``; set by ``prune --calibration.streaming``).
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 streaming: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_name = model
        self.dtype_name = dtype
        self.streamer = None
        if streaming:
            from prunekit.arch import adapter_for
            from prunekit.models import load_config, resolve
            from prunekit.streaming import skeleton

            adapter_for(load_config(model))  # an unsupported family fails before anything is read
            model_, self.streamer = skeleton(resolve(model), dtype)
            object.__setattr__(self, "model", model_)  # not a submodule: Lightning must not move meta weights
        else:
            self.model = load_model(model, dtype)
        self._realized = None

    @property
    def realized(self):
        """What the source folder realizes (``prunekit.load_pruned``): the model itself, or a plan set's routed
        model whose dense weights are ``self.model``."""
        if self._realized is None:
            from prunekit.models import resolve
            from prunekit.realize import load_pruned, plan_kind_of

            kind = plan_kind_of(resolve(self.model_name))
            self._realized = load_pruned(self.model_name, self.dtype_name, dense=self.model) \
                if kind == "plan_set" else self.model
        return self._realized

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits
