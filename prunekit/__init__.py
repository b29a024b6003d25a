"""prunekit: pruning large language models with PyTorch Lightning; every method a pluggable strategy."""

from prunekit.errors import PrunekitError
from prunekit.export import load_pruned, save_pruned

__version__ = "0.1.0"
__all__ = ["PrunekitError", "__version__", "load_pruned", "save_pruned"]
