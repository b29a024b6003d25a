"""Lightning callbacks shared by strategies and users (importable as ``prunekit.callbacks``)."""

from prunekit.callbacks.sparsity import SparsityLogger

__all__ = ["SparsityLogger"]
