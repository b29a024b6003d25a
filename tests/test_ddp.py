"""Two CPU processes (DDP, gloo) give the same statistics and masks as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.cli import main
from prunekit.realize import load_pruned

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, processes: int) -> None:
    """One process in this one (nothing extra to prove in a subprocess); several through the installed command,
    as Lightning's DDP launcher starts the other ranks by running the command again."""
    if processes == 1:
        os.chdir(cwd)
        assert main(args) == 0
        return
    cmd = [str(Path(sys.executable).with_name("prunekit")), *args, "--trainer.strategy", "ddp",
           "--trainer.devices", str(processes)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def _prune(model: Path, out: Path, strategy: list[str], processes: int) -> None:
    _run(["prune", "--model", str(model), *strategy, "--data.seq_len", "64", "--data.num_samples", "7",
          "--data.eval_samples", "3", "--save_statistics", "true", "--output_dir", str(out)], out.parent, processes)


def test_two_processes_equal_one(tiny_llama, tmp_path, monkeypatch):
    """Sequential Wanda: every layer's statistics are reduced before that layer is pruned (the all-at-once and
    gradient pipelines are checked the same way by the SEAP test below and tests/test_plugin.py)."""
    monkeypatch.chdir(tmp_path)
    strategy = ["--strategy", "wanda"]
    one, two = tmp_path / "one", tmp_path / "two"
    _prune(tiny_llama, one, strategy, 1)
    _prune(tiny_llama, two, strategy, 2)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)

    s1, s2 = load_file(str(one / "statistics.safetensors")), load_file(str(two / "statistics.safetensors"))
    assert s1.keys() == s2.keys() and len(s1) > 0
    for key in s1:
        if key.endswith(".count"):  # 7 windows of 64 tokens, each counted exactly once across processes
            assert s1[key].item() == s2[key].item() == 7 * 64, key
        # float64 sums differ only by summation order: compare relative to the statistic's scale
        scale = s1[key].abs().max().clamp(min=1e-300)
        assert ((s2[key] - s1[key]).abs().max() / scale).item() < 1e-12, key

    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for key in w1:
        assert torch.equal(w1[key] == 0, w2[key] == 0), f"mask differs: {key}"
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-7, msg=key)
    assert m2["pruned"]["perplexity"] == pytest.approx(m1["pruned"]["perplexity"], rel=1e-5)


def test_activation_profiles_two_processes_equal_one(tiny_llama, tmp_path, monkeypatch):
    """Each prompt is seen by one process; the per-dimension sums are reduced, so the profiles agree."""
    monkeypatch.chdir(tmp_path)
    outs = {}
    for processes in (1, 2):
        out = tmp_path / f"act{processes}"
        _run(["activations", "--model", str(tiny_llama), "--tasks", "[copa, winogrande]", "--data.num_samples", "7",
              "--data.seq_len", "48", "--trainer.logger", "false", "--output_dir", str(out)], tmp_path, processes)
        outs[processes] = load_file(str(out / "activations.safetensors"))
    assert outs[1].keys() == outs[2].keys() and len(outs[1]) == 4
    for key in outs[1]:
        torch.testing.assert_close(outs[2][key], outs[1][key], rtol=1e-6, atol=0, msg=key)


def test_seap_per_task_statistics_and_experts_two_processes_equal_one(tiny_llama, tmp_path, monkeypatch):
    """Per-source (per-task) statistics reduce across processes like the others: same statistics, same plans."""
    monkeypatch.chdir(tmp_path)
    outs = {}
    for processes in (1, 2):
        out = tmp_path / f"seap{processes}"
        _run(["prune", "--model", str(tiny_llama), "--strategy", "seap", "--strategy.tasks", "[all]",
              "--strategy.allocation", "uniform", "--strategy.sparsity", "0.3", "--save_statistics", "true",
              "--data.corpus", "task", "--data.corpus_options", "{tasks: [copa, winogrande]}",
              "--data.packing", "documents", "--data.num_samples", "5", "--data.seq_len", "48",
              "--data.eval_samples", "2", "--strategy.router", "false", "--output_dir", str(out)], tmp_path, processes)
        outs[processes] = out
    plans = [json.loads((outs[p] / "prunekit_plans.json").read_text())["members"] for p in (1, 2)]
    assert plans[0] == plans[1] and set(plans[0]) == {"copa", "winogrande"}
    m = [json.loads((outs[p] / "metrics.json").read_text()) for p in (1, 2)]
    for task in ("copa", "winogrande"):
        assert m[1]["pruned"]["members"][task]["perplexity"] == \
            pytest.approx(m[0]["pruned"]["members"][task]["perplexity"], rel=1e-5)
    s1, s2 = (load_file(str(outs[p] / "statistics.safetensors")) for p in (1, 2))
    assert s1.keys() == s2.keys() and any("moments@copa" in k for k in s1)
    for key in s1:
        if key.endswith(".count"):
            assert s1[key].item() == s2[key].item(), key
        scale = s1[key].abs().max().clamp(min=1e-300)
        assert ((s2[key] - s1[key]).abs().max() / scale).item() < 1e-12, key


def test_shadowllm_probe_criterion_two_processes_equal_one(tiny_llama, tmp_path, monkeypatch):
    """The probe pipeline (grasp per example, per task) reduces across processes like the observers: the same
    records and the same static cut on two processes as on one. (The gradient pipeline's per-example records
    are checked on two processes by the plugin package's gradient strategy.)"""
    monkeypatch.chdir(tmp_path)
    args = ["--strategy", "shadowllm-static", "--strategy.criterion", "grasp", "--strategy.sparsity", "0.5",
            "--data.corpus", "task", "--data.corpus_options", "{tasks: [copa, winogrande]}", "--data.packing",
            "documents", "--data.num_samples", "3", "--data.seq_len", "96", "--data.eval_samples", "2",
            "--eval_dense", "false"]
    outs = {}
    for processes in (1, 2):
        outs[processes] = tmp_path / f"grasp{processes}"
        _run(["prune", "--model", str(tiny_llama), *args, "--output_dir", str(outs[processes])], tmp_path, processes)
    plans = [json.loads((outs[p] / "prunekit_structure.json").read_text()) for p in (1, 2)]
    assert plans[0] == plans[1]
    assert sum(layer["heads"] for layer in plans[0]["layers"]) < 3 * 4  # the cut happened
    assert sum(layer["mlp_channels"] for layer in plans[0]["layers"]) < 3 * 128


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_streaming_across_devices_and_nodes_equals_one_process(tiny_llama, tmp_path, monkeypatch):
    """Streaming + DDP: two devices launched by Lightning, and two "nodes" of one device each started by hand with
    Lightning's environment variables (MASTER_ADDR/PORT, WORLD_SIZE, NODE_RANK, LOCAL_RANK — what a cluster
    launcher sets) give the masks of one in-memory process; only rank 0 writes, and nothing else is left."""
    monkeypatch.chdir(tmp_path)
    args = ["prune", "--model", str(tiny_llama), "--strategy", "sparsegpt", "--data.seq_len", "64",
            "--data.num_samples", "7", "--data.eval_samples", "3", "--eval_dense", "false"]
    one = tmp_path / "one"
    _run([*args, "--output_dir", str(one)], tmp_path, 1)
    devices = tmp_path / "devices"
    _run([*args, "--calibration.streaming", "true", "--output_dir", str(devices)], tmp_path, 2)
    nodes = tmp_path / "nodes"
    cmd = [str(Path(sys.executable).with_name("prunekit")), *args, "--calibration.streaming", "true", "--output_dir",
           str(nodes), "--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "saved to" in outs[0][0] and "saved to" not in outs[1][0]  # rank 0 reports and writes
    reference = load_pruned(str(one)).state_dict()
    for folder in (devices, nodes):
        m = json.loads((folder / "metrics.json").read_text())
        assert m["world_size"] == 2 and m["streaming"] is True
        state = load_pruned(str(folder)).state_dict()
        assert state.keys() == reference.keys()
        for key, w in reference.items():
            assert torch.equal(w == 0, state[key] == 0), f"mask differs: {key} ({folder.name})"
            torch.testing.assert_close(state[key], w, rtol=1e-5, atol=1e-6, msg=key)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folders
