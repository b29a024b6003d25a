"""Structured pruning on the real SmolLM2-135M (GQA 9/3): bias compensation helps; cut models reload exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch

from prunekit.data import CalibrationDataModule
from prunekit.evaluate import linear_counts, perplexity
from prunekit.export import load_pruned, save_pruned
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
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, inference_mode=False, callbacks=[strategy])
    strategy.run(trainer, module, dm)
    return module, perplexity(trainer, module, dm)


def test_flap_bias_compensation_lowers_perplexity(dm):
    with_bias, ppl_with = _prune(FLAP(sparsity=0.2), dm)
    without, ppl_without = _prune(FLAP(sparsity=0.2, bias_compensation=False), dm)
    assert with_bias.model.model.layers[5].mlp.down_proj.bias is not None
    assert [l.mlp.down_proj.in_features for l in with_bias.model.model.layers] == \
           [l.mlp.down_proj.in_features for l in without.model.model.layers]  # the same mask
    print(f"\nSmolLM2 flap 20%: perplexity {ppl_with:.2f} with bias compensation, {ppl_without:.2f} without")
    assert ppl_with < ppl_without


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_cut_smollm2_reloads_with_identical_logits(dm, tmp_path, ratio):
    strategy = FLAP(sparsity=ratio) if ratio == 0.5 else WandaSP(sparsity=ratio, head_unit="query")
    module, ppl = _prune(strategy, dm)
    dense_total = linear_counts(PrunableLM(MODEL).model)[0]
    removed = 1 - linear_counts(module.model)[0] / dense_total
    print(f"\nSmolLM2 {strategy.name} {ratio:.0%}: removed {removed:.3f} of attention+MLP weights, perplexity {ppl:.2f}")
    assert removed > 0.1
    save_pruned(module.model, tmp_path / "m", dm.tokenizer)
    ids = dm.evaluation_windows()[:1, :64]
    with torch.no_grad():
        expected = module.model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch\nfrom prunekit.export import load_pruned\n"
            "m = load_pruned(sys.argv[1] + '/m')\nwith torch.no_grad():\n"
            "    torch.save(m(torch.load(sys.argv[1] + '/ids.pt')).logits, sys.argv[1] + '/out.pt')\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)
