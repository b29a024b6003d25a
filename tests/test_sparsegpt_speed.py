"""SparseGPT's fast path (``fasterprune_group``, the default) against the reference's loop (``fasterprune_reference``):
the same masks, bitwise, and the same weights to float64 rounding (relative 1e-12 here; measured ~1e-15), on
matrices with dead inputs, odd widths and several matrices sharing one Hessian, on every tiny family through the
strategy's ``decide`` and (``real``) on SmolLM2 layers. Also: the linear-time lowest-k selection against the
stable sort, and the Hessian's upper-triangle accumulation against the full ``addmm``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tiny
from prunekit.api import plan
from prunekit.masks import lowest_global
from prunekit.stats import Hessian
from prunekit.strategies import sparsegpt
from prunekit.strategies.sparsegpt import SparseGPT, fasterprune, fasterprune_group, fasterprune_reference, lowest_count

PATTERNS = {"unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}


def _same(reference: list[tuple[torch.Tensor, torch.Tensor]], fast: list[tuple[torch.Tensor, torch.Tensor]],
          rtol: float = 1e-12) -> None:
    """Masks bitwise equal; float64 weights equal to ``rtol`` of the matrix's largest weight."""
    assert len(reference) == len(fast)
    for (w_ref, m_ref), (w_fast, m_fast) in zip(reference, fast):
        assert m_fast.dtype == torch.bool and m_fast.shape == m_ref.shape
        assert torch.equal(m_fast, m_ref), int((m_fast != m_ref).sum())
        assert w_fast.dtype == w_ref.dtype and w_fast.shape == w_ref.shape
        torch.testing.assert_close(w_fast, w_ref, rtol=0, atol=rtol * float(w_ref.abs().max()))
        assert torch.equal(w_fast == 0, m_fast | (w_ref == 0))


def _layer(rows: list[int], cols: int, seed: int, dead: list[int] = ()) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Weights of several linears reading one input, and H = X Xᵀ of correlated inputs (some never active)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    x = x * torch.rand(cols, generator=g).add(0.2)  # uneven channel scales
    x[:, list(dead)] = 0
    x = x.double()
    return [torch.randn(r, cols, generator=g) for r in rows], x.T @ x


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize(("cols", "blocksize", "dead"),
                         [(200, 128, []), (96, 32, [4, 5, 6, 40]), (136, 24, [0, 1, 2, 3])])
def test_fast_equals_reference_on_stacked_matrices(pattern, cols, blocksize, dead):
    """Three matrices sharing one Hessian (as q/k/v do), widths that are not a multiple of the block (200 = 128 +
    72, 136 = 5·24 + 16), dead inputs — a whole 2:4 group of them and three of one (ties among zero scores)."""
    nm = PATTERNS[pattern]
    weights, h = _layer([48, 16, 16], cols, seed=cols, dead=dead)
    ref = [fasterprune_reference(w, h, 0.5, nm, blocksize) for w in weights]
    _same(ref, fasterprune_group(weights, h, 0.5, nm, blocksize))
    _same(ref[:1], [fasterprune(weights[0], h, 0.5, nm, blocksize)])
    for w, _ in ref:
        assert (w[:, dead] == 0).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75])
def test_fast_equals_reference_at_other_sparsities(sparsity):
    weights, h = _layer([40, 24], 150, seed=7, dead=[3])
    _same([fasterprune_reference(w, h, sparsity, None, 64) for w in weights],
          fasterprune_group(weights, h, sparsity, None, 64))


def test_fast_stacks_within_a_memory_bound(monkeypatch):
    """Past ``STACK_BYTES`` the matrices get their own column loops (same H⁻¹): the same results, since rows never
    mix."""
    weights, h = _layer([32, 8, 8], 64, seed=3)
    together = fasterprune_group(weights, h, 0.5, (2, 4), 32)
    monkeypatch.setattr(sparsegpt, "STACK_BYTES", 36 * 64 * 8)  # q alone, k and v together
    assert sparsegpt._stacks([32, 8, 8], 64) == [[0], [1, 2]]
    apart = fasterprune_group(weights, h, 0.5, (2, 4), 32)
    for (w1, m1), (w2, m2) in zip(together, apart):
        assert torch.equal(m1, m2)
        torch.testing.assert_close(w1, w2, rtol=0, atol=1e-12 * float(w1.abs().max()))


def test_fast_returns_the_requested_dtype_and_refuses_other_widths():
    weights, h = _layer([8], 32, seed=1)
    (w, mask), = fasterprune_group(weights, h, 0.5, dtype=torch.float32)
    assert w.dtype == torch.float32 and w.is_contiguous() and mask.is_contiguous()
    with pytest.raises(Exception, match="does not read the 32 inputs"):
        fasterprune_group([torch.zeros(4, 16)], h, 0.5)


@pytest.mark.parametrize("k", [0, 1, 7, 500, 999, 1000])
def test_lowest_count_is_the_stable_sort(k):
    """Heavy ties (few distinct values, ±0): the k lowest, ties to the lower row-major index, as ``lowest_global``."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 6, (25, 40), generator=g).double()
    scores[scores == 0] = -0.0
    scores[3, 5] = 0.0
    assert torch.equal(lowest_count(scores, k), lowest_global(scores, k / scores.numel() + 1e-9))
    assert int(lowest_count(scores, k).sum()) == k


@pytest.mark.parametrize("features", [64, 1100, 1536])
def test_hessian_upper_triangle_accumulation_equals_full_product(features):
    """From 2·PANEL features on, only the upper triangle is accumulated and mirrored on read: the matrix of the full
    ``addmm`` (bitwise with this build's MKL; to 1e-15 relative allowed for other BLAS orderings), through updates,
    ``absorb`` and a load into ``tensors()``."""
    g = torch.Generator().manual_seed(features)
    h, full = Hessian(features), torch.zeros(features, features, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(2, 64, features, generator=g) * torch.rand(features, generator=g)
        h.update(x)
        r = x.reshape(-1, features).double()
        full.addmm_(r.T, r)
    torch.testing.assert_close(h.xtx, full, rtol=1e-15, atol=0)
    assert torch.equal(h.xtx, h.xtx.T)
    other = Hessian(features)
    other.absorb(h)
    x = torch.randn(100, features, generator=g)
    other.update(x)
    full.addmm_(x.double().T, x.double())
    torch.testing.assert_close(other.tensors()["xtx"], full, rtol=1e-15, atol=0)
    assert int(other.count) == 3 * 128 + 100


# ----------------------------------------------------------------------------- through the strategy
class _Windows:
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.windows), batch_size=1, shuffle=False)


@pytest.fixture(scope="module")
def dense_observations(tiny_models):
    """Per family: the dense model and its all-at-once Hessians (3 windows of 48 tokens)."""
    torch.manual_seed(0)
    windows = _Windows(torch.randint(0, tiny.VOCAB, (3, 48)))
    out = {}
    for family in tiny.FAMILIES:
        calibration, module = plan(SparseGPT(mode="all-at-once"), str(tiny_models[family]), windows)
        out[family] = (module.model, calibration.observed())
    return out


def _compare_plans(model, observed, layer, **kwargs) -> int:
    ref = SparseGPT(fast=False, mode="all-at-once", **kwargs).decide(model, observed, layer, None)
    fast = SparseGPT(mode="all-at-once", **kwargs).decide(model, observed, layer, None)
    assert list(fast.masks) == list(ref.masks) and list(fast.weights) == list(ref.weights)
    for name, mask in ref.masks.items():
        assert torch.equal(fast.masks[name], mask), (name, int((fast.masks[name] != mask).sum()))
        w_ref, w_fast = ref.weights[name], fast.weights[name]
        assert w_fast.dtype == w_ref.dtype
        # float32 weights: the float64 results round to the same float32 but at the odd rounding boundary
        torch.testing.assert_close(w_fast, w_ref, rtol=2**-23, atol=1e-12)
    return len(ref.masks)


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.5}, {"pattern": "2:4"}, {"pattern": "4:8"},
                                    {"sparsity": 0.5, "blocksize": 24}, {"pattern": "2:4", "blocksize": 8}],
                         ids=["unstructured", "2:4", "4:8", "unstructured-bs24", "2:4-bs8"])
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_strategy_fast_equals_reference_on_tiny_families(dense_observations, family, kwargs):
    """q/k/v (or a fused qkv), gate/up and fc1 share their Hessian; every linear of every layer compared."""
    model, observed = dense_observations[family]
    assert _compare_plans(model, observed, None, **kwargs) == len(SparseGPT().targets(model))


def test_strategy_groups_only_linears_that_share_a_hessian(dense_observations):
    model, observed = dense_observations["llama"]
    groups = {}
    for ref in SparseGPT().targets(model):
        groups.setdefault(id(observed[ref.name]["hessian"]), []).append(ref.role)
    assert sorted(map(tuple, groups.values()))[:4] == [("down",), ("down",), ("down",), ("gate", "up")]
    assert ("q", "k", "v") in map(tuple, groups.values()) and SparseGPT().layerwise(model)
    # one layer at a time (the sequential and streaming pipelines): the same linears as the whole-model decision
    assert _compare_plans(model, observed, 1, pattern="2:4") == 7


@pytest.mark.real
def test_fast_equals_reference_on_smollm2_layers():
    """Real SmolLM2-135M Hessians (dense model; 3 windows of 256 tokens of the first wiki calibration article): all
    seven linears of layers 0 and 29 at 50% unstructured, of layer 29 at 2:4 and 4:8."""
    from prunekit.data import wiki
    from prunekit.models import load_tokenizer

    ids = torch.tensor(load_tokenizer("smollm2-135m")(wiki("calibration")[0])["input_ids"][: 3 * 256])
    assert ids.numel() == 3 * 256
    strategy = SparseGPT(mode="all-at-once", layers=[0, 29])
    calibration, module = plan(strategy, "smollm2-135m", _Windows(ids.view(3, 256)))
    observed = calibration.observed()
    for layer, kwargs in ((0, {"sparsity": 0.5}), (29, {"sparsity": 0.5}), (29, {"pattern": "2:4"}),
                          (29, {"pattern": "4:8"})):
        assert _compare_plans(module.model, observed, layer, layers=[0, 29], **kwargs) == 7
