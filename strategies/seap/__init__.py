"""SEAP (Liang et al., 2025): task-specific structured pruning, its task router, activation profiles and layer
sensitivity — the method and its whole kit, outside prunekit's core.

- ``strategy``: the ``seap`` and ``seap-gen`` strategies (``SEAP``, ``SEAPGen``; scores in ``wifv``);
- ``router``: the task router of a plan set of task experts;
- ``activations``, ``sensitivity``, ``plots``: SEAP's analyses; ``jobs`` / ``commands``: the ``prunekit
  activations`` and ``prunekit sensitivity`` commands.

This package module stays light (it is imported to list commands); the strategy loads on first use.
"""

__all__ = ["SEAP", "SEAPGen", "wifv"]


def __getattr__(name: str):
    if name in __all__:
        from prunekit.strategies.seap import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
