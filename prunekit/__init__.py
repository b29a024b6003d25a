"""prunekit: pruning large language models with PyTorch Lightning; every method a pluggable strategy."""

from prunekit.errors import PrunekitError

__version__ = "0.1.0"
__all__ = ["PrunekitError", "__version__", "fast_generate", "load_pruned"]


def load_pruned(path, dtype: str = "float32", **kwargs):
    """Load any folder prunekit wrote and return the realized model (see ``prunekit.realize.load_pruned``)."""
    from prunekit.realize import load_pruned as _load

    return _load(path, dtype, **kwargs)


def fast_generate(model, input_ids, max_new_tokens: int = 32, **kwargs):
    """Greedy tokens of ``model.generate(do_sample=False)`` along a faster path: a static KV cache and a compiled
    one-token step (see ``prunekit.decode.fast_generate``)."""
    from prunekit.decode import fast_generate as _fast

    return _fast(model, input_ids, max_new_tokens, **kwargs)
