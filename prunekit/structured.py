"""StructuredStrategy: the shared base of methods that remove whole attention heads and MLP channels.

A structured method scores the *input dimensions of the consumer projections*: o_proj's inputs (head_dim per
query head) for attention, down_proj's (fc2's) inputs for MLP channels. This base turns those per-dimension
scores into head and channel scores, spreads the global ratio over layers (``prunekit.allocation``),
optionally compensates the removed channels' mean contribution with a bias (FLAP), and cuts the model
physically (a ``UnitCut`` plan, realized by ``prunekit.realize.cuts``).

``sparsity`` is the requested fraction of attention+MLP weights to remove (of the kinds being pruned: with
``prune_heads=False`` it is the fraction of MLP channels). With uniform/logistic allocation every prunable
layer ℓ removes ``int(ρ_ℓ · units)`` head units, as the references do, and then — ``meet_ratio=True``, the
default — as many channels as bring the layer's removed attention+MLP weights to ρ_ℓ of them (nearest
channel). The references instead take ``int(ρ_ℓ · channels)`` channels independently (``meet_ratio=False``);
with multi-head attention the two agree to within a head, but under grouped-query attention the units are
coarse (SmolLM2: 3 KV groups per layer, so 20% removes no head at all) and the independent floors remove
15% instead of the requested 20%, which would make methods at "the same ratio" incomparable. The achieved
ratio is reported either way, never assumed.

Head units under grouped-query attention (``head_unit``): ``kv_group`` removes whole KV groups with all their
query heads (group score = sum of its heads' scores); ``query`` removes the same number of query heads from
every group. With plain multi-head attention both mean single heads. With a single KV head (multi-query
attention, e.g. Gemma-3-270M: 4 query heads share one K/V head) the ``kv_group`` unit is the layer's whole
attention, which a layer keeps unless ``allow_empty``: heads are then never removed and the MLP channels carry
the whole ratio. ``query`` removes single query heads (q rows and o columns; the shared K/V head stays) and
works with every allocation, adaptive included, since one group trivially loses the same number per group.
"""

from __future__ import annotations

from typing import Literal

import torch

from prunekit import allocation as alloc
from prunekit.arch import LinearRef, adapter_for
from prunekit.errors import PrunekitError
from prunekit.plans import LayerCut, UnitCut
from prunekit.stats import ChannelMoments, Statistic
from prunekit.strategy import PruningStrategy
from prunekit.surgery import CONSUMERS, PRODUCERS, attention_heads

Allocation = Literal["uniform", "logistic", "adaptive"]


class StructuredStrategy(PruningStrategy):
    """Base class: remove attention heads and MLP channels; subclasses provide per-dimension scores.

    Args:
        sparsity: fraction of attention+MLP weights to remove, in [0, 1).
        allocation: ``uniform`` (UL), ``logistic`` (SEAP's LB) or ``adaptive`` (FLAP's AL-AM, all-at-once only).
        prune_heads / prune_channels: which units may be removed.
        head_unit: ``kv_group`` or ``query`` (see module docstring).
        keep_first / keep_last: layers kept dense (default: 2 and 2 for logistic, else 0).
        logistic_k / logistic_x0: the logistic schedule's slope and midpoint (SEAP: 0.8, 0.3).
        standardization: ``zscore`` (FLAP) or ``robust`` (SEAP) for adaptive allocation.
        meet_ratio: uniform/logistic: channels make up each layer's head-rounding shortfall (module docstring).
        allow_empty: a layer may lose all its heads or all its channels (FLAP's reference allows it; the
            default keeps at least one unit of each, see ``prunekit.surgery`` for how empty layers run).
        bias_compensation: add W[:, removed] · mean(x[removed]) to the consumer's bias (FLAP).
        mode: ``all-at-once`` (statistics of the dense model) or ``sequential``.
        layers: decoder layers allowed to lose units (default: all).
    """

    default_allocation: Allocation = "uniform"
    dimension_stats: dict[str, type[Statistic]] = {}

    def __init__(
        self,
        sparsity: float = 0.2,
        allocation: Allocation | None = None,
        prune_heads: bool = True,
        prune_channels: bool = True,
        head_unit: Literal["kv_group", "query"] = "kv_group",
        keep_first: int | None = None,
        keep_last: int | None = None,
        logistic_k: float = 0.8,
        logistic_x0: float = 0.3,
        standardization: Literal["zscore", "robust"] = "zscore",
        meet_ratio: bool = True,
        allow_empty: bool = False,
        bias_compensation: bool = False,
        mode: Literal["sequential", "all-at-once"] = "all-at-once",
        layers: list[int] | None = None,
    ) -> None:
        if not (prune_heads or prune_channels):
            raise PrunekitError("prune_heads and prune_channels are both false: nothing to prune")
        modules = (["o"] if prune_heads else []) + (list(CONSUMERS) if prune_channels else [])
        super().__init__(sparsity=sparsity, mode=mode, modules=modules, layers=layers)
        self.allocation = allocation or self.default_allocation
        if self.allocation not in ("uniform", "logistic", "adaptive"):
            raise PrunekitError(f"allocation must be uniform, logistic or adaptive, got {self.allocation!r}")
        if self.allocation == "adaptive" and mode != "all-at-once":
            raise PrunekitError("adaptive allocation ranks all layers together: it needs mode='all-at-once'")
        if head_unit not in ("kv_group", "query"):
            raise PrunekitError(f"head_unit must be 'kv_group' or 'query', got {head_unit!r}")
        default_keep = 2 if self.allocation == "logistic" else 0
        self.keep_first = default_keep if keep_first is None else keep_first
        self.keep_last = default_keep if keep_last is None else keep_last
        self.prune_heads, self.prune_channels, self.head_unit = prune_heads, prune_channels, head_unit
        self.logistic_k, self.logistic_x0, self.standardization = logistic_k, logistic_x0, standardization
        self.bias_compensation, self.meet_ratio, self.allow_empty = bias_compensation, meet_ratio, allow_empty
        stats = dict(self.dimension_stats)
        if bias_compensation:
            stats.setdefault("moments", ChannelMoments)
        self.statistics = stats

    def describe(self) -> dict:
        return {**super().describe(), "allocation": self.allocation, "head_unit": self.head_unit,
                "keep_first": self.keep_first, "keep_last": self.keep_last, "meet_ratio": self.meet_ratio,
                "allow_empty": self.allow_empty,
                "bias_compensation": self.bias_compensation}

    def label(self) -> str:
        return f"{self.name} ({self.sparsity:.0%}, {self.allocation}, {self.pipeline})"

    def check(self, model) -> None:
        """The targets exist and the layer schedule can meet the ratio — before any calibration."""
        super().check(model)
        if self.allocation != "adaptive":
            self._layer_ratios(model)

    def targets(self, model) -> list[LinearRef]:
        """The consumer projections; also refuse, before any calibration, a head unit the model cannot use."""
        refs = [r for r in super().targets(model) if r.in_features > 0]  # an emptied layer has nothing left
        if not refs:
            raise PrunekitError("every selected layer is already empty: nothing left to prune")
        if self.prune_heads and self.allocation == "adaptive" and self.head_unit == "query":
            n_q, n_kv = attention_heads(model, 0)
            if n_kv > 1 and n_q != n_kv:
                raise PrunekitError("adaptive allocation under GQA removes whole KV groups: use head_unit='kv_group' "
                                    "(head_unit='query' works with adaptive allocation only for multi-head attention "
                                    "or a single KV head)")
        return refs

    # --------------------------------------------------------------------------- subclass interface
    def dimension_scores(self, ref: LinearRef, stats: dict[str, Statistic], attention: bool) -> torch.Tensor:
        """One score per input dimension of a consumer projection (o_proj or down_proj); higher = keep."""
        raise NotImplementedError

    def head_scores(self, dims: torch.Tensor, heads: int) -> torch.Tensor:
        """Per query head from per-dimension scores (default: sum over head_dim, as FLAP/Wanda-sp do)."""
        return dims.view(heads, -1).sum(1)

    # --------------------------------------------------------------------------- pruning
    def _layer_ratios(self, model) -> list[float]:
        n = len(adapter_for(model).layers(model))
        if self.allocation == "logistic":
            return alloc.logistic(n, self.sparsity, self.logistic_k, self.logistic_x0, self.keep_first, self.keep_last)
        return alloc.uniform(n, self.sparsity, self.keep_first, self.keep_last)

    def _allowed(self, model, layer: int) -> bool:
        n = len(adapter_for(model).layers(model))
        return self.keep_first <= layer < n - self.keep_last

    def decide(self, model, observed, layer: int | None, context) -> UnitCut:
        """The heads and channels to remove (of every layer, or of ``layer`` on the sequential pipeline or in a
        streaming run), and the bias compensation of what they contributed."""
        refs = [r for r in self.targets(model) if layer is None or r.layer == layer]
        summaries = getattr(context, "summaries", None)
        if layer is not None and self.allocation == "adaptive" and summaries is not None:
            drops = self._global_plan(model, summaries)  # every layer ranked together, from the first pass
            return self.unit_cut(model, refs, observed, {layer: drops[layer]} if layer in drops and refs else {})
        return self.unit_cut(model, refs, observed, self.plan(model, refs, observed))

    def layerwise(self, model) -> bool:
        """Uniform and logistic allocation decide each layer alone; adaptive ranks all layers together."""
        return self.allocation != "adaptive"

    def summarize(self, model, observed, layer: int) -> dict[str, torch.Tensor]:
        """Streaming, first pass: layer ``layer``'s dimension scores (what adaptive allocation ranks)."""
        refs = [r for r in self.targets(model) if r.layer == layer]
        return self._scores(refs, observed).get(layer, {})

    def _global_plan(self, model, summaries: dict[int, dict[str, torch.Tensor]]):
        """The adaptive plan of every layer from the summaries, computed once per streaming run (before any
        layer is cut, so later layers see the same ranking)."""
        cached = getattr(self, "_streamed_plan", None)
        if cached is None or cached[0] is not summaries:
            scores = {layer: s for layer, s in summaries.items() if s}
            self._streamed_plan = (summaries, self._adaptive_plan(model, scores))
        return self._streamed_plan[1]

    def _scores(self, refs: list[LinearRef], stats) -> dict[int, dict[str, torch.Tensor]]:
        scores: dict[int, dict[str, torch.Tensor]] = {}
        for layer, group in _by_layer(refs).items():
            for kind, ref in group.items():
                dims = self.dimension_scores(ref, stats.get(ref.name, {}), attention=kind == "o").to(torch.float64)
                scores.setdefault(layer, {})[kind] = dims
        return scores

    def unit_cut(self, model, refs: list[LinearRef], observed, drops: dict[int, tuple[list[int], list[int]]]) -> UnitCut:
        """A ``UnitCut`` from per-layer (heads, channels) to remove, with bias compensation if enabled."""
        by_layer = _by_layer(refs)
        bias: dict[str, torch.Tensor] = {}
        if self.bias_compensation:
            _, _, d = adapter_for(model).attention_shape(model.config)
            for layer, (heads, channels) in sorted(drops.items()):
                bias.update(self.compensation(by_layer.get(layer, {}), observed, heads, channels, d))
        return UnitCut({layer: LayerCut(h, c) for layer, (h, c) in sorted(drops.items())}, bias, self.allow_empty)

    def compensation(self, refs: dict[str, LinearRef], observed, heads: list[int], channels: list[int],
                     head_dim: int) -> dict[str, torch.Tensor]:
        """FLAP's baseline: what the removed inputs contributed on average, per consumer projection."""
        return compensation(refs, observed, heads, channels, head_dim)

    def plan(self, model, refs: list[LinearRef], stats: dict[str, dict[str, Statistic]]) -> dict[int, tuple[list[int], list[int]]]:
        """Per layer, the query heads and MLP channels to remove (nothing is changed yet)."""
        scores = self._scores(refs, stats)
        if self.allocation == "adaptive":
            return self._adaptive_plan(model, scores)
        ratios = self._layer_ratios(model)
        return {layer: self._layer_plan(model, layer, s, ratios[layer]) for layer, s in scores.items()}

    def _head_units(self, model, layer: int, head_scores: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
        """Removable units (lists of query heads) and their scores."""
        n_q, n_kv = attention_heads(model, layer)
        group = n_q // n_kv
        if group == 1 or self.head_unit == "query":
            return [[h] for h in range(n_q)], head_scores
        units = [list(range(g * group, (g + 1) * group)) for g in range(n_kv)]
        return units, head_scores.view(n_kv, group).sum(1)

    @property
    def _floor(self) -> int:
        """Units every layer keeps of each kind."""
        return 0 if self.allow_empty else 1

    def _layer_plan(self, model, layer: int, scores: dict[str, torch.Tensor], ratio: float):
        drop_heads: list[int] = []
        drop_channels: list[int] = []
        if ratio <= 0 or not self._allowed(model, layer):
            return drop_heads, drop_channels
        if "o" in scores:
            n_q, n_kv = attention_heads(model, layer)
            heads = self.head_scores(scores["o"], n_q)
            if self.head_unit == "query" and n_q != n_kv:  # the same count from every group
                group = n_q // n_kv
                per_group = min(int(ratio * group), group - self._floor)
                for g in range(n_kv):
                    local = heads[g * group : (g + 1) * group]
                    drop_heads += [g * group + int(i) for i in torch.sort(local, stable=True)[1][:per_group]]
            else:
                units, unit_scores = self._head_units(model, layer, heads)
                count = min(int(ratio * len(units)), len(units) - self._floor)
                for u in torch.sort(unit_scores, stable=True)[1][:count]:
                    drop_heads += units[int(u)]
        if "mlp" in scores:
            width = scores["mlp"].numel()
            count = int(ratio * width)
            if self.meet_ratio and "o" in scores:
                attn, mlp, removed = self._layer_weights(model, layer, drop_heads)
                count = round((ratio * (attn + mlp) - removed) / (mlp / width))
            count = max(0, min(count, width - self._floor))
            drop_channels = torch.sort(scores["mlp"], stable=True)[1][:count].tolist()
        return sorted(drop_heads), sorted(drop_channels)

    @staticmethod
    def _layer_weights(model, layer: int, drop_heads: list[int]) -> tuple[int, int, int]:
        """(attention weights, MLP weights, attention weights that removing ``drop_heads`` takes) of a layer."""
        adapter = adapter_for(model)
        refs = [r for r in adapter.linears(model) if r.layer == layer]
        attn = sum(r.weight.numel() for r in refs if r.group == "attn")
        mlp = sum(r.weight.numel() for r in refs if r.group == "mlp")
        hidden = next(r for r in refs if r.role == "o").out_features
        _, _, d = adapter.attention_shape(model.config)
        n_q, n_kv = attention_heads(model, layer)
        group = n_q // n_kv
        gone_kv = sum(1 for g in range(n_kv) if set(range(g * group, (g + 1) * group)) <= set(drop_heads))
        return attn, mlp, _attention_weights(hidden, d, len(drop_heads), gone_kv)

    def _adaptive_plan(self, model, scores: dict[int, dict[str, torch.Tensor]]):
        adapter = adapter_for(model)
        n_layers = len(adapter.layers(model))
        hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
        _, _, d = adapter.attention_shape(model.config)
        n_producers = sum(1 for r in adapter.linears(model) if r.layer == 0 and r.role in PRODUCERS)
        head_lists, chan_lists, units_of = [], [], {}
        group = 1
        for layer in range(n_layers):
            s = scores.get(layer, {})
            if "o" in s:
                n_q, n_kv = attention_heads(model, layer)
                group = n_q // n_kv
                units, unit_scores = self._adaptive_units(model, layer, s["o"], n_q)
                units_of[layer] = units
                head_lists.append(unit_scores)
            else:
                head_lists.append(torch.zeros(0, dtype=torch.float64))
            chan_lists.append(alloc.standardize(s["mlp"], self.standardization) if "mlp" in s
                              else torch.zeros(0, dtype=torch.float64))
        unit = group if self.head_unit == "kv_group" else 1
        # a removed query head takes its q rows and o columns, and its share of K/V when groups go whole
        head_cost = _attention_weights(hidden, d, 1, 1 / group if unit == group else 0)
        protect = {i for i in range(n_layers) if not self._allowed(model, i)}
        shared_kv = 0.0  # single query heads of one KV head: K/V stay, but count in the ratio's total
        if unit != group:
            shared_kv = sum(_attention_weights(hidden, d, 0, 1) for h in head_lists if h.numel())
        hm, cm = alloc.adaptive(head_lists, chan_lists, self.sparsity, head_cost, hidden * (n_producers + 1),
                                standardization=None, head_unit=unit, protect=protect, allow_empty=self.allow_empty,
                                fixed=shared_kv)
        plan = {}
        for layer in range(n_layers):
            drop_heads = [h for u, m in zip(units_of.get(layer, []), hm[layer].tolist()) if m for h in u]
            plan[layer] = (sorted(drop_heads), torch.nonzero(cm[layer]).flatten().tolist())
        return plan

    def _adaptive_units(self, model, layer: int, dims: torch.Tensor, n_q: int):
        """FLAP AL-AM: standardise per dimension over the layer, then average over each unit's dimensions."""
        z = alloc.standardize(dims, self.standardization).view(n_q, -1)
        n_kv = attention_heads(model, layer)[1]
        group = n_q // n_kv
        if group == 1 or self.head_unit == "query":  # (query under GQA is refused in ``targets``)
            return [[h] for h in range(n_q)], z.mean(1)
        return [list(range(g * group, (g + 1) * group)) for g in range(n_kv)], z.view(n_kv, -1).mean(1)


def compensation(refs: dict[str, LinearRef], stats, drop_heads: list[int], drop_channels: list[int], head_dim: int,
                 moments: str = "moments") -> dict[str, torch.Tensor]:
    """FLAP's baseline for one layer: per consumer projection, W[:, removed] · E[x_removed] (the removed inputs'
    mean contribution, to add to its bias). ``refs``: {"o": o_proj, "mlp": down_proj}; ``moments`` names the
    ChannelMoments statistic whose mean is used."""
    out = {}
    for kind, drop, unit in (("o", drop_heads, head_dim), ("mlp", drop_channels, 1)):
        if drop and kind in refs:
            ref = refs[kind]
            idx = (torch.as_tensor(drop).unsqueeze(1) * unit + torch.arange(unit)).flatten()
            mean = stats[ref.name][moments].mean
            out[ref.name] = (ref.weight.to(torch.float64)[:, idx] @ mean[idx]).to(ref.module.weight.dtype)
    return out


def _by_layer(refs: list[LinearRef]) -> dict[int, dict[str, LinearRef]]:
    """Consumer projections by layer: ``{"o": o_proj, "mlp": down_proj}`` (those selected)."""
    out: dict[int, dict[str, LinearRef]] = {}
    for ref in refs:
        out.setdefault(ref.layer, {})["o" if ref.role == "o" else "mlp"] = ref
    return out


def _attention_weights(hidden: int, head_dim: int, query_heads: float, kv_heads: float) -> float:
    """Weights that ``query_heads`` query heads (q rows + o columns) and ``kv_heads`` K/V heads (k + v rows) hold."""
    return 2 * hidden * head_dim * (query_heads + kv_heads)
