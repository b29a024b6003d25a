"""Structured pruning on the real SmolLM2-135M (GQA 9/3): bias compensation helps; cut models reload exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from prunekit.data import CalibrationDataModule
from prunekit.api import default_trainer, prune
from prunekit.evaluate import linear_totals, perplexity
from prunekit.realize.cuts import save_cut
from prunekit.module import PrunableLM
from prunekit.strategies.flap import FLAP
from prunekit.strategies.wanda_sp import WandaSP

pytestmark = pytest.mark.real
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def dm():
    return CalibrationDataModule(MODEL, num_samples=8, seq_len=256, eval_samples=6)


def _prune(strategy, dm):
    module = PrunableLM(MODEL)
    prune(strategy, module, dm)
    return module, perplexity(default_trainer(), module.model, dm)


def linear_counts(model) -> tuple[int, int]:
    return linear_totals(model)["linear"], 0


def test_flap_bias_compensation_lowers_perplexity(dm):
    with_bias, ppl_with = _prune(FLAP(sparsity=0.2), dm)
    without, ppl_without = _prune(FLAP(sparsity=0.2, bias_compensation=False), dm)
    assert with_bias.model.model.layers[5].mlp.down_proj.bias is not None
    assert [l.mlp.down_proj.in_features for l in with_bias.model.model.layers] == \
           [l.mlp.down_proj.in_features for l in without.model.model.layers]  # the same mask
    print(f"\nSmolLM2 flap 20%: perplexity {ppl_with:.2f} with bias compensation, {ppl_without:.2f} without")
    assert ppl_with < ppl_without


CASES = {  # wanda-sp at 50% removes one query head per KV group (the query unit on a real 9/3 model)
    "flap-20": lambda: FLAP(sparsity=0.2),
    "flap-50": lambda: FLAP(sparsity=0.5),
    "wanda-sp-20": lambda: WandaSP(sparsity=0.2),
    "wanda-sp-50": lambda: WandaSP(sparsity=0.5, head_unit="query"),
}


def test_flap_and_wanda_sp_reload_in_a_fresh_process_with_identical_logits(dm, tmp_path):
    """Both ratios, both methods: the ratio is met, the folder reloads bitwise (uniform ones with plain HF too)."""
    from prunekit.surgery import structure

    dense_total = linear_counts(PrunableLM(MODEL).model)[0]
    ids = dm.evaluation_windows()[:1, :64]
    torch.save(ids, tmp_path / "ids.pt")
    expected, plain = {}, []
    for name, make in CASES.items():
        module, ppl = _prune(make(), dm)
        removed = 1 - linear_counts(module.model)[0] / dense_total
        heads = sorted({l["heads"] for l in structure(module.model)})
        print(f"\nSmolLM2 {name}: removed {removed:.3f} of attention+MLP weights, perplexity {ppl:.2f}, heads/layer {heads}")
        requested = float(name.rsplit("-", 1)[1]) / 100
        assert requested - 0.01 < removed <= requested + 0.005
        if name.startswith("wanda-sp"):  # uniform widths: plain transformers loading works too
            assert save_cut(module.model, tmp_path / name, dm.tokenizer)["plain"]
            plain.append(name)
        else:  # adaptive allocation: per-layer widths, and the folder says why plain loading cannot work
            assert "differ in" in save_cut(module.model, tmp_path / name, dm.tokenizer)["note"]
        with torch.no_grad():
            expected[name] = module.model(ids).logits
        del module
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\nfrom prunekit import load_pruned\n"
            "ids = torch.load(sys.argv[1] + '/ids.pt')\nout = {}\nwith torch.no_grad():\n"
            f"    for name in {list(CASES)!r}:\n"
            "        out[name] = load_pruned(sys.argv[1] + '/' + name)(ids).logits\n"
            f"    for name in {plain!r}:\n"
            "        out['plain-' + name] = AutoModelForCausalLM.from_pretrained(sys.argv[1] + '/' + name)(ids).logits\n"
            "torch.save(out, sys.argv[1] + '/out.pt')\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})  # bitwise: same threads
    out = torch.load(tmp_path / "out.pt")
    for name in CASES:
        torch.testing.assert_close(out[name], expected[name], rtol=0, atol=0, msg=name)
    for name in plain:
        torch.testing.assert_close(out["plain-" + name], expected[name], rtol=0, atol=0, msg=name)
