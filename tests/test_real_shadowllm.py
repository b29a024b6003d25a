"""ShadowLLM on the real SmolLM2-135M (GQA 9/3, 30 layers): a criterion's static cut beats random units of the same
counts on held-out text; the dynamic model's shapes fit the real layers, its teacher-forced prefix scoring equals
prefill + cached decoding, and at sparsity 0 it is the dense model."""

from __future__ import annotations

import copy

import pytest
import torch

from prunekit.api import plan
from prunekit.data import CalibrationDataModule
from prunekit.models import load_model
from prunekit.plans import LayerCut, RuntimePolicy, UnitCut
from prunekit.realize import realizer_for
from prunekit.strategies.griffin import protocol
from prunekit.strategies.shadowllm.static import ShadowStatic
from prunekit.strategies.shadowllm.strategy import ShadowLLM

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def data():
    return CalibrationDataModule("smollm2-135m", corpus="task", corpus_options={"tasks": ["piqa", "arc_easy"]},
                                 packing="documents", sampling="random", num_samples=4, seq_len=256,
                                 eval_samples=2)


@pytest.fixture(scope="module")
def windows():
    return CalibrationDataModule("smollm2-135m", seq_len=192, eval_samples=2).evaluation_windows()


def _cut(model, cut: UnitCut):
    return realizer_for(cut).apply(copy.deepcopy(model), cut)


@torch.no_grad()
def _ppl(model, windows) -> float:
    return protocol.split_perplexity(model, windows, 1)  # every token but the first, no runtime


def test_static_plainact_beats_random_units_of_the_same_counts(smollm, data, windows):
    calibration, _ = plan(ShadowStatic(criterion="plainact", sparsity=0.2, scope="local"), smollm, data)
    cut = calibration.plan
    generator = torch.Generator().manual_seed(0)
    random_cuts = {}
    for i, c in cut.cuts.items():
        groups = torch.randperm(3, generator=generator)[: len(c.heads) // 3].tolist()
        random_cuts[i] = LayerCut(sorted(h for g in groups for h in range(3 * g, 3 * g + 3)),
                                  sorted(torch.randperm(1536, generator=generator)[: len(c.channels)].tolist()))
    assert all(len(c.channels) == int(0.2 * 1536) for c in cut.cuts.values())
    ours, chance = _ppl(_cut(smollm, cut), windows), _ppl(_cut(smollm, UnitCut(random_cuts)), windows)
    assert ours < chance, (ours, chance)


@torch.no_grad()
def test_dynamic_model_on_the_real_layers(smollm, data, windows):
    calibration, _ = plan(ShadowLLM(sparsity=0.5, hidden=32, epochs=3), smollm, data)
    runtime = calibration.plan.runtime
    assert [b for b in runtime.blocks[:2]] == [("1.heads", 9), ("1.neurons", 1536)] and len(runtime.blocks) == 58
    model = copy.deepcopy(smollm)
    realizer_for(RuntimePolicy(runtime)).apply(model, RuntimePolicy(runtime))
    runtime.configure(prompt="dense")
    prefix = protocol.split_nll(model, windows[:1], 96, how="prefix")
    decode = protocol.split_nll(model, windows[:1], 96, how="decode")
    assert prefix[1] == decode[1] == 96 and prefix[0] == pytest.approx(decode[0], rel=1e-5)
    dense = protocol.split_nll(smollm, windows[:1], 96, how="prefix")
    assert prefix[0] > dense[0]  # half the heads and neurons of layers 1-29 are gone for those tokens
    runtime.configure(sparsity=0.0, prompt="sparse")
    ids = windows[:1, :64]
    torch.testing.assert_close(model(ids).logits, smollm(ids).logits, rtol=0, atol=0)
