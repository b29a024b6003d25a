"""``shadowllm`` and ``dejavu``: dynamic (per-input) head and neuron pruning with trained predictors.

One calibration pass (the gradient pipeline for gradient criteria; all-at-once for ``l2_norm``) records, for
every calibration example, the criterion's per-example head and neuron scores of layers 1…L−1 and the
predictors' inputs (``prunekit.strategies.shadowllm.traces``). ``decide`` then trains the predictors with
Lightning (``prunekit.strategies.shadowllm.predictor``) on a seeded split of the examples, reports the
held-out per-example Spearman ρ between predicted and true scores, and returns a ``RuntimePolicy`` whose runtime
(``prunekit.strategies.shadowllm.runtime``) selects heads and neurons per input at inference.

- ``shadowllm`` (Akhauri et al., 2024): criterion ``plainact``; ONE predictor on the layer-0 feature (the last
  token's layer-0 attention context, min-max normalised) → every layer's head and neuron scores (targets min-max
  normalised per layer and kind); ``scope="global"`` by default.
- ``dejavu`` (Liu et al., 2023, as ShadowLLM compares it): criterion ``l2_norm``; one predictor per layer on
  the hidden state entering that layer; local. ``binary=True`` is DejaVu's own form: a low-rank predictor with
  binary targets (the top 1 − p of each layer) trained with weighted BCE.

The calibration examples are task prompts with their gold answers (``--data.corpus task --data.packing
documents``); the feature is read at each example's last token, as the runtime reads a request's last token.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.plans import RuntimePolicy
from prunekit.strategy import PruningStrategy
from prunekit.strategies.shadowllm import traces
from prunekit.strategies.shadowllm.criteria import get
from prunekit.strategies.shadowllm.predictor import minmax
from prunekit.strategies.shadowllm.runtime import ShadowRuntime
from prunekit.strategies.shadowllm.select import check_scope, check_sparsity


def split_examples(count: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) positions of ``count`` examples: a seeded permutation, the last ``holdout`` fraction
    held out (at least one of each when ``holdout`` > 0 and there are two examples or more)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held = int(round(holdout * count))
    if holdout > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    return order[:count - held].sort().values, order[count - held:].sort().values


def normalised_targets(table: dict, layers: list[int]) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """Targets (E, Σ) in block order ``[<l>.heads, <l>.neurons, …]``, each block min-max normalised per example."""
    parts, blocks = [], []
    for i in layers:
        for kind in ("heads", "neurons"):
            t = table[kind][i].float()
            parts.append(minmax(t))
            blocks.append((f"{i}.{kind}", t.shape[1]))
    return torch.cat(parts, dim=1), blocks


def train_predictors(design: str, table: dict, feats: dict, layers: list[int], *, hidden: int | None = None,
                     epochs: int = 50, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 32,
                     holdout: float = 0.2, seed: int = 0, binary: bool = False, keep: float = 0.5):
    """Train the predictors of ``design`` on per-example criterion scores ``table`` (``traces.per_example``) and
    features ``feats`` (``traces.features``): ``(predictor, blocks, report)``. A seeded ``holdout`` fraction of
    the examples is kept out of training; the report gives its mean per-example Spearman ρ per kind (heads,
    neurons; for dejavu averaged over layers). ``keep``: the binary DejaVu form's positive fraction."""
    from prunekit.strategies.shadowllm import predictor as P

    count = int(table["index"].numel())
    if count < 2:
        raise PrunekitError(f"the predictors train on the calibration examples: got {count}, need at least 2 "
                            "(raise --data.num_samples)")
    train, held = split_examples(count, holdout, seed)
    targets, blocks = normalised_targets(table, layers)
    fit = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    size = {"hidden": hidden} if hidden else {}
    report: dict[str, Any] = {"examples": count, "train": int(train.numel()), "held_out": int(held.numel())}
    if design == "shadowllm":
        x = feats["layer0"].float()  # the predictor min-max normalises its input itself
        with _seeded(seed):
            net = P.ShadowPredictor(x.shape[1], blocks, **size)
        val = (x[held], targets[held]) if held.numel() else None
        report["fit"] = P.fit(net, x[train], targets[train], val=val, **fit)
        if held.numel():
            with torch.no_grad():
                report["spearman"] = _spearman_blocks(P, net(x[held]), targets[held], blocks)
        return net.eval(), blocks, report
    predictor, rhos, fits = {}, {}, {}
    for i in layers:
        x = feats["inputs"][i].float()
        own = [b for b in blocks if int(b[0].split(".")[0]) == i]
        y = torch.cat([minmax(table[k][i].float()) for k in ("heads", "neurons")], dim=1)
        with _seeded(seed * 1009 + i):
            net = P.LayerPredictor(x.shape[1], own, binary=binary, **size)
        truth = y
        if binary:
            y = P.binary_targets(y, own, keep)  # DejaVu's per-batch weighting (pos_weight None)
        fits[i] = P.fit(net, x[train], y[train], loss="bce" if binary else "mse",
                        val=(x[held], y[held]) if held.numel() else None, **fit)
        if held.numel():
            with torch.no_grad():
                rhos[i] = _spearman_blocks(P, net(x[held]), truth[held], own)
        predictor[i] = net.eval()
    report["fit"] = {"final_train_loss": {i: f["train_loss"][-1] for i, f in fits.items()},
                     "val_loss": {i: f.get("val_loss") for i, f in fits.items()}}
    if rhos:
        report["spearman"] = {kind: sum(r[kind] for r in rhos.values()) / len(rhos) for kind in ("heads", "neurons")}
    return predictor, blocks, report


class _Dynamic(PruningStrategy):
    design = "shadowllm"
    default_criterion = "plainact"

    def __init__(self, sparsity: float = 0.5, criterion: str | None = None, scope: str = "global",
                 prompt: Literal["sparse", "dense"] = "sparse", mode: Literal["auto", "gen", "class", "prefix"] = "auto",
                 prefix: int | None = None, hidden: int | None = None, epochs: int = 50, lr: float = 1e-3,
                 weight_decay: float = 0.01, batch_size: int = 32, holdout: float = 0.2, seed: int = 0,
                 binary: bool = False) -> None:
        check_sparsity(sparsity)
        super().__init__(sparsity=sparsity, mode="all-at-once")
        self.criterion = get(criterion or self.default_criterion)
        self.scope = check_scope(scope)
        if not 0 <= holdout < 1:
            raise PrunekitError(f"holdout must be in [0, 1) (the fraction of calibration examples kept out of "
                                f"training to report Spearman ρ), got {holdout}")
        if epochs < 1:
            raise PrunekitError(f"epochs must be at least 1, got {epochs}")
        self.runtime_options = dict(design=self.design, sparsity=float(sparsity), scope=scope, prompt=prompt,
                                    mode=mode, prefix=prefix)
        ShadowRuntime(nn.Linear(1, 1), [], **self.runtime_options)  # option errors now, before any model loads
        self.hidden, self.epochs, self.lr, self.weight_decay = hidden, epochs, lr, weight_decay
        self.batch_size, self.holdout, self.seed, self.binary = batch_size, holdout, seed, binary
        self.report: dict[str, Any] = {}

    @property
    def pipeline(self) -> str:
        return "gradient" if self.criterion.needs_grad else "all-at-once"

    def _layers(self, model: nn.Module) -> list[int]:
        n = len(adapter_for(model).layers(model))
        if n < 2:
            raise PrunekitError("dynamic pruning keeps layer 0 dense: the model needs at least 2 decoder layers")
        return list(range(1, n))

    def check(self, model: nn.Module) -> None:
        self._layers(model)
        if getattr(model, "_prunekit_runtime", None) is not None:
            raise PrunekitError("the model already carries a runtime (a folder pruned with a dynamic method); "
                                f"{self.name} goes on a dense or statically pruned model")

    def observers(self, model: nn.Module, layer: int | None):
        layers = self._layers(model)
        inputs = layers if self.design == "dejavu" else None
        return traces.observers(model, self.criterion, layers) + traces.feature_observers(model, inputs)

    def decide(self, model: nn.Module, observed, layer, context) -> RuntimePolicy:
        layers = self._layers(model)
        table = traces.per_example(model, observed, self.criterion, layers)
        feats = traces.features(observed, layers if self.design == "dejavu" else None)
        predictor, blocks, report = train_predictors(
            self.design, table, feats, layers, hidden=self.hidden, epochs=self.epochs, lr=self.lr,
            weight_decay=self.weight_decay, batch_size=self.batch_size, holdout=self.holdout, seed=self.seed,
            binary=self.binary, keep=1 - self.sparsity)
        report["criterion"] = self.criterion.name
        self.report = report
        runtime = ShadowRuntime(predictor, blocks, **self.runtime_options,
                                report={k: report[k] for k in ("criterion", "examples", "held_out", "spearman")
                                        if k in report})
        return RuntimePolicy(runtime=runtime)

    def describe(self) -> dict[str, Any]:
        out = {"strategy": self.name, "criterion": self.criterion.name, **self.runtime_options,
               "epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
               "holdout": self.holdout, "seed": self.seed}
        if self.hidden:
            out["hidden"] = self.hidden
        if self.design == "dejavu":
            out["binary"] = self.binary
        return out

    def label(self) -> str:
        return f"{self.name} ({self.criterion.name}, {self.sparsity:.0%} {self.scope})"


@contextmanager
def _seeded(seed: int):
    """Initialise a predictor from ``seed`` without touching the global random state (same seed → same masks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _spearman_blocks(P, pred: torch.Tensor, truth: torch.Tensor, blocks: list[tuple[str, int]]) -> dict[str, float]:
    """Mean per-example Spearman ρ between predicted and true scores, per kind (heads, neurons), averaged over
    the layers' blocks."""
    out: dict[str, list[float]] = {"heads": [], "neurons": []}
    start = 0
    for name, size in blocks:
        kind = name.split(".")[1]
        rho = P.spearman(pred[:, start:start + size].float(), truth[:, start:start + size].float())
        rho = rho[~torch.isnan(rho)]
        if rho.numel():
            out[kind].append(float(rho.mean()))
        start += size
    return {k: (sum(v) / len(v) if v else float("nan")) for k, v in out.items()}


class ShadowLLM(_Dynamic):
    """ShadowLLM: plainact scores, one layer-0 predictor for every layer, global per-input pruning.

    Args:
        sparsity: fraction of the heads and neurons of layers 1…L−1 dropped per input, in [0, 1).
        criterion: the criterion the predictor learns (default ``plainact``).
        scope: ``global`` (default) or ``local``.
        prompt: ``sparse`` (the reference: the prompt runs on the selection too) or ``dense``.
        mode / prefix: how a forward without a KV cache is scored (``prunekit.strategies.shadowllm.runtime``).
        hidden: the predictor's hidden width (default: the predictor module's).
        epochs, lr, weight_decay, batch_size: predictor training (AdamW, cosine schedule).
        holdout: fraction of calibration examples held out to report Spearman ρ.
        seed: the split and the training.
    """

    name = "shadowllm"
    design = "shadowllm"
    default_criterion = "plainact"


class DejaVu(_Dynamic):
    """DejaVu-style: l2_norm scores, one predictor per layer on that layer's input, local per-input pruning.

    Args: as ``shadowllm`` (scope is local), and ``binary``: DejaVu's original form (binary top-(1 − p) targets,
    weighted BCE).
    """

    name = "dejavu"
    design = "dejavu"
    default_criterion = "l2_norm"

    def __init__(self, sparsity: float = 0.5, criterion: str | None = None, scope: str = "local",
                 prompt: Literal["sparse", "dense"] = "sparse", mode: Literal["auto", "gen", "class", "prefix"] = "auto",
                 prefix: int | None = None, hidden: int | None = None, epochs: int = 50, lr: float = 1e-3,
                 weight_decay: float = 0.01, batch_size: int = 32, holdout: float = 0.2, seed: int = 0,
                 binary: bool = False) -> None:
        super().__init__(sparsity, criterion, scope, prompt, mode, prefix, hidden, epochs, lr, weight_decay,
                         batch_size, holdout, seed, binary)
