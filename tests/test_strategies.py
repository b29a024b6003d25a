"""Magnitude, Wanda and SparseGPT: masks against independent reference computations, N:M patterns, argument
validation, module/layer selection and GPT-2's transposed Conv1D weights."""

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers.pytorch_utils import Conv1D

import tiny
from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.masks import lowest_global, lowest_n_of_m
from prunekit.models import load_model
from prunekit.api import prune
from prunekit.module import PrunableLM
from prunekit.plans import WeightMask
from prunekit.strategies.magnitude import Magnitude
from prunekit.strategies.magnitude import scores as magnitude_scores
from prunekit.strategies.sparsegpt import SparseGPT, fasterprune
from prunekit.strategies.wanda import Wanda
from prunekit.strategies.wanda import scores as wanda_scores
from prunekit.strategies.wanda import select as wanda_select

STRATEGIES = {"wanda": Wanda, "sparsegpt": SparseGPT, "magnitude": Magnitude}


# ----------------------------------------------------------------------------- helpers
class _Windows:
    """Stand-in for CalibrationDataModule: serves fixed windows (batch size 1, in order)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.windows), batch_size=1, shuffle=False)


def _recording(cls, **kwargs):
    """An instance of ``cls``; ``_run`` stores the masks of its plan in ``strategy.masks`` (name -> (out, in) bool)."""
    return cls(**kwargs)


def _run(folder: Path, strategy, windows: torch.Tensor | None) -> torch.nn.Module:
    """Calibrate, decide and realize through the public API; the plan's masks land in ``strategy.masks``."""
    out = prune(strategy, str(folder), _Windows(windows) if windows is not None else None)
    assert isinstance(out.plan, WeightMask)
    for name, mask in out.plan.masks.items():
        assert mask.dtype == torch.bool
    strategy.masks = {n: m.clone() for n, m in out.plan.masks.items()}
    return out.realized


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, tiny.VOCAB, (3, 32))


def _decoder_linears(model) -> dict[str, torch.nn.Module]:
    """Every projection of every decoder layer, found by type (not through prunekit's adapter)."""
    adapter = adapter_for(model)
    out = {}
    for i, layer in enumerate(adapter.layers(model)):
        for name, mod in layer.named_modules():
            if isinstance(mod, (torch.nn.Linear, Conv1D)):
                out[f"{adapter.layers_path}.{i}.{name}"] = mod
    return out


def _out_in(module: torch.nn.Module) -> torch.Tensor:
    """The raw weight as (out, in): Conv1D stores (in, out)."""
    return module.weight.detach().T if isinstance(module, Conv1D) else module.weight.detach()


def _input_sumsq(model, names, windows) -> dict[str, torch.Tensor]:
    """Σ_tokens x_j² of each named module's input, with our own forward hooks, one window at a time."""
    sums = {n: torch.zeros(model.get_submodule(n).weight.shape[0 if isinstance(model.get_submodule(n), Conv1D) else 1],
                           dtype=torch.float64) for n in names}
    handles = []
    for n in names:
        def hook(mod, args, out, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[n] += (x * x).sum(0)
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    for h in handles:
        h.remove()
    return sums


def _wanda_reference(weight: torch.Tensor, sumsq: torch.Tensor, sparsity=0.5, nm=None) -> torch.Tensor:
    """Sun et al. (2023) Eq. 1-2 in numpy: S_ij = |W_ij|·‖X_j‖₂, the lowest int(in·s) of each row pruned
    (stable sort: ties by column); N:M: the M−N lowest of each group of M consecutive inputs."""
    s = np.abs(weight.double().numpy()) * np.sqrt(sumsq.numpy())[None, :]
    rows, cols = s.shape
    mask = np.zeros_like(s, dtype=bool)
    if nm is None:
        k = int(cols * sparsity)
        order = np.argsort(s, axis=1, kind="stable")[:, :k]
        np.put_along_axis(mask, order, True, axis=1)
    else:
        n, m = nm
        for g in range(0, cols, m):
            order = np.argsort(s[:, g:g + m], axis=1, kind="stable")[:, : m - n]
            np.put_along_axis(mask[:, g:g + m], order, True, axis=1)
    return torch.from_numpy(mask)


def _assert_untouched_except(pruned, dense, linears: set[str]):
    """Every parameter other than the weights of ``linears`` equals the dense model's, bit for bit."""
    pruned_params = dict(pruned.named_parameters())
    for name, p in dense.named_parameters():
        if name.removesuffix(".weight") in linears and name.endswith(".weight"):
            continue
        assert torch.equal(pruned_params[name], p), f"{name} changed"


def _assert_nm(weight_out_in: torch.Tensor, nm, name: str):
    n, m = nm
    rows, cols = weight_out_in.shape
    nonzero = (weight_out_in != 0).reshape(rows, cols // m, m).sum(2)
    assert (nonzero == n).all(), f"{name}: groups with {sorted(set(nonzero.flatten().tolist()))} non-zeros, not {n}"


# ----------------------------------------------------------------------------- Wanda against the paper's formula
@pytest.mark.parametrize("mode", ["all-at-once", "sequential"])
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_wanda_masks_equal_reference(tiny_models, windows, family, mode):
    folder = tiny_models[family]
    strategy = _recording(Wanda, mode=mode)
    pruned = _run(folder, strategy, windows)
    dense = load_model(str(folder))
    linears = _decoder_linears(dense)
    assert set(strategy.masks) == set(linears)
    n_layers = len(adapter_for(dense).layers(dense))
    dense_sumsq = _input_sumsq(dense, list(linears), windows)
    if mode == "all-at-once":
        sumsq = dense_sumsq
    else:
        # layer 0 of a sequential run sees the dense model's inputs; layer i >= 1 is calibrated on the outputs
        # of the already pruned layers 0..i-1: rebuild that model from the final weights of those layers
        sumsq = {n: v for n, v in dense_sumsq.items() if _layer_of(n) == 0}
        final = _decoder_linears(pruned)
        for i in range(1, n_layers):
            source = load_model(str(folder))
            for n, mod in _decoder_linears(source).items():
                if _layer_of(n) < i:
                    mod.weight.data.copy_(final[n].weight.data)
            sumsq.update(_input_sumsq(source, [n for n in linears if _layer_of(n) == i], windows))
    assert set(sumsq) == set(linears)
    for n, mod in linears.items():
        expected = _wanda_reference(_out_in(mod), sumsq[n])
        assert torch.equal(strategy.masks[n], expected), f"{family} {mode} {n}"
        assert int(expected.sum()) == expected.shape[0] * int(expected.shape[1] * 0.5)
        # the model got exactly the dense weights with the mask zeroed, in its own orientation
        raw_pruned, raw_dense = pruned.get_submodule(n).weight, mod.weight
        raw_mask = expected.T if isinstance(mod, Conv1D) else expected
        assert torch.equal(raw_pruned == 0, raw_mask), n
        assert torch.equal(raw_pruned, raw_dense.masked_fill(raw_mask, 0)), n
    if mode == "sequential":  # the reference can tell: dense inputs would have given other masks
        assert any(not torch.equal(strategy.masks[n], _wanda_reference(_out_in(mod), dense_sumsq[n]))
                   for n, mod in linears.items() if _layer_of(n) > 0)
    _assert_untouched_except(pruned, dense, set(linears))


def _layer_of(name: str) -> int:
    """Decoder-layer index of a projection name such as ``model.layers.2.mlp.down_proj`` or ``transformer.h.1.attn``."""
    parts = name.split(".")
    return next(int(p) for p in parts if p.isdigit())


def test_wanda_sequential_only_later_layer_sees_dense_inputs(tiny_llama, windows):
    """With ``layers=[1]`` nothing before layer 1 is pruned, so its masks equal the dense-model reference."""
    strategy = _recording(Wanda, mode="sequential", layers=[1])
    pruned = _run(tiny_llama, strategy, windows)
    dense = load_model(str(tiny_llama))
    linears = _decoder_linears(dense)
    layer1 = [n for n in linears if _layer_of(n) == 1]
    assert sorted(strategy.masks) == sorted(layer1)
    sumsq = _input_sumsq(dense, layer1, windows)
    for n in layer1:
        assert torch.equal(strategy.masks[n], _wanda_reference(_out_in(linears[n]), sumsq[n])), n
    _assert_untouched_except(pruned, dense, set(layer1))


# ----------------------------------------------------------------------------- N:M patterns
# 2:4 in the default sequential mode, 4:8 all at once (every tiny width is a multiple of 8)
NM_CASES = [(family, pattern, mode) for pattern, mode in (("2:4", "sequential"), ("4:8", "all-at-once"))
            for family in tiny.FAMILIES]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize(("family", "pattern", "mode"), NM_CASES)
def test_nm_pattern_holds_in_every_group(tiny_models, windows, family, pattern, mode, method):
    folder = tiny_models[family]
    dense = load_model(str(folder))
    linears = _decoder_linears(dense)
    nm = tuple(int(p) for p in pattern.split(":"))
    strategy = _recording(STRATEGIES[method], pattern=pattern, mode=mode)
    assert strategy.sparsity == 0.5
    pruned = _run(folder, strategy, windows if method != "magnitude" else None)
    assert set(strategy.masks) == set(linears)
    for n, mod in _decoder_linears(pruned).items():
        mask = strategy.masks[n]
        rows, cols = mask.shape
        pruned_per_group = mask.reshape(rows, cols // nm[1], nm[1]).sum(2)
        assert (pruned_per_group == nm[1] - nm[0]).all(), f"{method} {pattern} {n}"
        w = _out_in(mod)  # what the model now holds, read from the raw weight
        _assert_nm(w, nm, f"{method} {pattern} {n}")
        assert torch.equal(w == 0, mask)
        if method != "sparsegpt":  # no weight update: kept weights are the dense ones
            assert torch.equal(w, _out_in(linears[n]).masked_fill(mask, 0))
        if method == "magnitude":
            assert torch.equal(mask, lowest_n_of_m(_out_in(linears[n]).abs(), nm))
    if method == "wanda":
        first = [n for n in linears if _layer_of(n) == 0]  # later layers of a sequential run see pruned inputs
        sumsq = _input_sumsq(dense, list(linears) if mode == "all-at-once" else first, windows)
        for n in sumsq:
            assert torch.equal(strategy.masks[n], _wanda_reference(_out_in(linears[n]), sumsq[n], nm=nm)), n
    _assert_untouched_except(pruned, dense, set(linears))


def test_nm_pattern_needs_divisible_inputs(tiny_llama):
    module = PrunableLM(str(tiny_llama))
    strategy = Magnitude(pattern="3:48")  # 48 divides neither 64 nor 128
    before = {n: p.clone() for n, p in module.model.named_parameters()}
    with pytest.raises(PrunekitError, match="not divisible by M=48"):
        prune(strategy, module)
    assert all(torch.equal(p, before[n]) for n, p in module.model.named_parameters())


# ----------------------------------------------------------------------------- magnitude
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_magnitude_one_threshold_per_matrix_without_data(tiny_models, family, sparsity):
    strategy = _recording(Magnitude, sparsity=sparsity)
    assert strategy.pipeline == "none"
    pruned = _run(tiny_models[family], strategy, None)  # no datamodule at all
    dense = load_model(str(tiny_models[family]))
    linears = _decoder_linears(dense)
    row_counts = set()
    for n, mod in _decoder_linears(pruned).items():
        w_dense = _out_in(linears[n]).abs()
        mask = strategy.masks[n]
        assert int(mask.sum()) == int(w_dense.numel() * sparsity), n
        assert w_dense[~mask].min() >= w_dense[mask].max(), n  # one threshold for the whole matrix
        assert torch.equal(_out_in(mod) == 0, mask)
        row_counts.update(mask.sum(1).tolist())
    assert len(row_counts) > 1  # not a per-row selection
    _assert_untouched_except(pruned, dense, set(linears))


def test_calibrating_strategy_without_data_raises(tiny_llama):
    with pytest.raises(PrunekitError, match="needs calibration data"):
        prune(Wanda(), str(tiny_llama), None)


def test_strategy_decides_without_touching_the_model(tiny_llama, windows):
    """A strategy only returns a plan: the all-at-once pipeline leaves the model dense until the plan is
    realized, and the same strategy object decides the same plan again (it keeps no state between runs)."""
    from prunekit.api import plan

    strategy = Wanda(mode="all-at-once")
    module = PrunableLM(str(tiny_llama))
    before = {n: p.clone() for n, p in module.model.named_parameters()}
    first, _ = plan(strategy, module, _Windows(windows))
    assert all(torch.equal(p, before[n]) for n, p in module.model.named_parameters())
    second, _ = plan(strategy, module, _Windows(windows))
    assert first.plan.masks.keys() == second.plan.masks.keys()
    assert all(torch.equal(first.plan.masks[n], second.plan.masks[n]) for n in first.plan.masks)


# ----------------------------------------------------------------------------- SparseGPT (pure functions)
def _correlated_layer(seed=0, tokens=512, cols=64, rows=32):
    torch.manual_seed(seed)
    mix = torch.randn(cols, cols, dtype=torch.float64) / cols**0.5 + 0.5 * torch.eye(cols, dtype=torch.float64)
    scale = torch.logspace(-1, 1, cols, dtype=torch.float64)[torch.randperm(cols)]  # outlier channels
    x = (torch.randn(tokens, 8, dtype=torch.float64) @ torch.randn(8, cols, dtype=torch.float64)  # shared factors
         + torch.randn(tokens, cols, dtype=torch.float64)) @ mix * scale
    w = torch.randn(rows, cols, dtype=torch.float64)
    return x, w


def _error(x, w, w_new):
    return torch.linalg.matrix_norm(x @ w_new.T - x @ w.T).item()


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    x, w = _correlated_layer()
    h = x.T @ x
    w_sgpt, mask = fasterprune(w, h, 0.5, pattern)
    assert torch.equal(w_sgpt == 0, mask)
    wanda = wanda_select(wanda_scores(w, x.square().sum(0).sqrt()), 0.5, pattern)
    if pattern is None:
        mag = lowest_global(magnitude_scores(w), 0.5)
    else:
        mag = lowest_n_of_m(magnitude_scores(w), pattern)
        _assert_nm(w_sgpt, pattern, "sparsegpt")
    for m in (mag, wanda):
        assert int(m.sum()) == int(mask.sum()) == w.numel() // 2
    e_sgpt = _error(x, w, w_sgpt)
    e_mag, e_wanda = _error(x, w, w.masked_fill(mag, 0)), _error(x, w, w.masked_fill(wanda, 0))
    assert e_sgpt < e_wanda < e_mag
    assert e_sgpt < 0.9 * e_wanda  # the OBS update is a real gain, not a rounding difference
    # the same selection without the weight update is worse: the reconstruction is what helps
    assert e_sgpt < _error(x, w, w.masked_fill(mask, 0))


@pytest.mark.parametrize(("sparsity", "blocksize"), [(0.5, 128), (0.5, 16), (0.3, 24), (0.75, 7), (0.0, 16)])
def test_sparsegpt_prunes_exact_count_per_block(sparsity, blocksize):
    x, w = _correlated_layer(seed=1)
    w_new, mask = fasterprune(w, x.T @ x, sparsity, None, blocksize=blocksize)
    rows, cols = w.shape
    for start in range(0, cols, blocksize):
        width = min(blocksize, cols - start)
        assert int(mask[:, start:start + width].sum()) == int(rows * width * sparsity), (start, width)
    assert torch.equal(w_new == 0, mask)
    if sparsity == 0.0:
        assert torch.equal(w_new, w)  # nothing pruned, no error to propagate
    else:
        assert not torch.equal(w_new[~mask], w[~mask])  # the kept weights were updated


def test_sparsegpt_dead_inputs_get_zero_weight():
    x, w = _correlated_layer(seed=3)
    x[:, [5, 17]] = 0  # two input channels never active
    w_new, mask = fasterprune(w, x.T @ x, 0.5, None)
    assert (w_new[:, [5, 17]] == 0).all()
    assert torch.isfinite(w_new).all()


def test_sparsegpt_nm_with_blocksize_not_multiple_of_m():
    """N:M groups are aligned within blocks (as in the reference): a block size that splits groups is refused."""
    x, w = _correlated_layer(seed=4)
    with pytest.raises(PrunekitError, match="multiple of M=4"):
        SparseGPT(pattern="2:4", blocksize=6)
    with pytest.raises(PrunekitError, match="multiple of M=4"):
        fasterprune(w, x.T @ x, 0.5, (2, 4), blocksize=6)
    w_new, _ = fasterprune(w, x.T @ x, 0.5, (2, 4), blocksize=8)
    _assert_nm(w_new, (2, 4), "blocksize 8")


# ----------------------------------------------------------------------------- SparseGPT on a tiny model
def _logits(model, windows):
    with torch.no_grad():
        return torch.cat([model(input_ids=w[None], use_cache=False).logits for w in windows]).double()


def test_sparsegpt_model_output_closer_to_dense_than_magnitude(tiny_llama, windows):
    """On its calibration windows (what its layer-wise reconstruction minimises), SparseGPT's pruned model
    stays closer to the dense logits than magnitude pruning at the same sparsity, unstructured and 2:4."""
    dense = load_model(str(tiny_llama))
    ref = _logits(dense, windows)

    def rel(model):
        return (torch.linalg.vector_norm(_logits(model, windows) - ref) / torch.linalg.vector_norm(ref)).item()

    for kwargs in ({"sparsity": 0.5}, {"pattern": "2:4"}):
        sgpt = _run(tiny_llama, SparseGPT(mode="all-at-once" if "pattern" in kwargs else "sequential", **kwargs),
                    windows)
        mag = _run(tiny_llama, Magnitude(**kwargs), None)
        for model in (sgpt, mag):
            linears = _decoder_linears(model).values()
            assert sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears) >= 0.5
        e_sgpt, e_mag = rel(sgpt), rel(mag)
        assert e_sgpt < 0.85 * e_mag, (kwargs, e_sgpt, e_mag)  # measured: 0.25 vs 0.34, 0.30 vs 0.52


# ----------------------------------------------------------------------------- arguments and selection
@pytest.mark.parametrize("cls", [Wanda, SparseGPT, Magnitude])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": 1.5}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": float("nan")}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": 0.7, "pattern": "2:4"}, "contradicts pattern '2:4'"),
        ({"sparsity": 0.5, "pattern": "1:4"}, "contradicts pattern '1:4'"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "half"}, "N:M"),
        ({"mode": "layerwise"}, "mode must be"),
    ],
)
def test_argument_validation(cls, kwargs, match):
    with pytest.raises(PrunekitError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(("kwargs", "sparsity"), [({}, 0.5), ({"pattern": "2:4"}, 0.5), ({"pattern": "1:4"}, 0.75),
                                                  ({"pattern": "2:4", "sparsity": 0.5}, 0.5), ({"sparsity": 0.0}, 0.0)])
def test_sparsity_implied_by_pattern(kwargs, sparsity):
    assert Wanda(**kwargs).sparsity == sparsity


def test_sparsegpt_own_arguments():
    with pytest.raises(PrunekitError, match="blocksize"):
        SparseGPT(blocksize=0)
    with pytest.raises(PrunekitError, match="percdamp"):
        SparseGPT(percdamp=-0.01)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_modules_mlp_prunes_only_mlp(tiny_models, family):
    strategy = _recording(Magnitude, modules=["mlp"])
    pruned = _run(tiny_models[family], strategy, None)
    dense = load_model(str(tiny_models[family]))
    refs = adapter_for(dense).linears(dense)
    mlp = {r.name for r in refs if r.group == "mlp"}
    assert set(strategy.masks) == mlp and len(mlp) == tiny.LAYERS * (3 if family in ("llama", "gemma3_text") else 2)
    for name in mlp:
        w = pruned.get_submodule(name).weight
        assert int((w == 0).sum()) == w.numel() // 2, name
    _assert_untouched_except(pruned, dense, mlp)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_layers_selects_only_those_layers(tiny_models, family):
    strategy = _recording(Magnitude, layers=[0])
    pruned = _run(tiny_models[family], strategy, None)
    dense = load_model(str(tiny_models[family]))
    layer0 = {n for n in _decoder_linears(dense) if _layer_of(n) == 0}
    assert set(strategy.masks) == layer0
    for name in layer0:
        w = pruned.get_submodule(name).weight
        assert int((w == 0).sum()) == w.numel() // 2, name
    _assert_untouched_except(pruned, dense, layer0)


def test_wanda_modules_and_layers_combined(tiny_llama, windows):
    strategy = _recording(Wanda, mode="all-at-once", modules=["o", "down"], layers=[-1])
    pruned = _run(tiny_llama, strategy, windows)
    dense = load_model(str(tiny_llama))
    last = tiny.LAYERS - 1
    expected = {f"model.layers.{last}.self_attn.o_proj", f"model.layers.{last}.mlp.down_proj"}
    assert set(strategy.masks) == expected
    _assert_untouched_except(pruned, dense, expected)


# ----------------------------------------------------------------------------- GPT-2's Conv1D orientation
def test_gpt2_conv1d_masks_applied_transposed(tiny_models):
    strategy = _recording(Magnitude, pattern="2:4")
    pruned = _run(tiny_models["gpt2"], strategy, None)
    dense = load_model(str(tiny_models["gpt2"]))
    fc2 = pruned.get_submodule("transformer.h.0.mlp.c_proj")
    assert isinstance(fc2, Conv1D) and tuple(fc2.weight.shape) == (tiny.FFN, tiny.HIDDEN)  # (in, out)
    for name, mask in strategy.masks.items():
        raw = pruned.get_submodule(name).weight
        raw_dense = dense.get_submodule(name).weight
        assert tuple(mask.shape) == tuple(raw.shape[::-1])  # the mask is (out, in)
        assert torch.equal(raw == 0, mask.T), name
        # the groups of 4 run along the inputs, i.e. down each column of the stored (in, out) weight
        zeros = (raw == 0).T.reshape(raw.shape[1], raw.shape[0] // 4, 4).sum(2)
        assert (zeros == 2).all(), name
        # and the pruned ones are the smallest |w| of each group of four inputs of one output
        assert torch.equal(mask, lowest_n_of_m(raw_dense.detach().abs().T, (2, 4)))
