"""Layer allocation schedules meet the requested overall ratio and keep protected layers dense."""

from __future__ import annotations

import math

import pytest
import torch

from prunekit import allocation
from prunekit.errors import PrunekitError


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_uniform(ratio):
    r = allocation.uniform(30, ratio)
    assert r == [ratio] * 30
    protected = allocation.uniform(30, ratio, keep_first=2, keep_last=2)
    assert protected[:2] == [0, 0] and protected[-2:] == [0, 0]
    assert sum(protected) / 30 == pytest.approx(ratio)
    with pytest.raises(PrunekitError, match="cannot be met"):
        allocation.uniform(4, 0.6, keep_first=2, keep_last=1)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5, 0.7])
def test_logistic_meets_ratio_and_keeps_ends_dense(ratio):
    r = allocation.logistic(30, ratio)
    assert r[:2] == [0.0, 0.0] and r[-2:] == [0.0, 0.0]
    assert sum(r) / 30 == pytest.approx(ratio, abs=1e-8)
    active = r[2:-2]
    assert all(b > a for a, b in zip(active, active[1:]))  # sparsity grows with depth (k > 0)
    assert all(0 <= x <= 1 for x in r)


def test_logistic_matches_the_reference_formula_when_nothing_clips():
    L, m, n, k, x0, ratio = 30, 2, 2, 0.8, 0.3, 0.2
    r = allocation.logistic(L, ratio, k=k, x0=x0, keep_first=m, keep_last=n)
    l_eff = L - m - n
    shape = [1 / (1 + math.exp(-k * ((i - m) / (l_eff - 1) - x0))) for i in range(m, L - n)]
    lam = ratio * L / sum(shape)  # the reference's bisection target: mean over active layers = G * L / L_eff
    assert r[m : L - n] == pytest.approx([lam * s for s in shape], rel=1e-8)


def test_logistic_clips_inside_the_bisection():
    r = allocation.logistic(12, 0.6, k=8.0, max_ratio=0.9)
    assert max(r) == pytest.approx(0.9) and sum(r) / 12 == pytest.approx(0.6, abs=1e-8)
    with pytest.raises(PrunekitError, match="cannot be met"):
        allocation.logistic(10, 0.8, max_ratio=0.9)
    with pytest.raises(PrunekitError, match="protect all"):
        allocation.logistic(4, 0.2, keep_first=2, keep_last=2)


def test_standardize():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    z = allocation.standardize(s, "zscore")
    assert z.mean().item() == pytest.approx(0, abs=1e-12) and z.std().item() == pytest.approx(1)
    rob = allocation.standardize(s, "robust")
    assert rob.max().item() == 3.0 and rob[2].item() == 0.0


@pytest.mark.parametrize("method", ["zscore", "robust"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_adaptive_meets_budget_within_one_unit(method, ratio):
    gen = torch.Generator().manual_seed(0)
    heads = [torch.rand(3, generator=gen) * (i + 1) for i in range(6)]
    chans = [torch.rand(40, generator=gen) * (i + 1) for i in range(6)]
    head_cost, chan_cost = 96.0, 3.0
    hm, cm = allocation.adaptive(heads, chans, ratio, head_cost, chan_cost, method, protect={0})
    total = 6 * (3 * head_cost + 40 * chan_cost)
    removed = sum(m.sum().item() * head_cost for m in hm) + sum(m.sum().item() * chan_cost for m in cm)
    assert ratio * total - head_cost <= removed <= ratio * total + 1e-9
    assert not hm[0].any() and not cm[0].any()  # protected layer
    assert all(m.sum() < m.numel() for m in hm + cm)  # every layer keeps a head and a channel
    # within a layer and module, removal follows the score order
    for scores, masks in ((heads, hm), (chans, cm)):
        for s, m in zip(scores, masks):
            if m.any() and (~m).any():
                assert s[m].max() <= s[~m].min()
