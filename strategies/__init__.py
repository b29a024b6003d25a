"""Built-in pruning strategies (importable as ``prunekit.strategies``; registered through entry points)."""
