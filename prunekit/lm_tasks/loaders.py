"""Dataset hook of every prunekit task YAML (``custom_dataset: !function loaders.load``).

lm-eval calls it with the task's metadata and ``dataset_kwargs``; ``prunekit_task`` names the data to load.
Splits: ``evaluation`` (scored), ``calibration`` (never scored; few-shot pool) and, for MMLU, ``dev``.
"""

from __future__ import annotations


def load(prunekit_task: str, **_metadata):
    from prunekit.tasks import splits

    return splits(prunekit_task)
