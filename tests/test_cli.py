"""The prunekit command line on tiny models: round trip, configs, overrides, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunekit.cli import main

DATA = ["--data.seq_len", "64", "--data.num_samples", "4", "--data.eval_samples", "3"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CSV logger writes ./logs


def test_help_and_strategies(capsys):
    assert main(["--help"]) == 0
    assert "prune" in capsys.readouterr().out
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("magnitude", "wanda", "sparsegpt"):
        assert name in out
    assert main(["frobnicate"]) == 2


def test_prune_then_eval_round_trip(tiny_llama, tmp_path, capsys):
    before = _digest(tiny_llama)
    out = tmp_path / "run"
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "wanda", *DATA, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wanda (50%, sequential)" in printed and "per-layer sparsity" in printed
    for name in ("model.safetensors", "config.json", "tokenizer.json", "config.yaml", "metrics.json", "prunekit.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pruned"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert metrics["pruned"]["params_nonzero"] < metrics["dense"]["params_nonzero"]
    assert metrics["dense"]["perplexity"] > 1 and metrics["pruned"]["perplexity"] > 1
    assert metrics["dense"]["pruned_fraction"] == 0.0  # a random model has no exact zeros
    assert "Wanda" in (out / "config.yaml").read_text()
    assert _digest(tiny_llama) == before, "the source model changed on disk"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")], "temporary folders left behind"

    evals = tmp_path / "eval"
    assert main(["eval", "--model", str(out), *DATA, "--output_dir", str(evals)]) == 0
    again = json.loads((evals / "metrics.json").read_text())
    assert again["perplexity"] == pytest.approx(metrics["pruned"]["perplexity"], rel=1e-6)
    assert again["sparsity"] == pytest.approx(metrics["pruned"]["sparsity"])
    # pruning a checkpoint that already has zeros: its dense row counts them, as the pruned row does
    capsys.readouterr()
    assert main(["prune", "--model", str(out), "--strategy", "magnitude", "--strategy.sparsity", "0.6", *DATA,
                 "--save_model", "false", "--output_dir", str(tmp_path / "again")]) == 0
    dense_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| dense "))
    assert "50.0%" in dense_row
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["dense"]["pruned_fraction"] == pytest.approx(0.5, abs=1e-3)


def test_yaml_config_with_dotted_overrides(tiny_models, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model:\n  model: {tiny_models['opt']}\n"
        "strategy:\n  class_path: prunekit.strategies.magnitude.Magnitude\n  init_args:\n    sparsity: 0.5\n"
        "eval_dense: false\nsave_model: false\n"
    )
    out = tmp_path / "mag"
    args = ["prune", "--config", str(config), "--strategy.sparsity", "0.7", "--strategy.modules", "[mlp]", *DATA]
    assert main([*args, "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"] == 0.7 and metrics["modules"] == ["mlp"]
    assert metrics["pruned"]["per_role_sparsity"]["fc1"] == pytest.approx(0.7, abs=1e-3)
    assert metrics["pruned"]["per_role_sparsity"]["q"] == 0.0
    assert "perplexity" not in metrics["dense"] and not (out / "model.safetensors").exists()


def test_print_config(tiny_llama, capsys):
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "sparsegpt", "--strategy.pattern", "2:4",
                 "--print_config"]) == 0
    text = capsys.readouterr().out
    assert "prunekit.strategies.sparsegpt.SparseGPT" in text and "2:4" in text and "blocksize: 128" in text


def test_existing_output_needs_overwrite(tiny_llama, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["prune", "--model", str(tiny_llama), "--strategy", "magnitude", *DATA, "--output_dir", str(out)]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main([*args, "--overwrite", "true"]) == 0
    assert (out / "metrics.json").is_file() and not (out / "keep.txt").exists()


def test_output_dir_cannot_be_the_source(tiny_llama, capsys):
    before = _digest(tiny_llama)
    for out in (tiny_llama, tiny_llama.parent, tiny_llama / "inside"):  # the folder, one containing it, one in it
        args = ["prune", "--model", str(tiny_llama), "--strategy", "magnitude", *DATA, "--output_dir", str(out)]
        assert main([*args, "--overwrite", "true"]) == 2
        assert "source model's folder" in capsys.readouterr().err
    assert _digest(tiny_llama) == before and not (tiny_llama / "inside").exists()


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_llama):
    """A model family without an adapter, and a llama whose activations overflow to NaN."""
    import tiny
    from transformers import AutoModelForCausalLM, BloomConfig

    root = tmp_path_factory.mktemp("broken")
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=tiny.VOCAB, hidden_size=32, n_layer=1, n_head=2))
    bloom.save_pretrained(root / "bloom")
    tiny.tokenizer().save_pretrained(root / "bloom")
    nan = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        nan.model.layers[1].input_layernorm.weight.fill_(float("nan"))
    nan.save_pretrained(root / "nan")
    tiny.tokenizer().save_pretrained(root / "nan")
    (root / "empty.txt").write_text("   \n")
    (root / "short.txt").write_text("just a few words")
    return root


BAD = [
    (["--strategy", "nope"], "unknown pruning method --strategy 'nope'; available strategies: dejavu, flap, griffin, magnitude, magnitude-sp, seap, seap-gen, shadowllm, shadowllm-static, sparsegpt, wanda, wanda-sp"),
    (["--strategy", "wanda", "--strategy.sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--strategy", "wanda", "--strategy.sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (["--strategy", "wanda", "--strategy.pattern", "4:4"], "needs 0 < N < M"),
    (["--strategy", "wanda", "--strategy.pattern", "2:3"], "not divisible by M=3"),
    (["--strategy", "sparsegpt", "--strategy.pattern", "2:3"], "blocksize=128 must be a multiple of M=3"),
    (["--strategy", "wanda", "--strategy.pattern", "2:4", "--strategy.sparsity", "0.3"], "contradicts pattern"),
    (["--strategy", "wanda", "--data.seq_len", "512"], "exceeds the model's maximum length 256"),
    (["--strategy", "wanda", "--data.num_samples", "100000"], "windows of 64 tokens, but 100000 are needed"),
    (["--strategy", "wanda", "--data.corpus", "nosuch"], "unknown corpus 'nosuch'"),
    (["--strategy", "wanda", "--strategy.modules", "[lm_head]"], "unknown module kind 'lm_head'"),
    (["--strategy", "wanda", "--strategy.layers", "[7]"], "out of range"),
    (["--strategy", "wanda-sp", "--strategy.modules", "[mlp]"],
     "--strategy.modules: wanda-sp has no option 'modules'; its options: prunekit prune --strategy.help wanda-sp"),
    (["--strategy", "wanda", "--strategy.modules", "mlp"], "--strategy.modules: got 'mlp', which is not a list (write a list as [a,b])"),
    (["--strategy", "magnitude", "--save_statistics", "true"], "observes nothing (a data-free method)"),
    (["--strategy", "wanda", "--force", "true"], "there is no --statistics"),
    (["--strategy", "wanda", "--strategy.mode", "all-at-once", "--statistics", "s.safetensors", "--save_statistics",
      "true"], "would only copy the file it reads"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_fails_cleanly(tiny_llama, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["prune", "--model", str(tiny_llama), *DATA, *extra, "--output_dir", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    "case,message",
    [
        ("bloom", "unsupported architecture 'bloom'; supported model types: gemma3_text, gpt2, gpt_neox, llama"),
        ("nan", "non-finite activations (NaN/inf) at the input of model.layers.1"),
        ("empty", "has no documents in its calibration split"),
        ("short", "but 4 are needed"),
        ("missing", "does not exist"),
    ],
)
def test_bad_model_or_corpus(broken_models, tiny_llama, tmp_path, capsys, case, message):
    model = {"bloom": broken_models / "bloom", "nan": broken_models / "nan"}.get(case, tiny_llama)
    if case == "missing":
        model = tmp_path / "no-such-model"
    extra = []
    if case in ("empty", "short"):
        extra = ["--data.corpus", "text", "--data.paths", f"[{broken_models / (case + '.txt')}]"]
    out = tmp_path / "out"
    args = ["prune", "--model", str(model), "--strategy", "wanda", "--strategy.mode", "all-at-once",
            "--eval_dense", "false", *DATA, *extra, "--output_dir", str(out)]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_wandb_offline_logging(tiny_llama, tmp_path):
    """W&B through Lightning's WandbLogger in offline mode: a run folder with the logged metrics, no network."""
    from tiny import run_with_wandb_offline

    run = run_with_wandb_offline(["prune", "--model", str(tiny_llama), "--strategy", "magnitude", *DATA,
                                  "--save_model", "false", "--output_dir", str(tmp_path / "out")], tmp_path)
    # wandb >= 0.2x keeps offline history only in the binary run file (protobuf records: key, then JSON value)
    record = next(run.glob("*.wandb")).read_bytes()
    ppl = json.loads((tmp_path / "out" / "metrics.json").read_text())["pruned"]["perplexity"]
    assert re.search(rb"perplexity.{1,4}" + re.escape(json.dumps(ppl).encode()), record, re.S)
    assert b"pruned/fraction" in record and b"layers/00/sparsity" in record
    # the per-layer table and the layer-profile image are logged as media files of the run
    media = {p.name.split("_")[0] for p in (run / "files" / "media").rglob("*") if p.is_file()}
    assert any(p.name.startswith("per_layer") for p in (run / "files" / "media" / "table").glob("*.json"))
    assert any(p.name.startswith("layer_profile") for p in (run / "files" / "media" / "images").glob("*.png"))
    assert media and (tmp_path / "out" / "layer_profile.png").is_file()


@pytest.mark.slow
def test_installed_command_shows_labelled_progress_on_stderr(tiny_llama, tmp_path):
    """The console script (the one subprocess run of ``prune``): Lightning's bars say what they measure and go
    to stderr, the results to stdout; a task-prompt corpus is fed one prompt per forward pass."""
    exe = Path(sys.executable).with_name("prunekit")
    r = subprocess.run([str(exe), "prune", "--model", str(tiny_llama), "--strategy", "wanda", *DATA,
                        "--data.corpus", "task", "--data.corpus_options", "{tasks: [copa]}", "--data.packing",
                        "documents", "--data.num_samples", "0", "--output_dir", str(tmp_path / "p")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    err = r.stderr.replace("\r", "\n")
    assert re.search(r"dense perplexity: 100%\|.*\| 3/3", err), err[-3000:]
    assert re.search(r"calibration: layer-0 inputs: 100%\|.*\| 12/12", err)  # one step per COPA prompt
    assert re.search(r"calibration: layers: +\d+%\|.*\| \d/3", err)
    assert re.search(r"pruned perplexity: 100%\|.*\| 3/3", err)
    assert "it/s" not in r.stdout and "calibration: task, 12 documents" in r.stdout
