"""A Lightning callback that stops a run at a chosen phase (announcing it on stderr) so a test can signal it there.

Used by tests/test_reliability.py through ``--trainer.callbacks`` in a YAML config; it relies only on the events
every run emits: Lightning's batch hooks (each pass has a ``description``) and prunekit's ``on_plan`` /
``on_save``.
"""

from __future__ import annotations

import sys
import time

import lightning.pytorch as pl


class Pause(pl.Callback):
    """Sleep ``seconds`` at ``phase``: ``dense`` / ``calibration`` / ``evaluation`` (the first batches of the
    dense perplexity, calibration and pruned perplexity passes), ``decide`` (a plan exists, nothing realized),
    ``save`` (inside the temporary output folder, model written), ``perplexity`` (the eval command's pass) or
    ``layer`` (a streaming run, once its second layer is written)."""

    def __init__(self, phase: str, seconds: float = 120.0) -> None:
        self.phase, self.seconds = phase, seconds

    def _pause(self, where: str) -> None:
        print(f"PAUSED {self.phase} ({where})", file=sys.stderr, flush=True)
        time.sleep(self.seconds)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        description = getattr(pl_module, "description", "")
        wanted = {"dense": "dense perplexity", "calibration": "calibration", "evaluation": "pruned perplexity",
                  "perplexity": "perplexity"}.get(self.phase)
        if wanted is not None and description.startswith(wanted) and batch_idx == 1:
            self._pause(description)

    def on_plan(self, trainer, pl_module, plan) -> None:
        if self.phase == "decide":
            self._pause(plan.kind)

    def on_layer_done(self, trainer, pl_module, layer: int) -> None:
        if self.phase == "layer" and layer == 1:
            self._pause(f"layer {layer}")

    def on_save(self, trainer, pl_module, folder) -> None:
        if self.phase == "save":
            self._pause(str(folder))
