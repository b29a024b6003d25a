"""SEAP's commands, registered in the entry-point group ``prunekit.commands`` (light: nothing heavy is imported
until a command runs)."""

from prunekit.cli import Command

activations = Command(
    "activations", "per-task activation heatmaps, their similarity and a task projection (SEAP)",
    "prunekit.strategies.seap.jobs:run_activations", "prunekit.strategies.seap.jobs:ActivationsCLI",
    ("prunekit activations --tasks [seap7] --data.num_samples 64 --output_dir runs/activations",))
sensitivity = Command(
    "sensitivity", "prune one layer at a time and measure the damage (SEAP)",
    "prunekit.strategies.seap.jobs:run_sensitivity", "prunekit.strategies.seap.jobs:SensitivityCLI",
    ("prunekit sensitivity --metric piqa --limit 100 --output_dir runs/sensitivity",))
