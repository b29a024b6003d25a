"""prunekit: pruning large language models with PyTorch Lightning; every method a pluggable strategy."""

from prunekit.errors import PrunekitError

__version__ = "0.1.0"
__all__ = ["PrunekitError", "__version__", "load_pruned"]


def load_pruned(path, dtype: str = "float32", **kwargs):
    """Load any folder prunekit wrote and return the realized model (see ``prunekit.realize.load_pruned``)."""
    from prunekit.realize import load_pruned as _load

    return _load(path, dtype, **kwargs)
