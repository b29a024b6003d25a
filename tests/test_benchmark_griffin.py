"""GRIFFIN's benchmark script end to end on a tiny model (its own module, beside the other benchmark scripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]



def test_griffin_benchmark_end_to_end(tiny_llama, tmp_path):
    """GRIFFIN's benchmark on the tiny llama (64-token windows): every section runs, prefix mode equals token-by-token
    decoding, the prompt sweep keeps only lengths that fit, the speed rows carry the gather cost, the tables and
    plots are written."""
    out = tmp_path / "results"
    env = {**os.environ, "PRUNEKIT_BENCH_IN_PROCESS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "griffin.py"), "--model", str(tiny_llama),
                        "--seq_len", "64", "--windows", "3", "--sweep_windows", "2", "--decode_check", "1",
                        "--tasks", "copa", "--limit", "3", "--densities", "0.5", "0.9",
                        "--prompt_lengths", "8", "16", "--num_samples", "2", "--repeats", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "griffin.json").read_text())
    check = result["prefix_vs_decode"]
    assert check["prefix_nll"] == pytest.approx(check["decode_nll"], rel=1e-5)
    assert set(result["split"]) == {"dense", "topk", "magnitude", "sample", "topk_sample", "random"}
    assert [row["prompt_len"] for row in result["prompt_sweep"]] == [8, 16]
    assert [row["density"] for row in result["density_sweep"]] == [0.5, 0.9, 0.5, 0.9]
    assert {row["model"] for row in result["speed"]} == {Path(str(tiny_llama)).name,
                                                         "static-mlp50", "griffin50", "griffin50-shared"}
    assert all("gather_ms" in row for row in result["speed"] if row["model"].startswith("griffin"))
    table = (out / "griffin.md").read_text()
    assert "| dense |" in table and "flap 20% + griffin 0.5" in table
    for name in ("griffin.png", "griffin_jaccard.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
