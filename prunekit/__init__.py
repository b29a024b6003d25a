"""prunekit: pruning large language models with PyTorch Lightning; every method a pluggable strategy."""

from prunekit.errors import PrunekitError

__version__ = "0.1.0"
__all__ = ["PrunekitError", "__version__"]
