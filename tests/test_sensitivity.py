"""Layer sensitivity: one layer pruned at a time, nested random units, CLI outputs and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.module import PrunableLM
from prunekit.strategies.seap.sensitivity import layer_models, random_layer_plan


def test_only_the_chosen_layer_changes_and_larger_ratios_remove_supersets(tiny_llama):
    dense = PrunableLM(str(tiny_llama)).model
    small, large = random_layer_plan(dense, 1, 0.25, 0), random_layer_plan(dense, 1, 0.75, 0)
    # 4 query heads in 2 KV groups: whole groups go (0.25 · 2 rounds half up to 1 group, 0.75 · 2 to 2)
    assert small[0] in ([0, 1], [2, 3]) and large[0] == [0, 1, 2, 3]
    assert len(small[1]) == 32 and len(large[1]) == 96  # of 128 channels
    assert set(small[0]) <= set(large[0]) and set(small[1]) <= set(large[1])
    assert random_layer_plan(dense, 1, 0.75, 0) == large and random_layer_plan(dense, 1, 0.75, 1) != large
    seen = []
    for seed in range(4):  # every random choice builds a valid GQA model
        for _, _, model in layer_models(dense, [0.25, 0.5], seed=seed, layers=[0]):
            assert model.model.layers[0].self_attn.o_proj.in_features in (0, 32)
    for layer, ratio, model in layer_models(dense, [0.5, 1.0], seed=0):
        for i, (mine, theirs) in enumerate(zip(model.model.layers, dense.model.layers)):
            assert (mine is theirs) == (i != layer)
        down = model.model.layers[layer].mlp.down_proj
        assert down.in_features == (64 if ratio == 0.5 else 0)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()  # an emptied layer runs
        seen.append((layer, ratio))
    assert seen == [(0, 0.5), (0, 1.0), (1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)]
    with pytest.raises(PrunekitError, match=r"in \(0, 1\]"):
        random_layer_plan(dense, 0, 0.0, 0)
    with pytest.raises(PrunekitError, match="out of range"):
        next(layer_models(dense, [0.5], layers=[7]))


def test_sensitivity_cli_perplexity(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s"
    assert main(["sensitivity", "--model", str(tiny_llama), "--ratios", "[0.5, 1.0]", "--data.seq_len", "32",
                 "--data.eval_samples", "2", "--output_dir", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert len(result["rows"]) == 6 and result["dense"] > 1
    assert all(r["value"] > 1 and r["value"] != result["dense"] for r in result["rows"])
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def test_sensitivity_cli_task_and_bad_input(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "t"
    assert main(["sensitivity", "--model", str(tiny_llama), "--metric", "copa", "--limit", "4", "--layers", "[2]",
                 "--ratios", "[1.0]", "--output_dir", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert [(r["layer"], r["ratio"]) for r in result["rows"]] == [(2, 1.0)] and 0 <= result["dense"] <= 1
    assert main(["sensitivity", "--model", str(tiny_llama), "--metric", "pika", "--output_dir", str(tmp_path / "x")]) == 2
    assert "--metric must be perplexity or one task" in capsys.readouterr().err
    assert main(["sensitivity", "--model", str(tiny_llama), "--ratios", "[0]", "--output_dir", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
