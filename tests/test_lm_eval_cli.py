"""The documented plain ``lm_eval`` command over prunekit's task folder (``python -m prunekit.lm_tasks``) works offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit.tasks import TASK_DIR

BIN = Path(sys.executable).parent  # the venv's bin: lm_eval sits next to python


@pytest.mark.slow
def test_lm_eval_command_line_offline(tiny_llama, tmp_path):
    include = subprocess.run([sys.executable, "-m", "prunekit.lm_tasks"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert Path(include) == TASK_DIR.resolve()

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               LMEVAL_LOG_LEVEL="ERROR", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={tiny_llama}",
                        "--tasks", "piqa", "--include_path", include, "--limit", "2",
                        "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    output = r.stdout + r.stderr
    assert r.returncode == 0, output[-3000:]
    assert "overrides existing task" not in output
    assert any(line.startswith("|piqa ") for line in r.stdout.splitlines()), r.stdout

    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert 0.0 <= results["results"]["piqa"]["acc,none"] <= 1.0
    assert results["configs"]["piqa"]["dataset_kwargs"] == {"prunekit_task": "piqa"}  # prunekit's YAML, not lm-eval's
