"""Calibration statistics: float64 accumulators, their cross-process reduction, and what strategies collect."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tiny
from prunekit.arch import adapter_for, select_linears
from prunekit.errors import PrunekitError
from prunekit.module import PrunableLM
from prunekit.models import load_model
from prunekit.api import plan
from prunekit.observe import ObserverSet, linear_inputs
from prunekit.stats import ChannelMoments, ChannelSumSq, Comm, Hessian, check_finite
from prunekit.strategies.sparsegpt import SparseGPT
from prunekit.strategies.wanda import Wanda
from prunekit.strategy import PruningStrategy

FEATURES = 12


def _chunks(seed: int = 0) -> list[torch.Tensor]:
    """Activations of varied shapes (and one empty chunk), float32 as a model produces them, mean far from 0."""
    torch.manual_seed(seed)
    shapes = [(2, 5, FEATURES), (1, 1, FEATURES), (7, FEATURES), (3, 4, FEATURES), (0, FEATURES), (1, 9, FEATURES)]
    return [torch.randn(s) * torch.linspace(0.1, 5, FEATURES) + 3.0 for s in shapes]


def _rows(chunks) -> torch.Tensor:
    return torch.cat([c.reshape(-1, FEATURES) for c in chunks]).double()


def _accumulate(kind, chunks):
    stat = kind(FEATURES)
    for c in chunks:
        stat.update(c)
    return stat


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)


# ----------------------------------------------------------------------------- accumulators
def test_channel_sumsq_matches_direct_float64():
    chunks = _chunks()
    x = _rows(chunks)
    stat = _accumulate(ChannelSumSq, chunks)
    assert stat.sumsq.dtype == torch.float64
    _close(stat.sumsq, (x**2).sum(0))
    _close(stat.norm(), torch.linalg.vector_norm(x, dim=0))
    assert stat.count.item() == x.shape[0] == 39
    assert set(stat.tensors()) == {"sumsq", "count"}


def test_hessian_matches_direct_float64():
    chunks = _chunks()
    x = _rows(chunks)
    stat = _accumulate(Hessian, chunks)
    assert stat.xtx.dtype == torch.float64
    _close(stat.xtx, x.T @ x)
    _close(stat.mean(), x.T @ x / x.shape[0])
    assert stat.count.item() == x.shape[0]
    torch.testing.assert_close(stat.xtx, stat.xtx.T, rtol=0, atol=0)


def test_channel_moments_match_direct_float64():
    chunks = _chunks()
    x = _rows(chunks)
    stat = _accumulate(ChannelMoments, chunks)
    _close(stat.mean, x.mean(0))
    _close(stat.m2, ((x - x.mean(0)) ** 2).sum(0))
    _close(stat.variance(), x.var(0, unbiased=False))
    _close(stat.variance(unbiased=True), x.var(0, unbiased=True))
    assert stat.count.item() == x.shape[0]


def test_statistics_of_float16_input_accumulate_in_float64():
    x = torch.full((4, FEATURES), 300.0, dtype=torch.float16)  # 300² overflows float16, not float64
    stat = _accumulate(ChannelSumSq, [x])
    _close(stat.sumsq, torch.full((FEATURES,), 4 * 90000.0, dtype=torch.float64))


# ----------------------------------------------------------------------------- cross-process reduction
def _two_ranks(kind):
    chunks = _chunks(seed=3)
    rank0, rank1 = _accumulate(kind, chunks[:3]), _accumulate(kind, chunks[3:])
    single = _accumulate(kind, chunks)
    other = {id(t): rank1.tensors()[name] for name, t in rank0.tensors().items()}

    def reduce_sum(t):  # all-reduce(sum) as seen from rank 0
        return t + other[id(t)]

    def gather(t):  # all-gather in rank order as seen from rank 0: a fresh (world, ...) tensor
        return torch.stack([t.clone(), other[id(t)].clone()])

    rank0.reduce(Comm(reduce_sum, gather))
    return rank0, single


@pytest.mark.parametrize("kind", [ChannelSumSq, Hessian, ChannelMoments])
def test_two_rank_reduce_equals_single_accumulation(kind):
    reduced, single = _two_ranks(kind)
    for name, t in single.tensors().items():
        _close(reduced.tensors()[name], t)


def test_channel_moments_reduce_merges_unequal_ranks_with_chan_formula():
    # rank 1 saw nothing: the merge must keep rank 0's moments untouched
    chunks = _chunks(seed=4)
    rank0, empty = _accumulate(ChannelMoments, chunks), ChannelMoments(FEATURES)
    expected = {k: v.clone() for k, v in rank0.tensors().items()}
    other = {id(t): empty.tensors()[n] for n, t in rank0.tensors().items()}
    rank0.reduce(Comm(lambda t: t, lambda t: torch.stack([t.clone(), other[id(t)].clone()])))
    for name, t in expected.items():
        _close(rank0.tensors()[name], t)


# ----------------------------------------------------------------------------- through a strategy
class _Windows:
    """Stand-in for CalibrationDataModule: serves fixed windows (batch size 1, in order)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.windows), batch_size=1, shuffle=False)


def _run(folder: Path, strategy: PruningStrategy, windows: torch.Tensor, module=None):
    """Calibrate and decide; ``strategy.statistics_`` gets every observed statistic per linear name as
    ``"<stat>.<field>"`` (what ``--save_statistics`` writes, keyed by each linear that reads it)."""
    calibration, module = plan(strategy, module or PrunableLM(str(folder)), _Windows(windows))
    strategy.statistics_ = {name: {f"{k}.{f}": v for k, stat in group.items() for f, v in stat.tensors().items()}
                            for name, group in calibration.observed().items()}
    return module


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, tiny.VOCAB, (3, 32))


def _direct(folder: Path, names: list[str], windows: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Σx², XᵀX, mean and token count of each named module's input, from our own hooks on the dense model."""
    model = load_model(str(folder))
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda mod, args, out, n=n: inputs[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for n in names
    ]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    for h in handles:
        h.remove()
    out = {}
    for n, xs in inputs.items():
        x = torch.cat(xs)
        out[n] = {"sumsq": (x**2).sum(0), "xtx": x.T @ x, "mean": x.mean(0), "m2": ((x - x.mean(0)) ** 2).sum(0),
                  "count": torch.tensor(float(x.shape[0]), dtype=torch.float64)}
    return out


def _names(folder: Path) -> list[str]:
    model = load_model(str(folder))
    return [r.name for r in adapter_for(model).linears(model)]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_wanda_statistics_equal_direct_computation(tiny_models, windows, family):
    strategy = Wanda(mode="all-at-once")
    _run(tiny_models[family], strategy, windows)
    names = _names(tiny_models[family])
    assert set(strategy.statistics_) == set(names)
    direct = _direct(tiny_models[family], names, windows)
    tokens = windows.numel()
    for n in names:
        stats = strategy.statistics_[n]
        assert set(stats) == {"act.sumsq", "act.count"}
        assert stats["act.count"].item() == tokens  # each token once, even when q/k/v share the statistic
        torch.testing.assert_close(stats["act.sumsq"], direct[n]["sumsq"], rtol=1e-10, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sparsegpt_hessian_equals_direct_computation(tiny_models, windows, family):
    strategy = SparseGPT(mode="all-at-once")
    _run(tiny_models[family], strategy, windows)
    names = _names(tiny_models[family])
    direct = _direct(tiny_models[family], names, windows)
    for n in names:
        stats = strategy.statistics_[n]
        assert set(stats) == {"hessian.xtx", "hessian.count"}
        assert stats["hessian.count"].item() == windows.numel()
        torch.testing.assert_close(stats["hessian.xtx"], direct[n]["xtx"], rtol=1e-10, atol=1e-10)


def test_qkv_and_gate_up_share_one_statistic(tiny_llama, windows):
    model = load_model(str(tiny_llama))
    refs = select_linears(model, ["attn", "mlp"])
    observers = ObserverSet(linear_inputs(refs, {"act": ChannelSumSq}))
    observers.build(model, None)
    observers.attach()
    results = observers.results()
    try:
        assert len(observers) == 4 * tiny.LAYERS  # q/k/v, o, gate/up, down per layer
        assert sum(len(m._forward_hooks) for m in model.modules()) == 4 * tiny.LAYERS
        by = {(r.layer, r.role): results[r.name]["act"] for r in refs}
        for i in range(tiny.LAYERS):
            assert by[i, "q"] is by[i, "k"] is by[i, "v"]
            assert by[i, "gate"] is by[i, "up"]
            distinct = [by[i, "q"], by[i, "o"], by[i, "gate"], by[i, "down"]]
            assert len({id(s) for s in distinct}) == 4
            if i:
                assert by[i, "q"] is not by[i - 1, "q"]
        with torch.no_grad():
            model(input_ids=windows[:1], use_cache=False)
        assert by[0, "q"].count.item() == windows.shape[1]
    finally:
        observers.detach()
    assert all(not m._forward_hooks for m in model.modules())

    # what the strategy keeps: q, k and v (and gate, up) report identical statistics
    strategy = Wanda(mode="all-at-once")
    _run(tiny_llama, strategy, windows)
    s = strategy.statistics_
    for i in range(tiny.LAYERS):
        base = f"model.layers.{i}."
        for role in ("k_proj", "v_proj"):
            assert torch.equal(s[base + "self_attn.q_proj"]["act.sumsq"], s[base + f"self_attn.{role}"]["act.sumsq"])
        assert torch.equal(s[base + "mlp.gate_proj"]["act.sumsq"], s[base + "mlp.up_proj"]["act.sumsq"])
        assert not torch.equal(s[base + "self_attn.q_proj"]["act.sumsq"], s[base + "mlp.gate_proj"]["act.sumsq"])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_sequential_statistics_of_an_unpruned_model_equal_dense_pass(tiny_models, windows, family):
    """At sparsity 0 nothing is pruned, so recomputing each layer from the cached layer-0 inputs must reproduce
    the dense model's activations: every layer's statistics equal those of one pass over the dense model."""
    folder = tiny_models[family]
    seq = Wanda(sparsity=0.0, mode="sequential")
    module = _run(folder, seq, windows)
    direct = _direct(folder, _names(folder), windows)
    assert set(seq.statistics_) == set(direct)
    for n, d in direct.items():
        assert seq.statistics_[n]["act.count"].item() == windows.numel()
        torch.testing.assert_close(seq.statistics_[n]["act.sumsq"], d["sumsq"], rtol=1e-9, atol=0,
                                   msg=lambda m, n=n: f"{family} {n}: {m}")
    dense = load_model(str(folder))
    for (name, p), q in zip(module.model.named_parameters(), dense.parameters()):
        assert torch.equal(p, q), name  # sparsity 0 leaves every weight untouched


def test_sequential_gemma3_with_full_attention_layer(tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny.config("gemma3_text")
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]  # as real Gemma 3 mixes them
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tiny.tokenizer().save_pretrained(tmp_path)
    torch.manual_seed(1)
    windows = torch.randint(0, tiny.VOCAB, (2, 64))  # longer than the sliding window (32)
    seq = Wanda(sparsity=0.0, mode="sequential")
    _run(tmp_path, seq, windows)
    direct = _direct(tmp_path, _names(tmp_path), windows)
    for n, d in direct.items():
        torch.testing.assert_close(seq.statistics_[n]["act.sumsq"], d["sumsq"], rtol=1e-9, atol=0,
                                   msg=lambda m, n=n: f"{n}: {m}")


class _MomentsProbe(PruningStrategy):
    """A third-party-style strategy (e.g. FLAP) that asks for Welford moments and prunes nothing."""

    name = "moments-probe"
    statistics = {"mom": ChannelMoments}

    def prune_linear(self, ref, stats):
        return torch.zeros_like(ref.weight, dtype=torch.bool)


def test_channel_moments_through_single_process_strategy(tiny_llama, windows):
    strategy = _MomentsProbe(mode="all-at-once", modules=["down"])
    _run(tiny_llama, strategy, windows)
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(tiny.LAYERS)]
    direct = _direct(tiny_llama, names, windows)
    for n in names:
        assert strategy.statistics_[n]["mom.count"].item() == windows.numel()
        torch.testing.assert_close(strategy.statistics_[n]["mom.mean"], direct[n]["mean"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(strategy.statistics_[n]["mom.m2"], direct[n]["m2"], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- non-finite activations
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_raises(bad):
    x = torch.ones(2, 3, 4)
    check_finite(x, "ok")  # finite: no error
    x[1, 2, 3] = bad
    with pytest.raises(PrunekitError, match=r"non-finite activations .* input of model\.layers\.0\.q"):
        check_finite(x, "model.layers.0.q")


def test_nan_activation_stops_calibration(tiny_llama, windows):
    module = PrunableLM(str(tiny_llama))
    module.model.model.layers[0].mlp.up_proj.weight.data[3, 5] = float("nan")  # NaN reaches down_proj's input
    strategy = Wanda(mode="all-at-once")
    before = {n: p.clone() for n, p in module.model.named_parameters()}
    with pytest.raises(PrunekitError, match=r"non-finite activations.*model\.layers\.0\.mlp\.down_proj"):
        plan(strategy, module, _Windows(windows))
    assert all(torch.equal(p, before[n]) or n.endswith("up_proj.weight") for n, p in module.model.named_parameters())
    assert all(not m._forward_hooks for m in module.model.modules())  # no observer left behind


def test_observers_under_one_key_stay_separate_and_weights_are_read_on_every_pipeline(tiny_llama, windows):
    """Two observers listing the same linear keep their own statistics (one key, two names, no leaking into each
    other's saved state); a weight observer is read after every batch of a forward-only pass; a gradient observer
    on a forward-only pipeline is refused with a clear message."""
    from prunekit.observe import Observer
    from prunekit.stats import Sum

    class Probe(PruningStrategy):
        name = "probe"

        def __init__(self, pipeline: str = "all-at-once", grad: bool = False) -> None:
            super().__init__(modules=["q", "k", "v"], mode="all-at-once")
            self._pipeline, self.grad = pipeline, grad

        @property
        def pipeline(self) -> str:
            return self._pipeline

        def observers(self, model, layer):
            name = "model.layers.0.self_attn.q_proj"
            return [*linear_inputs([r for r in self.targets(model) if r.layer == 0], {"act": ChannelSumSq}),
                    Observer(name, {"w": Sum}, where="weight", grad=self.grad, keys=[name],
                             transform=lambda w, g, b: w.abs().sum(0))]

        def decide(self, model, observed, layer, context):
            self.seen = observed
            from prunekit.plans import WeightMask

            return WeightMask()

    strategy = Probe()
    calibration, module = plan(strategy, PrunableLM(str(tiny_llama)), _Windows(windows))
    group = strategy.seen["model.layers.0.self_attn.q_proj"]
    assert set(group) == {"act", "w"} and set(strategy.seen["model.layers.0.self_attn.k_proj"]) == {"act"}
    w = module.model.model.layers[0].self_attn.q_proj.weight.detach().double()
    assert group["w"].count.item() == windows.shape[0]  # once per batch, no gradient needed
    torch.testing.assert_close(group["w"].total, windows.shape[0] * w.abs().sum(0))
    assert not any(".w." in k for k in calibration.observers[0].observers[0].state())
    with pytest.raises(PrunekitError, match="observes gradients but runs the all-at-once pipeline"):
        plan(Probe(grad=True), PrunableLM(str(tiny_llama)), _Windows(windows))
