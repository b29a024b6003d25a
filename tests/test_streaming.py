"""Streaming (one decoder layer at a time, read from and written to safetensors shards) against the in-memory path.

Every unstructured and structured method gives the same weights and masks, bitwise, on every family; activations
offloaded to disk change nothing; bad input (a budget below one layer, a missing shard, a method that cannot
stream) fails before any work with a message that says what to do.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from prunekit.cli import main
from prunekit.realize import load_pruned

COMMON = ["--data.seq_len", "32", "--data.num_samples", "5", "--data.batch_size", "2", "--data.eval_samples", "1",
          "--eval_dense", "false", "--trainer.logger", "false"]

METHODS = {
    "magnitude": ["--strategy", "magnitude"],
    "wanda": ["--strategy", "wanda"],
    "wanda-all-at-once": ["--strategy", "wanda", "--strategy.mode", "all-at-once"],
    "sparsegpt": ["--strategy", "sparsegpt"],
    "sparsegpt-2of4": ["--strategy", "sparsegpt", "--strategy.pattern", "2:4"],
    "magnitude-sp": ["--strategy", "magnitude-sp", "--strategy.sparsity", "0.3"],
    "wanda-sp": ["--strategy", "wanda-sp", "--strategy.sparsity", "0.3"],
    "flap": ["--strategy", "flap", "--strategy.sparsity", "0.3"],  # adaptive: ranks every layer (two passes)
    "flap-logistic": ["--strategy", "flap", "--strategy.allocation", "logistic", "--strategy.sparsity", "0.3",
                      "--strategy.keep_first", "0", "--strategy.keep_last", "0"],
}
# every method on every family; the pipeline and pattern variants (all-at-once Wanda, logistic FLAP, 2:4) on Llama
VARIANTS = {"wanda-all-at-once", "flap-logistic", "sparsegpt-2of4"}
CASES = [(f, m) for f in ("llama", "gemma3_text", "opt", "gpt2", "gpt_neox") for m in METHODS
         if f == "llama" or m not in VARIANTS]


def _prune(model: Path, out: Path, method: list[str], *extra: str) -> dict:
    assert main(["prune", "--model", str(model), *method, *COMMON, "--output_dir", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def _refused(model: Path, out: Path, capsys, *args: str, command: str = "prune") -> str:
    """Run a command that must fail: non-zero exit, no output folder; its stderr."""
    code = main([command, "--model", str(model), *args, *COMMON, "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code != 0, err
    assert not out.exists()
    return err


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = load_pruned(str(a)).state_dict(), load_pruned(str(b)).state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_streaming_equals_in_memory(tiny_models, tmp_path, monkeypatch, family, method):
    monkeypatch.chdir(tmp_path)
    memory = _prune(tiny_models[family], tmp_path / "memory", METHODS[method])
    streamed = _prune(tiny_models[family], tmp_path / "streamed", METHODS[method], "--calibration.streaming", "true")
    _same_weights(tmp_path / "memory", tmp_path / "streamed")
    assert streamed["streaming"] is True and streamed["plan"] == memory["plan"]
    for key in ("pruned_fraction", "params_total", "params_nonzero", "per_layer_sparsity"):
        assert streamed["pruned"][key] == memory["pruned"][key], key
    if memory["plan"] == "unit_cut":
        assert streamed["pruned"]["structure"] == memory["pruned"]["structure"]
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) == len(memory["dense_structure"]) + 1
    # the saved config reloads the same way (plainly loadable exactly when the in-memory folder is)
    saved = [json.loads((tmp_path / d / "prunekit.json").read_text())["loading"] for d in ("memory", "streamed")]
    assert saved[0]["plain"] == saved[1]["plain"]


def test_offloaded_activations_change_nothing(tiny_llama, tmp_path, monkeypatch):
    """A budget just above the minimum puts the activations on disk; the weights stay bitwise the same, and the
    offload folder is gone afterwards."""
    monkeypatch.chdir(tmp_path)
    offload = tmp_path / "offload"
    _prune(tiny_llama, tmp_path / "memory", METHODS["sparsegpt"], "--calibration.streaming", "true")
    m = _prune(tiny_llama, tmp_path / "disk", METHODS["sparsegpt"], "--calibration.streaming", "true",
               "--calibration.memory", "300KB", "--calibration.offload_dir", str(offload))
    assert m["pruned"]["activations_offloaded"] is True
    _same_weights(tmp_path / "memory", tmp_path / "disk")
    assert list(offload.iterdir()) == []


def test_budget_below_one_layer_names_the_minimum(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    err = _refused(tiny_llama, out, capsys, "--strategy", "wanda", "--calibration.streaming", "true",
                   "--calibration.memory", "10KB")
    assert "below the minimum" in err and "bytes" in err and "largest layer" in err
    err = _refused(tiny_llama, out, capsys, "--strategy", "wanda", "--calibration.memory", "1GB")
    assert "--calibration.streaming true" in err
    err = _refused(tiny_llama, out, capsys, "--strategy", "wanda", "--calibration.streaming", "true",
                   "--calibration.memory", "lots")
    assert "is not a size" in err
    code = main(["eval", "--model", str(tiny_llama), "--model.streaming", "true", "--data.seq_len", "32"])
    assert code != 0 and "eval loads the whole model" in capsys.readouterr().err


def test_missing_shard_is_named(tiny_llama, tmp_path, monkeypatch, capsys):
    """A sharded source whose index names a shard that is not there fails before any work."""
    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "sharded"
    shutil.copytree(tiny_llama, src)
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    keys = sorted(state)
    half = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in half.items():
        save_file({k: state[k] for k in part}, str(src / name))
    index = {"metadata": {}, "weight_map": {k: n for n, part in half.items() for k in part}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    # complete, it streams
    _prune(src, tmp_path / "ok", METHODS["magnitude"], "--calibration.streaming", "true")
    (src / "model-00002-of-00002.safetensors").unlink()
    err = _refused(src, tmp_path / "out", capsys, "--strategy", "magnitude", "--calibration.streaming", "true")
    assert "model-00002-of-00002.safetensors" in err and "missing" in err


@pytest.mark.parametrize("method", [["seap", "--strategy.keep_first", "0", "--strategy.keep_last", "0"],
                                    ["shadowllm-static"], ["griffin"]], ids=lambda m: m[0])
def test_methods_that_cannot_stream_say_so(tiny_llama, tmp_path, monkeypatch, capsys, method):
    monkeypatch.chdir(tmp_path)
    err = _refused(tiny_llama, tmp_path / "out", capsys, "--strategy", *method, "--calibration.streaming", "true")
    assert "stream" in err and "in memory" in err


def test_read_only_source_is_never_modified(tiny_llama, tmp_path, monkeypatch):
    """The source's files are read-only; a streaming run reads them and changes none (bytes and times)."""
    import hashlib

    monkeypatch.chdir(tmp_path)
    src = tmp_path / "ro"
    shutil.copytree(tiny_llama, src)

    def snapshot():
        return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(src.iterdir())}

    for p in src.iterdir():
        p.chmod(0o444)
    src.chmod(0o555)
    try:
        before = snapshot()
        _prune(src, tmp_path / "out", METHODS["flap"], "--calibration.streaming", "true")
        assert snapshot() == before
    finally:
        src.chmod(0o755)
        for p in src.iterdir():
            p.chmod(0o644)


def test_accelerator_requested_but_absent(tiny_llama, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.chdir(tmp_path)
    err = _refused(tiny_llama, tmp_path / "out", capsys, "--strategy", "wanda", "--calibration.streaming", "true",
                   "--trainer.accelerator", "gpu")
    assert "--trainer.accelerator gpu" in err and "no GPU" in err and "cpu" in err


@pytest.mark.slow
def test_peak_memory_is_flat_in_depth_and_below_the_model(tmp_path):
    """Peak RSS (VmHWM of the command's own process) of a streaming Wanda run on a synthetic Llama
    (12 layers, 535 MB of fp32 weights) stays within 200 MB of the same run on its 2-layer sibling — below the
    12-layer model's own size — where loading it whole would add the whole model. (The benchmark shows the same
    at 8/16/32 layers of hidden 2048.)"""
    import subprocess
    import sys

    from prunekit.synthetic import llama_params, write_llama
    from tiny import tokenizer

    exe = str(Path(sys.executable).with_name("prunekit"))
    peaks = {}
    for layers in (2, 12):
        model = write_llama(tmp_path / f"llama{layers}", tokenizer(), layers=layers, hidden=1024, intermediate=2816,
                            heads=16, kv_heads=4, max_positions=256)
        out = tmp_path / f"out{layers}"
        r = subprocess.run([exe, "prune", "--model", str(model), "--strategy", "wanda", "--data.seq_len", "64",
                            "--data.num_samples", "8", "--calibration.streaming", "true", "--output_dir", str(out)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        peaks[layers] = json.loads((out / "metrics.json").read_text())["peak_rss_mb"]
        shutil.rmtree(model)
    size_mb = llama_params(12, 1024, 2816, 16, 4, len(tokenizer())) * 4 / 2**20
    assert size_mb > 500
    cap = peaks[2] + 200
    assert peaks[12] < cap < peaks[2] + size_mb, (peaks, size_mb)


def test_a_cut_folder_streams_too(tiny_llama, tmp_path, monkeypatch):
    """A folder prunekit cut (per-layer widths, added biases) is rebuilt on the meta device and streams: Wanda on
    it gives the in-memory weights."""
    monkeypatch.chdir(tmp_path)
    _prune(tiny_llama, tmp_path / "cut", METHODS["flap"])
    _prune(tmp_path / "cut", tmp_path / "memory", METHODS["wanda"])
    _prune(tmp_path / "cut", tmp_path / "streamed", METHODS["wanda"], "--calibration.streaming", "true")
    _same_weights(tmp_path / "memory", tmp_path / "streamed")


@pytest.mark.real
def test_real_smollm2_streams_bitwise(tmp_path, monkeypatch):
    """SmolLM2-135M (30 layers, GQA, tied embeddings) from the zoo's safetensors cache: streaming Wanda and FLAP
    (adaptive, two passes) give the in-memory folders' weights, bitwise."""
    monkeypatch.chdir(tmp_path)
    data = ["--data.num_samples", "2", "--data.seq_len", "64", "--data.eval_samples", "1", "--eval_dense", "false",
            "--trainer.logger", "false"]
    for method in (["--strategy", "wanda"], ["--strategy", "flap", "--strategy.sparsity", "0.2"]):
        folders = []
        for streaming in ("false", "true"):
            out = tmp_path / f"{method[1]}-{streaming}"
            assert main(["prune", "--model", "smollm2-135m", *method, *data, "--calibration.streaming", streaming,
                         "--output_dir", str(out)]) == 0
            folders.append(out)
        _same_weights(*folders)
        shards = list(folders[1].glob("model-*-of-*.safetensors"))
        assert len(shards) == 31
