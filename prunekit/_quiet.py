"""Silence third-party console noise that says nothing about the run (advertising tips, known-benign warnings)."""

from __future__ import annotations

import logging
import warnings

_BENIGN = (
    r"LightningCLI's args parameter is intended",  # we pass the subcommand's args; sys.argv must stay for DDP
    r"predict returned None",  # predict steps only feed hooks and metrics
    r".*isinstance\(treespec, LeafSpec\).*",
    r"The '(predict|val)_dataloader' does not have many workers",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet() -> None:
    for pattern in _BENIGN:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
