"""Calibration statistics: float64 accumulators filled by forward hooks and reduced across processes.

Every statistic sums over calibration tokens, so the multi-process total is an all-reduce of per-process
sums (``trainer.strategy.reduce(..., "sum")``); Welford moments are merged exactly with Chan's parallel
formula, gathered in rank order. Sums in float64 differ between one and several processes only by summation
order (relative ~1e-16), far below any score gap that decides a mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prunekit.errors import PrunekitError

Reducer = Callable[[torch.Tensor], torch.Tensor]  # all-reduce (sum) across processes
Gatherer = Callable[[torch.Tensor], torch.Tensor]  # all-gather: (world, *shape), rank order


def _local_gather_objects(obj: Any) -> list[Any]:
    return [obj]


@dataclass
class Comm:
    """How statistics talk to the other processes: all-reduce (sum), all-gather of tensors (rank order) and of
    Python objects (rank order). ``Comm.local()`` is the one-process case."""

    sum: Reducer
    gather: Gatherer
    gather_objects: Callable[[Any], list[Any]] = _local_gather_objects

    @classmethod
    def local(cls) -> "Comm":
        return cls(lambda t: t, lambda t: t.unsqueeze(0), _local_gather_objects)


class Statistic(ABC):
    """A float64 statistic of a tensor read during calibration, accumulated over tokens (or examples)."""

    def __init__(self, features: int) -> None:
        self.features = features
        self.count = torch.zeros((), dtype=torch.float64)

    @staticmethod
    def _rows(x: torch.Tensor) -> torch.Tensor:
        return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)

    @abstractmethod
    def update(self, x: torch.Tensor, batch: Any = None) -> None:
        """Add the tokens of an activation ``x`` of shape (..., features); ``batch``: the calibration batch
        (``prunekit.observe.Batch``), for statistics that need to know the examples."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The accumulated state (for reduction, saving and tests)."""

    def reduce(self, comm: Comm) -> None:
        """Combine the states of all processes in place (default: every state is a sum)."""
        for name, t in self.tensors().items():
            t.copy_(comm.sum(t))

    def absorb(self, other: "Statistic") -> None:
        """Add another statistic's tokens to this one (default: every state is a sum)."""
        for mine, theirs in zip(self.tensors().values(), other.tensors().values()):
            mine += theirs


class ChannelSumSq(Statistic):
    """Σ x_j² per input channel j: ‖X_j‖₂² of the Wanda paper (Sun et al., 2023, Eq. 1)."""

    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.sumsq = torch.zeros(features, dtype=torch.float64)

    def update(self, x: torch.Tensor, batch: Any = None) -> None:
        rows = self._rows(x)
        self.sumsq += rows.square().sum(0)
        self.count += rows.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"sumsq": self.sumsq, "count": self.count}

    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens."""
        return self.sumsq.sqrt()


class Hessian(Statistic):
    """X Xᵀ summed over tokens (SparseGPT's layer Hessian up to the constant 2/N, which cancels).

    From ``2 * PANEL`` features on, a batch adds only the upper triangle, a panel of ``PANEL`` rows at a time
    (a third fewer multiplications at 1536 features, nearly half at 5632); the lower triangle is copied from it when
    ``xtx`` is read. Each entry is still one dot product over the batch's tokens added to the running sum, so the
    matrix equals the full ``addmm``'s (bitwise with MKL on 1 and 2 threads; a BLAS that orders the dot product
    by output block could differ in the last bit).
    """

    PANEL = 512

    def __init__(self, features: int) -> None:
        super().__init__(features)
        self._xtx = torch.zeros(features, features, dtype=torch.float64)
        self._upper_only = False  # the lower triangle lags the upper one (mirrored on read)

    @property
    def xtx(self) -> torch.Tensor:
        if self._upper_only:
            p = self.PANEL
            for a in range(0, self.features, p):
                self._xtx[a + p :, a : a + p] = self._xtx[a : a + p, a + p :].T
            self._upper_only = False
        return self._xtx

    def update(self, x: torch.Tensor, batch: Any = None) -> None:
        rows = self._rows(x)
        n, p = self.features, self.PANEL
        if n < 2 * p:
            self._xtx.addmm_(rows.T, rows)
        else:
            for a in range(0, n, p):
                self._xtx[a : a + p, a:].addmm_(rows[:, a : a + p].T, rows[:, a:])
            self._upper_only = True
        self.count += rows.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"xtx": self.xtx, "count": self.count}

    def mean(self) -> torch.Tensor:
        """X Xᵀ / N: the per-token average (what the reference accumulates, up to its factor 2)."""
        return self.xtx / self.count.clamp(min=1)


class ChannelMoments(Statistic):
    """Welford mean and variance per input channel (FLAP's fluctuation, SEAP's activation statistics)."""

    def __init__(self, features: int) -> None:
        super().__init__(features)
        self.mean = torch.zeros(features, dtype=torch.float64)
        self.m2 = torch.zeros(features, dtype=torch.float64)

    def _merge(self, n_b: torch.Tensor, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a = self.count.clone()
        n = n_a + n_b
        if n == 0:
            return
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.square() * (n_a * n_b / n)
        self.count.copy_(n)

    def update(self, x: torch.Tensor, batch: Any = None) -> None:
        rows = self._rows(x)
        n_b = torch.tensor(float(rows.shape[0]), dtype=torch.float64)
        if n_b == 0:
            return
        mean_b = rows.mean(0)
        self._merge(n_b, mean_b, (rows - mean_b).square().sum(0))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def absorb(self, other: "Statistic") -> None:
        self._merge(other.count.clone(), other.mean.clone(), other.m2.clone())

    def reduce(self, comm: Comm) -> None:
        # clone: a one-process "gather" may return views of the live state, which is zeroed next
        counts, means, m2s = (comm.gather(t).clone() for t in (self.count, self.mean, self.m2))
        self.count.zero_(), self.mean.zero_(), self.m2.zero_()
        for n_b, mean_b, m2_b in zip(counts, means, m2s):  # rank order: the same result on every rank
            self._merge(n_b, mean_b, m2_b)

    def variance(self, unbiased: bool = False) -> torch.Tensor:
        denom = self.count - 1 if unbiased else self.count
        return self.m2 / denom.clamp(min=1)


class Sum(Statistic):
    """Σ of a per-token (or per-example) tensor of shape (..., *shape) over its leading dimensions, float64.

    ``shape``: the trailing shape summed into (default ``(features,)``), e.g. ``(heads,)`` for a per-head score
    (give it with a factory: ``lambda features: Sum(features, (heads,))``).
    """

    def __init__(self, features: int, shape: tuple[int, ...] | None = None) -> None:
        super().__init__(features)
        self.shape = tuple(shape) if shape is not None else (features,)
        self.total = torch.zeros(self.shape, dtype=torch.float64)

    def update(self, x: torch.Tensor, batch: Any = None) -> None:
        rows = x.detach().reshape(-1, *self.shape).to(torch.float64)
        self.total += rows.sum(0)
        self.count += rows.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"total": self.total, "count": self.count}

    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


class Records(Statistic):
    """One value per calibration example (``x`` has a leading batch dimension matching the batch's examples),
    kept in float64 and ordered by global example index, so the records of one process and of several agree.

    After the reduction every process holds all records: ``index`` (examples,) and ``values`` (examples, ...).
    """

    def __init__(self, features: int = 0) -> None:
        super().__init__(features)
        self._items: list[tuple[int, torch.Tensor]] = []
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def index(self) -> torch.Tensor:
        return self._stack()[0]

    @property
    def values(self) -> torch.Tensor:
        return self._stack()[1]

    def update(self, x: torch.Tensor, batch: Any = None) -> None:
        if batch is None:
            raise PrunekitError("per-example records need the calibration batch (its example indices)")
        x = x.detach().to(torch.float64)
        if x.shape[0] != batch.size:
            raise PrunekitError(f"a per-example record needs one row per example of the batch ({batch.size}), got "
                                f"shape {tuple(x.shape)}: reduce over tokens in the observer's transform")
        for i, row in zip(batch.index.tolist(), x):
            self._items.append((int(i), row.cpu().clone()))
        self.count += x.shape[0]
        self._stacked = None

    def _stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, values) ordered by example index, built once after the records change."""
        if self._stacked is None:
            items = sorted(self._items, key=lambda item: item[0])
            if len({i for i, _ in items}) != len(items):
                raise PrunekitError("an example was recorded twice (the same index in two batches)")
            index = torch.tensor([i for i, _ in items], dtype=torch.long)
            values = torch.stack([v for _, v in items]) if items else torch.zeros(0, dtype=torch.float64)
            self._stacked = (index, values)
        return self._stacked

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"index": self.index, "values": self.values, "count": self.count}

    def reduce(self, comm: Comm) -> None:
        parts = comm.gather_objects(self._items)
        self._items = [item for part in parts for item in part]
        self.count.fill_(len(self._items))
        self._stacked = None
        self._stack()  # refuses duplicates now, on every process alike

    def absorb(self, other: "Statistic") -> None:
        self._items += list(other._items)
        self.count += other.count
        self._stacked = None

    def load(self, index: torch.Tensor, values: torch.Tensor) -> None:
        self._items = list(zip(index.tolist(), values))
        self.count.fill_(len(self._items))
        self._stacked = None


def check_finite(x: torch.Tensor, where: str, side: str = "input") -> None:
    if not torch.isfinite(x).all():
        raise PrunekitError(
            f"non-finite activations (NaN/inf) at the {side} of {where}; the model overflows on this data in its "
            "dtype: load it in float32 (--model.dtype float32) or check the model weights"
        )
