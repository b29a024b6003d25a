"""GRIFFIN: prompt-phase feed-forward expert selection (``prunekit.strategies.griffin``).

``runtime`` holds the method (scores, selection, the runtime installed in a model); ``strategy`` the ``griffin``
strategy; ``protocol`` the evaluation protocols of the paper (split perplexity, expert overlap, generation
agreement). Imports are lazy so ``prunekit strategies`` stays fast.
"""

from __future__ import annotations

_EXPORTS = {"Griffin": "strategy", "GriffinRuntime": "runtime"}


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
