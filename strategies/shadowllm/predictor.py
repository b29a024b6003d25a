"""ShadowLLM and DejaVu predictors: small networks that map a feature of a prompt to per-unit importance scores.

ShadowLLM (Akhauri et al., 2024) trains ONE predictor from an early feature of the prompt to the scores of every
prunable unit (attention heads and MLP neurons of all layers); DejaVu (Liu et al., 2023) trains one predictor per
decoder layer from that layer's own input. This module holds the networks, their training, the evaluation metric,
and a (config, tensors) serialisation; the traces that feed them are ``traces.py``, the criteria ``criteria.py``.

Layout. A predictor's output is one row per example, the concatenation of ordered *blocks* (``Blocks``), e.g.
``[("1.heads", 9), ("1.neurons", 1536), ("2.heads", 9), ...]``: (E, ΣN).

Formulas (x: one example's feature, F wide; s: its unit scores):
- ``minmax(v) = (v - min v) / (max v - min v)`` along the last dim; a constant row gives zeros.
- ShadowPredictor: ``y = W2 · relu(W1 · minmax(x) + b1) + b2``, W1: hidden × F, W2: ΣN × hidden (hidden = 2048).
- LayerPredictor, ``binary=False`` (ShadowLLM's per-layer "dejavu" baseline): the same MLP, one per layer, input
  the layer's own feature, output that layer's blocks (hidden = 2048).
- LayerPredictor, ``binary=True`` (DejaVu's original form): ``logits = B · (A · x)``, A: r × F, B: ΣN × r, no bias,
  no activation (rank r = 1000); raw, unnormalised input; trained with weighted binary cross-entropy on 0/1
  targets (``binary_targets``): with w = the batch's mean target, positives weigh (1 - w) and negatives w.
- Regression targets (MSE): per-example min-max normalised scores, per block (``Blocks.normalise``) or over the
  whole row (``minmax``), see "Normalisation" below.
- Training (``fit``): AdamW, cosine annealing from ``lr`` to 0 over all steps (stepped per batch), shuffled
  mini-batches, a Lightning ``Trainer`` on the CPU.
- Metric (``spearman``): per-example Spearman rho between a predicted and a true row (average ranks for ties).

Defaults, from the reference (abdelfattah-lab/shadow_llm; paths below relative to its
``llm-interpret/lm-evaluation-harness/``):
- ``emnlp_activation_predictor.py`` (heads) and ``emnlp_activation_ffn_predictor.py`` (neurons): the "b1e"
  predictor is Linear(E, 2048) → ReLU → Linear(2048, L·H) (heads) or Linear(E, 2048 or 1024) → ReLU →
  Linear(·, L·ffn) (neurons); MSE loss; Adam (one version of the neuron trainer: AdamW, torch's default weight
  decay 0.01), lr 1e-3, ``CosineAnnealingLR(T_max = batches·epochs, eta_min=0)`` stepped per batch; 100 epochs;
  batch 32 (heads) and 4 or 8 (neurons); a random 80/20 (earlier 90/10) split; test metric: mean per-example
  ``scipy.stats.spearmanr``. → ``SHADOW_FIT`` and ``HIDDEN`` here.
- Their "b1e_seq" variant (the "dejavu" mask method of ``lm_eval/models/opt.py``): one such MLP per layer, input
  that layer's feature, output that layer's heads (or neurons), same loss and training. → ``LayerPredictor``.
- DejaVu's own predictors (FMInference/DejaVu ``sparse_predictor/main_mlp.py``, ``main_att.py``,
  ``trainer_mlp.py``, ``trainer_att.py``, ``run_c4_att.sh``): ``Sequential(Linear(d, D, bias=None),
  Linear(D, out, bias=None))`` with D = 1000; AdamW, weight decay 0.01, lr 1e-4 (MLP; attention 1e-3 by default,
  1e-4 in the run script), batch 1024, 20 epochs with early stopping on recall, no schedule; labels: neurons =
  (activation > 0), heads = the top k = 30 % (``--k 0.3``; default 0.7) of each example's head-output norms;
  loss ``binary_cross_entropy(sigmoid(logits), y, weight=y·(1-w) + w)`` with w = mean(y) (+ 0.005 for neurons).
  The attention predictor of layer l reads the previous layer's input (``att_x_{l-1}``), a look-ahead.
  → ``RANK``, ``DEJAVU_FIT``, ``binary_targets`` and ``fit(loss="bce")`` here.

Normalisation. The reference min-max normalises each example's input feature over the whole vector, and its
targets either over the whole L·H (or L·ffn) row ("b1e") or per layer ("b1eL": ``min/max(axis=1)`` of the (L, H)
table, used by the ``predictorL`` mask method). ``Blocks.normalise`` is the per-block form (per layer and per
kind), ``minmax`` the whole-row form; the heads and neurons predictors of the reference are separate networks, so
its whole-row form never mixes heads with neurons: normalise per block, or per kind, not over mixed blocks.
Examples whose input or target had max = min (NaN after the division) are dropped by one reference version; here
a constant row normalises to zeros.

Where we differ, and why:
- Input normalisation is inside the network (``normalise_input``), so training and inference cannot disagree.
  In the reference they do: ``lm_eval/models/opt.py``'s "dejavu" mask method normalises the feature in its
  ``perlayer`` style but feeds it raw in its ``global`` and ``hybrid`` styles.
- Shapes are stored with the weights (``to_state``/``from_state``) and checked on load. The reference builds the
  network again at load time from constants that do not always match training: ``lm_eval/models/opt.py``
  loads heads predictors with hidden ``glob_n_h = 2048`` and neuron predictors with ``glob_n = 2048``, while
  one version of ``emnlp_activation_predictor.py`` trains the heads MLP with hidden ``embedding_dim*2`` (4096 for
  OPT-1.3B) and one version of ``emnlp_activation_ffn_predictor.py`` trains the neuron MLP with hidden 1024 (a
  vLLM port of the same predictor hard-codes 1024) — ``load_state_dict`` then fails on the size mismatch. Its
  input width is taken as ``ffn_dim // 4``, equal to the hidden size only for OPT-style 4× MLPs; older loaders
  (``SequenceModel``) used ``embedding_dim // 2`` and ``// 4`` against trainers with other widths. The neuron
  trainer also checks for ``b1e.pt`` but saves ``b1e_fc1.pt``, and one version trains only layers ≥ 13.
- AdamW everywhere (``weight_decay=0`` is the reference's Adam); one seeded DataLoader order (the reference
  shuffles unseeded); the Lightning ``Trainer`` instead of a hand loop; MSE and weighted BCE by one ``fit``.
- The binary form computes the BCE from logits (``binary_cross_entropy_with_logits``: the same value as
  sigmoid-then-BCE, stable for large logits); ``pos_weight`` may instead fix torch's positive-class weight.
- ``spearman`` returns NaN for a row where either side is constant (as scipy does), instead of failing.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from typing import Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import PrunekitError

HIDDEN = 2048
"""ShadowLLM's predictor hidden width (``B1EPredModel`` / ``B1EPredModelFFN`` / ``B1ESeqPredModel``)."""

RANK = 1000
"""DejaVu's low-rank width D (``sparse_predictor/main_mlp.py`` / ``main_att.py``)."""

SHADOW_FIT = {"epochs": 100, "lr": 1e-3, "weight_decay": 0.0, "batch_size": 32}
"""ShadowLLM's training settings (Adam = AdamW without decay); pass as ``fit(..., **SHADOW_FIT, seed=0)``."""

DEJAVU_FIT = {"epochs": 20, "lr": 1e-4, "weight_decay": 0.01, "batch_size": 1024}
"""DejaVu's training settings (its early stopping on recall is not reproduced)."""

DEJAVU_KEEP = 0.3
"""DejaVu's head label fraction (``run_c4_att.sh --k 0.3``)."""


# --------------------------------------------------------------------------------------------- normalisation


def minmax(x: Tensor) -> Tensor:
    """Min-max normalise along the last dim to [0, 1], per row; a constant row becomes zeros. Floats keep their
    dtype, integers become float32. NaN in, NaN out."""
    if not isinstance(x, Tensor):
        raise PrunekitError(f"minmax needs a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise PrunekitError(f"minmax needs at least one value per row, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    lo = x.amin(-1, keepdim=True)
    span = x.amax(-1, keepdim=True) - lo
    flat = span == 0
    return torch.where(flat, torch.zeros_like(x), (x - lo) / torch.where(flat, torch.ones_like(span), span))


class Blocks:
    """Ordered, named output blocks of a predictor: ``[(name, size), ...]``; a row is their concatenation."""

    def __init__(self, blocks: Sequence[tuple[str, int]] | "Blocks") -> None:
        if isinstance(blocks, Blocks):
            blocks = blocks.to_list()
        try:
            pairs = [(name, size) for name, size in blocks]
        except (TypeError, ValueError):
            raise PrunekitError(f"blocks must be a list of (name, size) pairs, got {blocks!r}") from None
        if not pairs:
            raise PrunekitError("blocks is empty: give at least one (name, size) pair, e.g. [('1.heads', 9)]")
        for name, size in pairs:
            if not isinstance(name, str) or not name:
                raise PrunekitError(f"block names must be non-empty strings, got {name!r}")
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise PrunekitError(f"block {name!r} has size {size!r}: sizes must be integers >= 1")
        names = [n for n, _ in pairs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise PrunekitError(f"block names must be unique, repeated: {dup}")
        self.names: list[str] = names
        self.sizes: list[int] = [s for _, s in pairs]
        self.offsets: list[int] = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.total: int = sum(self.sizes)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(zip(self.names, self.sizes))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blocks) and self.to_list() == other.to_list()

    def __repr__(self) -> str:
        head = ", ".join(f"{n}:{s}" for n, s in list(self)[:4])
        return f"Blocks({len(self)} blocks, {self.total} units: {head}{', ...' if len(self) > 4 else ''})"

    def to_list(self) -> list[list]:
        """JSON form: ``[[name, size], ...]``."""
        return [[n, s] for n, s in self]

    def slice(self, name: str) -> slice:
        """The columns of block ``name``."""
        if name not in self.names:
            raise PrunekitError(f"no block {name!r}; blocks are {self.names[:6]}{' ...' if len(self) > 6 else ''}")
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def _check(self, t: Tensor, what: str) -> None:
        if not isinstance(t, Tensor) or t.dim() < 1:
            raise PrunekitError(f"{what} must be a tensor (E, {self.total}), got {getattr(t, 'shape', type(t))}")
        if t.shape[-1] != self.total:
            raise PrunekitError(f"{what} has {t.shape[-1]} columns but the blocks hold {self.total} units "
                                f"({len(self)} blocks): build the tensor with the same blocks, in the same order")

    def split(self, t: Tensor) -> dict[str, Tensor]:
        """(E, ΣN) → ``{name: (E, n)}`` (views, in block order)."""
        self._check(t, "the tensor to split")
        return {n: t[..., o:o + s] for n, s, o in zip(self.names, self.sizes, self.offsets)}

    def cat(self, parts: Mapping[str, Tensor]) -> Tensor:
        """``{name: (E, n)}`` → (E, ΣN), in block order; every block must be present with its size."""
        missing = [n for n in self.names if n not in parts]
        extra = [n for n in parts if n not in self.names]
        if missing or extra:
            raise PrunekitError(f"blocks to concatenate do not match: missing {missing[:6]}, unknown {extra[:6]}")
        for n, s in self:
            if not isinstance(parts[n], Tensor) or parts[n].shape[-1] != s:
                raise PrunekitError(f"block {n!r} should have {s} columns, got {getattr(parts[n], 'shape', None)}")
        return torch.cat([parts[n] for n in self.names], dim=-1)

    def normalise(self, x: Tensor | Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """Per-example min-max within each block; returns the same form it is given (tensor or dict)."""
        if isinstance(x, Mapping):
            self.cat(x)  # validates
            return {n: minmax(x[n]) for n in self.names}
        return self.cat({n: minmax(v) for n, v in self.split(x).items()})


# ------------------------------------------------------------------------------------------------ networks


class ShadowPredictor(nn.Module):
    """ShadowLLM's predictor: ONE MLP from an early feature of the prompt (E, F) to all blocks (E, ΣN).

    ``Linear(F, hidden) → ReLU → Linear(hidden, ΣN)``; ``normalise_input`` min-max normalises each input row first
    (as the reference does to the layer-0 feature before both training and inference)."""

    def __init__(self, in_features: int, blocks: Sequence[tuple[str, int]] | Blocks, hidden: int = HIDDEN,
                 normalise_input: bool = True) -> None:
        super().__init__()
        _positive("in_features", in_features)
        _positive("hidden", hidden)
        self.blocks = Blocks(blocks)
        self.in_features, self.hidden, self.normalise_input = in_features, hidden, bool(normalise_input)
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, self.blocks.total)

    def forward(self, x: Tensor) -> Tensor:
        x = _features(x, self.in_features)
        if self.normalise_input:
            x = minmax(x)
        return self.fc2(F.relu(self.fc1(x)))

    @torch.no_grad()
    def scores(self, x: Tensor) -> dict[str, Tensor]:
        """Predicted scores per block: ``{name: (E, n)}``."""
        return self.blocks.split(self(x))

    def config(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "blocks": self.blocks.to_list(),
                "hidden": self.hidden, "normalise_input": self.normalise_input}


class LayerPredictor(nn.Module):
    """DejaVu-style predictor, one per decoder layer: that layer's input feature (E, F) → that layer's blocks.

    ``binary=False`` (ShadowLLM's per-layer baseline): ``Linear(F, hidden) → ReLU → Linear(hidden, ΣN)`` on the
    min-max normalised input, regressed on scores (hidden default ``HIDDEN``).
    ``binary=True`` (DejaVu): ``Linear(F, rank, bias=False) → Linear(rank, ΣN, bias=False)`` on the raw input,
    logits of "this unit is among the kept ones", trained with weighted BCE (rank default ``RANK``)."""

    def __init__(self, in_features: int, blocks: Sequence[tuple[str, int]] | Blocks, hidden: int | None = None,
                 binary: bool = False, normalise_input: bool | None = None) -> None:
        super().__init__()
        self.binary = bool(binary)
        hidden = (RANK if self.binary else HIDDEN) if hidden is None else hidden
        _positive("in_features", in_features)
        _positive("hidden", hidden)
        self.blocks = Blocks(blocks)
        self.in_features, self.hidden = in_features, hidden
        self.normalise_input = (not self.binary) if normalise_input is None else bool(normalise_input)
        bias = not self.binary
        self.fc1 = nn.Linear(in_features, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, self.blocks.total, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = _features(x, self.in_features)
        if self.normalise_input:
            x = minmax(x)
        h = self.fc1(x)
        return self.fc2(h if self.binary else F.relu(h))

    @torch.no_grad()
    def scores(self, x: Tensor) -> dict[str, Tensor]:
        """Predicted scores per block (logits for the binary form: same order as probabilities)."""
        return self.blocks.split(self(x))

    @torch.no_grad()
    def probabilities(self, x: Tensor) -> Tensor:
        """sigmoid(logits): the binary form's probability that each unit is kept."""
        if not self.binary:
            raise PrunekitError("probabilities() is for binary=True predictors; a regression predictor's "
                                "output is a score: use forward() or scores()")
        return torch.sigmoid(self(x))

    def config(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "blocks": self.blocks.to_list(),
                "hidden": self.hidden, "binary": self.binary, "normalise_input": self.normalise_input}


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunekitError(f"{name} must be an integer >= 1, got {value!r}")


def _features(x: Tensor, width: int) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != width:
        raise PrunekitError(f"the predictor takes features (E, {width}); got {getattr(x, 'shape', type(x))}: "
                            f"feed the feature it was built for (one row per example)")
    return x if x.is_floating_point() else x.float()


# -------------------------------------------------------------------------------------------------- targets


def binary_targets(scores: Tensor, blocks: Blocks | Sequence[tuple[str, int]], keep: float) -> Tensor:
    """0/1 targets (E, ΣN): 1 for the top ``keep`` fraction of units in each block of each example.

    Per block of n units, k = max(1, floor(keep·n)) units are marked (DejaVu's ``int(n·k)``, at least one);
    ties are broken by ``torch.topk``'s order."""
    blocks = Blocks(blocks)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise PrunekitError(f"keep is the fraction of units marked 1 in each block, in (0, 1]; got {keep!r}")
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise PrunekitError(f"scores must be (E, {blocks.total}), got {getattr(scores, 'shape', type(scores))}")
    parts = {}
    for name, block in blocks.split(scores).items():
        n = block.shape[-1]
        k = min(n, max(1, math.floor(keep * n + 1e-9)))
        top = block.float().topk(k, dim=-1).indices
        parts[name] = torch.zeros(block.shape, dtype=torch.float32).scatter_(-1, top, 1.0)
    return blocks.cat(parts)


# ------------------------------------------------------------------------------------------------- metric


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dim, ties getting the mean of their positions (scipy's ``rankdata``)."""
    s, order = x.sort(dim=-1)
    n = s.shape[-1]
    new = torch.ones_like(s, dtype=torch.bool)
    new[..., 1:] = s[..., 1:] != s[..., :-1]
    group = new.long().cumsum(-1) - 1
    pos = torch.arange(n, dtype=torch.float64).expand(s.shape).contiguous()
    first = torch.full(s.shape, float(n), dtype=torch.float64).scatter_reduce(-1, group, pos, "amin")
    last = torch.zeros(s.shape, dtype=torch.float64).scatter_reduce(-1, group, pos, "amax")
    mean = (first.gather(-1, group) + last.gather(-1, group)) / 2 + 1
    return torch.empty_like(mean).scatter_(-1, order, mean)


def spearman(pred: Tensor, target: Tensor) -> Tensor:
    """Per-example Spearman rho (E,) float64 between rows of ``pred`` and ``target`` (both (E, N), or (N,) for
    one row): the Pearson correlation of their average ranks, as ``scipy.stats.spearmanr``. A row where either
    side is constant has no defined rho: NaN (average with ``torch.nanmean``)."""
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise PrunekitError("spearman takes two tensors")
    if pred.shape != target.shape or pred.dim() not in (1, 2):
        raise PrunekitError(f"spearman compares rows of equal shape (E, N): got {tuple(pred.shape)} and "
                            f"{tuple(target.shape)}")
    if pred.dim() == 1:
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    if pred.shape[-1] < 2:
        raise PrunekitError(f"spearman needs at least two units per row, got {pred.shape[-1]}")
    pred, target = pred.detach().double().cpu(), target.detach().double().cpu()
    if not (torch.isfinite(pred).all() and torch.isfinite(target).all()):
        raise PrunekitError("spearman got NaN or infinite values: check the predictor's output and the scores")
    a, b = _average_ranks(pred), _average_ranks(target)
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    den = (a.pow(2).sum(-1) * b.pow(2).sum(-1)).sqrt()
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def mean_spearman(pred: Tensor, target: Tensor) -> float:
    """The mean of ``spearman`` over the examples with a defined rho (the reference's test metric)."""
    return float(torch.nanmean(spearman(pred, target)))


# ------------------------------------------------------------------------------------------------ training


def _loss_fn(kind: str, pos_weight: Tensor | None):
    if kind == "mse":
        return F.mse_loss
    if pos_weight is not None:
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)

    def dejavu(logits: Tensor, y: Tensor) -> Tensor:
        w = y.mean()
        return F.binary_cross_entropy_with_logits(logits, y, weight=y * (1 - w) + w)

    return dejavu


def _fit_module(net: nn.Module, loss, lr: float, weight_decay: float, total_steps: int):
    import lightning.pytorch as pl

    class _Fit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.epoch_losses: list[float] = []
            self._sum, self._count = 0.0, 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            value = loss(self.net(x), y)
            self._sum += float(value.detach()) * len(x)
            self._count += len(x)
            return value

        def on_train_epoch_end(self) -> None:
            self.epoch_losses.append(self._sum / max(self._count, 1))
            self._sum, self._count = 0.0, 0

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=0.0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return _Fit()


@contextmanager
def _quiet_lightning():
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _check_pair(net: nn.Module, x, y, what: str) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise PrunekitError(f"{what}: inputs and targets must be tensors")
    if x.dim() != 2 or y.dim() != 2:
        raise PrunekitError(f"{what}: inputs must be (E, F) and targets (E, ΣN); got {tuple(x.shape)} and "
                            f"{tuple(y.shape)}")
    if x.shape[0] == 0:
        raise PrunekitError(f"{what}: no examples (0 rows): trace at least one example first")
    if x.shape[0] != y.shape[0]:
        raise PrunekitError(f"{what}: {x.shape[0]} input rows but {y.shape[0]} target rows: one target row per "
                            f"example, in the same order")
    width = getattr(net, "in_features", None)
    if width is not None and x.shape[1] != width:
        raise PrunekitError(f"{what}: inputs have {x.shape[1]} features but the predictor takes {width}")
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, Blocks) and y.shape[1] != blocks.total:
        raise PrunekitError(f"{what}: targets have {y.shape[1]} columns but the predictor's blocks hold "
                            f"{blocks.total} units: build targets with the same blocks (Blocks.cat)")
    x, y = x.detach().float().cpu(), y.detach().float().cpu()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise PrunekitError(f"{what}: NaN or infinite values in inputs or targets: drop or repair those examples")
    return x, y


def fit(net: nn.Module, inputs: Tensor, targets: Tensor, *, loss: Literal["mse", "bce"] = "mse",
        pos_weight: float | Tensor | None = None, epochs: int, lr: float, weight_decay: float, batch_size: int,
        seed: int, val: tuple[Tensor, Tensor] | None = None, progress: bool = False) -> dict:
    """Train ``net`` IN PLACE to map ``inputs`` (E, F) to ``targets`` (E, ΣN) with a Lightning ``Trainer``.

    ``loss="mse"``: regression on (normalised) scores. ``loss="bce"``: ``net`` outputs logits, targets are 0/1
    (``binary_targets``); ``pos_weight=None`` is DejaVu's per-batch weighting (w = mean target; positives weigh
    1 - w, negatives w), a float or (ΣN,) tensor is torch's ``pos_weight`` instead. AdamW(lr, weight_decay);
    cosine annealing to 0 over all steps; mini-batches shuffled by a generator seeded with ``seed``.

    Returns ``{"train_loss": [per-epoch mean], "val_loss": float | None, "val_spearman": float | None,
    "epochs": int, "steps": int}`` (``val_spearman``: mean per-example rho of the output vs the targets)."""
    import lightning.pytorch as pl

    if not isinstance(net, nn.Module):
        raise PrunekitError(f"fit trains an nn.Module, got {type(net).__name__}")
    if loss not in ("mse", "bce"):
        raise PrunekitError(f"loss must be 'mse' (scores) or 'bce' (0/1 targets, logits), got {loss!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        _positive(name, value)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise PrunekitError(f"lr must be a number > 0, got {lr!r}")
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise PrunekitError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PrunekitError(f"seed must be an integer, got {seed!r}")
    x, y = _check_pair(net, inputs, targets, "training data")
    if val is not None:
        if not isinstance(val, (tuple, list)) or len(val) != 2:
            raise PrunekitError("val must be a pair (inputs, targets)")
        vx, vy = _check_pair(net, val[0], val[1], "validation data")
        if vx.shape[1] != x.shape[1] or vy.shape[1] != y.shape[1]:
            raise PrunekitError(f"validation data {tuple(vx.shape)}, {tuple(vy.shape)} do not match the training "
                                f"data's widths {x.shape[1]}, {y.shape[1]}")
    pw = None
    if loss == "bce":
        for what, t in (("targets", y),) + ((("validation targets", vy),) if val is not None else ()):
            if t.min() < 0 or t.max() > 1:
                raise PrunekitError(f"loss='bce' needs {what} in [0, 1] (e.g. binary_targets(scores, blocks, "
                                    f"keep)); got values in [{float(t.min()):.3g}, {float(t.max()):.3g}]")
        if pos_weight is not None:
            pw = torch.as_tensor(pos_weight, dtype=torch.float32)
            if pw.dim() > 1 or (pw.dim() == 1 and pw.numel() != y.shape[1]) or not (pw > 0).all():
                raise PrunekitError(f"pos_weight must be a number > 0 or a ({y.shape[1]},) tensor of them, "
                                    f"got shape {tuple(pw.shape)}")
    elif pos_weight is not None:
        raise PrunekitError("pos_weight applies to loss='bce' only")
    with torch.no_grad():
        out = net(x[:1])
    if not isinstance(out, Tensor) or out.shape != (1, y.shape[1]):
        raise PrunekitError(f"the network's output for one example is {getattr(out, 'shape', type(out))}, but "
                            f"targets have {y.shape[1]} columns: build the predictor with the targets' blocks")

    objective = _loss_fn(loss, pw)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    module = _fit_module(net, objective, float(lr), float(weight_decay), steps_per_epoch * epochs)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    was_training = net.training
    with _quiet_lightning():
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                             num_sanity_val_steps=0)
        trainer.fit(module, loader)
    net.train(was_training)
    report = {"train_loss": list(module.epoch_losses), "val_loss": None, "val_spearman": None,
              "epochs": trainer.current_epoch, "steps": trainer.global_step}
    if val is not None:
        net.eval()
        with torch.no_grad():
            pred = net(vx)
            report["val_loss"] = float(objective(pred, vy))
        net.train(was_training)
        rho = spearman(pred, vy)
        report["val_spearman"] = float(torch.nanmean(rho)) if not torch.isnan(rho).all() else None
    return report


# --------------------------------------------------------------------------------------------- serialisation

_CLASSES = {"ShadowPredictor": ShadowPredictor, "LayerPredictor": LayerPredictor}
FORMAT = 1


def to_state(net: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """(JSON-able config, tensors) of a predictor: save the tensors with safetensors, the config as JSON."""
    if type(net).__name__ not in _CLASSES or not isinstance(net, _CLASSES[type(net).__name__]):
        raise PrunekitError(f"to_state saves ShadowPredictor or LayerPredictor, got {type(net).__name__}")
    config = dict(net.config(), format=FORMAT)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}
    return config, tensors


def from_state(config: Mapping, tensors: Mapping[str, Tensor]) -> nn.Module:
    """Rebuild a predictor from ``to_state``'s output (eval mode); shapes are checked against the config."""
    if not isinstance(config, Mapping) or config.get("class") not in _CLASSES:
        raise PrunekitError(f"predictor config must name its class, one of {sorted(_CLASSES)}; got "
                            f"{config.get('class') if isinstance(config, Mapping) else config!r}")
    if config.get("format", FORMAT) != FORMAT:
        raise PrunekitError(f"predictor format {config.get('format')!r} is not {FORMAT}: save it again with "
                            f"this prunekit")
    options = {k: v for k, v in config.items() if k not in ("class", "format")}
    try:
        net = _CLASSES[config["class"]](**options)
    except TypeError as e:
        raise PrunekitError(f"predictor config does not fit {config['class']}: {e}") from None
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise PrunekitError(f"predictor tensors do not match its config: missing {missing}, unexpected {extra}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise PrunekitError(f"predictor tensor {k!r} is {tuple(tensors[k].shape)} but the config builds "
                                f"{tuple(v.shape)}: the weights were trained with another shape")
    net.load_state_dict({k: tensors[k] for k in expected})
    return net.eval()
