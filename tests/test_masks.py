"""Mask selection helpers: pattern parsing, per-row / global / N:M lowest-score selection."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.masks import check_nm, lowest_global, lowest_n_of_m, lowest_per_row, parse_pattern


# ----------------------------------------------------------------------------- parse_pattern
@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8)), ("1:4", (1, 4)), ("3:16", (3, 16))],
)
def test_parse_pattern_valid(pattern, expected):
    assert parse_pattern(pattern) == expected


@pytest.mark.parametrize("pattern", ["", "2", "2:4:8", "a:b", "2-4", "2:", ":4", "2.0:4", "structured", "Unstructured"])
def test_parse_pattern_invalid_string(pattern):
    with pytest.raises(PrunekitError, match="unstructured"):
        parse_pattern(pattern)


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "8:4", "0:4", "-1:4", "0:0"])
def test_parse_pattern_needs_n_below_m(pattern):
    with pytest.raises(PrunekitError, match="0 < N < M"):
        parse_pattern(pattern)


# ----------------------------------------------------------------------------- check_nm
@pytest.mark.parametrize(("in_features", "nm"), [(10, (2, 4)), (12, (4, 8)), (7, (1, 4)), (6, (2, 4))])
def test_check_nm_rejects_non_divisible(in_features, nm):
    with pytest.raises(PrunekitError, match=f"{in_features} inputs, not divisible by M={nm[1]}") as e:
        check_nm(in_features, nm, "layer.x")
    assert "layer.x" in str(e.value)


@pytest.mark.parametrize(("in_features", "nm"), [(8, (2, 4)), (64, (4, 8)), (4, (1, 4)), (128, (2, 4))])
def test_check_nm_accepts_divisible(in_features, nm):
    check_nm(in_features, nm, "layer.x")  # no error


# ----------------------------------------------------------------------------- lowest_per_row
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.999])
@pytest.mark.parametrize("shape", [(7, 20), (16, 64), (3, 5)])
def test_lowest_per_row_exact_counts_and_choice(shape, sparsity):
    torch.manual_seed(0)
    scores = torch.rand(shape, dtype=torch.float64)
    mask = lowest_per_row(scores, sparsity)
    k = int(shape[1] * sparsity)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert mask.sum(1).tolist() == [k] * shape[0]
    # exactly the k smallest of each row (scores are distinct almost surely)
    for r in range(shape[0]):
        expected = set(scores[r].argsort()[:k].tolist())
        assert set(mask[r].nonzero().flatten().tolist()) == expected
        if 0 < k < shape[1]:
            assert scores[r][mask[r]].max() < scores[r][~mask[r]].min()


def test_lowest_per_row_ties_break_by_column_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 2.0]])
    mask = lowest_per_row(scores, 0.5)  # k = 3: the 0.5, then the first two of the tied 1.0s
    assert mask.tolist() == [[True, True, False, False, True, False]]


# ----------------------------------------------------------------------------- lowest_global
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(7, 20), (16, 64), (1, 3)])
def test_lowest_global_exact_count_single_threshold(shape, sparsity):
    torch.manual_seed(1)
    scores = torch.randn(shape).abs()
    mask = lowest_global(scores, sparsity)
    k = int(scores.numel() * sparsity)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert int(mask.sum()) == k
    assert set(mask.flatten().nonzero().flatten().tolist()) == set(scores.flatten().argsort()[:k].tolist())
    if 0 < k < scores.numel():
        assert scores[mask].max() < scores[~mask].min()


def test_lowest_global_is_not_per_row():
    # row 0 holds all the small scores: a global threshold prunes all of row 0 and nothing of row 1
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    assert lowest_global(scores, 0.5).tolist() == [[True] * 4, [False] * 4]
    assert lowest_per_row(scores, 0.5).tolist() == [[True, True, False, False]] * 2


# ----------------------------------------------------------------------------- lowest_n_of_m
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 8)])
@pytest.mark.parametrize("shape", [(5, 32), (16, 64), (1, 8)])
def test_lowest_n_of_m_keeps_exactly_n_per_group(shape, nm):
    n, m = nm
    torch.manual_seed(2)
    scores = torch.rand(shape, dtype=torch.float64)
    mask = lowest_n_of_m(scores, nm)
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    kept = (~mask).reshape(shape[0], shape[1] // m, m).sum(2)
    assert (kept == n).all(), kept
    # the pruned ones are the M-N lowest of their group
    groups = scores.reshape(shape[0], -1, m)
    gmask = mask.reshape(shape[0], -1, m)
    for r in range(shape[0]):
        for g in range(shape[1] // m):
            expected = set(groups[r, g].argsort()[: m - n].tolist())
            assert set(gmask[r, g].nonzero().flatten().tolist()) == expected


def test_lowest_n_of_m_groups_are_consecutive_inputs():
    # group [0..3] has its two smallest at columns 2,3; group [4..7] at 4,5
    scores = torch.tensor([[9.0, 8.0, 1.0, 2.0, 0.1, 0.2, 7.0, 6.0]])
    assert lowest_n_of_m(scores, (2, 4)).tolist() == [[False, False, True, True, True, True, False, False]]
