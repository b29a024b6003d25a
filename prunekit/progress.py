"""Progress bars that say what they measure, on stderr (stdout carries the results)."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf


class Progress(TQDMProgressBar):
    """Lightning's tqdm bar, labelled by the pass it follows (``calibration``, ``dense perplexity``, …)."""

    @property
    def predict_description(self) -> str:
        module = self.trainer.lightning_module if self._trainer is not None else None
        return getattr(module, "description", None) or "predicting"

    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.predict_description, position=2 * self.process_position, disable=self.is_disabled,
                    leave=False, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        self.predict_progress_bar.reset()
        self.predict_progress_bar.total = convert_inf(self.total_predict_batches_current_dataloader)
        self.predict_progress_bar.initial = 0
        self.predict_progress_bar.set_description(self.predict_description)


def bar(iterable, description: str, enabled: bool = True, total: int | None = None):
    """A tqdm bar on stderr for loops that do not run through Lightning (the sequential layer loop)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, disable=not enabled, leave=False, file=sys.stderr,
                dynamic_ncols=True)
