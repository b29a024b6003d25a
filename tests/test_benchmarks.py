"""The benchmark scripts regenerate their tables and plots from one command (tiny models, few runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def test_suite_writes_table_json_and_plots_with_progress(tiny_llama, tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PRUNEKIT_BENCH_IN_PROCESS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--model", str(tiny_llama),
                        "--methods", "wanda", "flap", "wanda-2:4", "--ratios", "0.5", "--tasks", "copa", "--limit", "3",
                        "--num_samples", "4", "--seq_len", "32", "--eval_samples", "2", "--repeats", "1",
                        "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for step in ("[1/8] eval dense-eval", "[2/8] prune wanda-50", "[6/8] prune wanda-2:4", "[8/8] bench"):
        assert step in r.stdout
    assert "ETA 0:" in r.stdout
    rows = json.loads((out / "suite.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["dense", "wanda-50", "flap-50", "wanda-2:4"]
    for row in rows:
        assert row["perplexity"] > 1 and 0 <= row["acc/copa"] <= 1 and row["decode_tok_s"] > 0
    assert rows[2]["params"] < rows[0]["params"] == rows[1]["params"] > rows[1]["params_nonzero"]
    table = (out / "suite.md").read_text()
    assert "| wanda-50 | 50% (" in table and "| flap-50 | 50% (" in table
    for name in ("suite_perplexity.png", "suite_accuracy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # a later run on a subset, same --work: every step and the speed measurement are reused, nothing recomputed
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--model", str(tiny_llama),
                        "--methods", "wanda", "--ratios", "0.5", "--tasks", "copa", "--limit", "3", "--num_samples", "4",
                        "--seq_len", "32", "--eval_samples", "2", "--repeats", "1", "--work", str(tmp_path / "work"),
                        "--name", "subset", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("reusing") == 4 and "every model measured earlier" in r.stdout
    subset = json.loads((out / "subset.json").read_text())["rows"]
    assert subset == rows[:2]


def test_seap_benchmark_shares_one_calibration_and_resumes(tmp_path):
    """SEAP's Table 1 script on an 8-layer tiny model (the logistic schedule keeps 4 layers dense): seap saves the
    statistics, seap-gen prunes from them, seap's row carries its experts' perplexity and the router; a second
    run with the same --work reuses every finished step."""
    from tiny import make_model

    model = make_model("llama", tmp_path / "tiny8", layers=8)
    out, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "seap.py"), "--model", str(model), "--methods", "seap",
           "seap-gen", "--ratios", "0.2", "--limit", "2", "--num_prompts", "4", "--num_samples", "4", "--seq_len",
           "64", "--eval_samples", "2", "--no-bench", "--work", str(work), "--out", str(out)]
    env = {**os.environ, "PRUNEKIT_BENCH_IN_PROCESS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "seap-logistic-20" / "statistics.safetensors").is_file()
    gen = json.loads((work / "seap-gen-logistic-20" / "metrics.json").read_text())
    assert gen["data"]["statistics"] == str(work / "seap-logistic-20" / "statistics.safetensors")
    rows = json.loads((out / "seap.json").read_text())["rows"]
    assert [(row["method"], row["ratio"]) for row in rows] == [("dense", 0.0), ("seap", 0.2), ("seap-gen", 0.2)]
    seap = rows[1]
    assert seap["removed"] == pytest.approx(0.2, abs=0.03) and seap["router"]["accuracy"] >= 0
    experts = [p for t, p in seap["expert_perplexity"].items() if t != "wiki"]
    assert len(experts) == 7 and seap["perplexity"] == pytest.approx(sum(experts) / 7)
    assert all(0 <= row["average_acc"] <= 1 for row in rows)
    assert "| seap | logistic | 20% |" in (out / "seap.md").read_text()
    for name in ("seap_accuracy.png", "seap_accuracy_above_chance.png", "seap_perplexity.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert again.returncode == 0 and again.stdout.count("reusing") == 5


def test_suite_table_without_tasks_has_no_accuracy_and_no_achieved_fraction_for_dynamic_rows(monkeypatch):
    """``--tasks none``: perplexity, size and speed columns only; a dynamic method zeroes nothing, so its row shows
    the requested per-input ratio without an achieved fraction."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import suite

    meta = {"model": "m", "limit": 50, "perplexity": "wiki held-out, 2 x 32 tokens", "calibration": "wiki, 4 x 32 tokens",
            "cpu_count": 2}
    base = {"params": 10, "params_nonzero": 9e6, "decode_tok_s": 5.0, "decode_speedup": 1.0, "perplexity": 3.0}
    rows = [{**base, "name": "dense", "method": "dense", "ratio": 0.0, "pruned_fraction": 0.045, "average_acc": 0.5},
            {**base, "name": "griffin-50", "method": "griffin", "ratio": 0.5, "pruned_fraction": None, "prune_s": 0}]
    table = suite.format_table(rows, [], meta)
    assert "average acc" not in table and "lm-eval" not in table
    assert "| dense | 0% (4.5%) | 3.00 | 9.0M |" in table
    assert "| griffin-50 | 50% | 3.00 | 9.0M | 5.0 (1.00x) | 0 |" in table
    with_tasks = suite.format_table([{**rows[0], "acc/copa": 0.6}], ["copa"], meta)
    assert "| copa | average acc |" in with_tasks and "lm-eval acc, first 50 documents per task" in with_tasks
