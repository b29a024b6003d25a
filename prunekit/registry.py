"""Plugin registry of pruning strategies.

Strategies register through the entry-point group ``prunekit.strategies``. The built-in ones are declared in
prunekit's own ``pyproject.toml`` exactly as a third-party package declares its own::

    [project.entry-points."prunekit.strategies"]
    my-method = "my_package.module:MyStrategy"

``prunekit strategies`` lists them; ``--strategy my-method`` selects one by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from prunekit.errors import PrunekitError

GROUP = "prunekit.strategies"


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    class_path: str
    distribution: str
    entry_point: EntryPoint

    def load(self) -> type:
        from prunekit.strategy import PruningStrategy

        cls = self.entry_point.load()
        if not (isinstance(cls, type) and issubclass(cls, PruningStrategy)):
            raise PrunekitError(
                f"entry point {self.name!r} = {self.class_path!r} (from {self.distribution}) is not a "
                "subclass of prunekit.strategy.PruningStrategy"
            )
        return cls

    def description(self) -> str:
        doc = (self.load().__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


def available() -> dict[str, StrategyInfo]:
    """All registered strategies by name, sorted."""
    found: dict[str, StrategyInfo] = {}
    for ep in entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        found.setdefault(ep.name, StrategyInfo(ep.name, ep.value.replace(":", "."), dist, ep))
    return dict(sorted(found.items()))


def get(name: str) -> type:
    """The strategy class registered under ``name``; an unknown name lists the available ones."""
    strategies = available()
    if name not in strategies:
        names = ", ".join(strategies) or "(none: is prunekit installed?)"
        raise PrunekitError(f"unknown pruning method --strategy {name!r}; available strategies: {names} (Lightning's distributed engine is --trainer.strategy)")
    return strategies[name].load()


def class_path(name: str) -> str:
    """Import path of the class registered under ``name`` (for config files)."""
    cls = get(name)
    return f"{cls.__module__}.{cls.__qualname__}"
