"""ShadowLLM's benchmark script end to end on a tiny model (its own module, beside the other benchmark scripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def test_shadowllm_benchmark_end_to_end(tiny_llama, tmp_path):
    """One gradient pass for two criteria, a grasp probe pass, Spearman for both designs, static global and local
    cuts, both dynamic designs, the latency rows (with the gather cost for the dynamic models), tables and plot."""
    out = tmp_path / "results"
    env = {**os.environ, "PRUNEKIT_BENCH_IN_PROCESS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shadowllm.py"), "--model", str(tiny_llama),
                        "--seq_len", "128", "--per_task", "3", "--limit", "2", "--windows", "2", "--tasks", "copa",
                        "piqa", "--criteria", "plainact", "l2_norm", "--probes", "grasp", "--static", "0.3",
                        "--local", "0.3", "--dynamic", "0.5", "--hidden", "8", "--epochs", "2", "--repeats", "1",
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "shadowllm.json").read_text())
    assert set(result["spearman"]) == {f"{d}/{c}" for d in ("shadowllm", "dejavu") for c in ("plainact", "l2_norm")}
    assert all(-1 <= v["heads"] <= 1 and -1 <= v["neurons"] <= 1 for v in result["spearman"].values())
    assert [(r["criterion"], r["scope"]) for r in result["static"]] == \
        [("plainact", "global"), ("l2_norm", "global"), ("grasp", "global"), ("plainact", "local")]
    assert all(r["params"] < result["dense"]["params"] for r in result["static"])
    assert [(r["design"], r["sparsity"]) for r in result["dynamic"]] == [("shadowllm", 0.5), ("dejavu", 0.5)]
    assert {row["model"] for row in result["speed"]} == {Path(str(tiny_llama)).name, "static-plainact50",
                                                         "shadowllm50", "dejavu50"}
    assert all("gather_ms" in row for row in result["speed"] if row["model"] in ("shadowllm50", "dejavu50"))
    table = (out / "shadowllm.md").read_text()
    assert "**Predictability**" in table and "| grasp | 30% |" in table and "| dejavu (l2_norm, local) | 50% |" in table
    assert (out / "shadowllm.png").read_bytes()[:4] == b"\x89PNG"
