"""Every shipped YAML config, and every command the README and the configs document, parses with the command it
documents (so the docs cannot rot); configs compose instead of restating defaults."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from prunekit.cli import main

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
COMMANDS = {"activations.yaml": "activations", "sensitivity.yaml": "sensitivity", "eval-tasks.yaml": "eval"}
OVERLAYS = {"wandb.yaml", "ddp.yaml", "streaming.yaml"}
NEEDS_TASK_DATA = {"seap.yaml", "seap-gen.yaml"}
METHODS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name not in COMMANDS and p.name not in OVERLAYS)


def _documented() -> list[list[str]]:
    """``prunekit ... --config configs/...`` commands quoted in the README and in the configs' own comments."""
    texts = [(ROOT / "README.md").read_text()] + [p.read_text() for p in CONFIGS.rglob("*.yaml")]
    found = []
    for text in texts:
        text = text.replace("\\\n#", " ").replace("\\\n", " ")
        for line in re.findall(r"prunekit (?:prune|eval|activations|sensitivity) [^`\n]*--config configs/[^`\n]*", text):
            line = line.split("  #")[0].split(" # ")[0].strip()
            found.append(shlex.split(line)[1:])
    return sorted({tuple(c) for c in found}, key=" ".join)


@pytest.mark.parametrize("name", METHODS)
def test_method_configs_parse_and_state_only_what_differs(name, capsys):
    extra = ["--config", str(CONFIGS / "data" / "seap-tasks.yaml")] if name in NEEDS_TASK_DATA else []
    assert main(["prune", "--config", str(CONFIGS / name), *extra, "--print_config"]) == 0
    assert "class_path: prunekit.strategies." in capsys.readouterr().out
    config = yaml.safe_load((CONFIGS / name).read_text())
    assert set(config) <= {"strategy", "output_dir"}, f"{name} restates {set(config) - {'strategy', 'output_dir'}}"


def test_overlays_combine_with_a_method(capsys):
    assert main(["prune", "--config", str(CONFIGS / "wanda.yaml"), "--config", str(CONFIGS / "wandb.yaml"),
                 "--config", str(CONFIGS / "ddp.yaml"), "--config", str(CONFIGS / "streaming.yaml"),
                 "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "lightning.pytorch.loggers.WandbLogger" in out and "strategy: ddp" in out and "Wanda" in out
    assert "streaming: true" in out and "memory: 8GB" in out


@pytest.mark.parametrize("command", _documented(), ids=lambda c: " ".join(c)[:60])
def test_every_documented_command_parses(command, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    args = [a if not a.startswith("runs/") else str(tmp_path / a) for a in command]
    if args[0] == "eval" and "--model" in args:  # the folder of an earlier run need not exist to parse
        args[args.index("--model") + 1] = "some/folder"
    if "--statistics" in args:
        args = args[:args.index("--statistics")] + args[args.index("--statistics") + 2:]
    assert main([*args, "--print_config"]) == 0, command


def test_command_configs_parse(capsys):
    assert main(["eval", "--config", str(CONFIGS / "eval-tasks.yaml"), "--model", "some/folder", "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "model: some/folder" in out and "- seap7" in out and "limit: 200" in out
    assert main(["activations", "--config", str(CONFIGS / "activations.yaml"), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "packing: documents" in out and "- mlp_mid" in out and "dims: 32" in out
    assert main(["sensitivity", "--config", str(CONFIGS / "sensitivity.yaml"), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "metric: piqa" in out and "- 1.0" in out


@pytest.mark.parametrize("name", ["data/seap-tasks.yaml", "data/shadow-tasks.yaml", "activations.yaml"])
def test_task_data_of_configs_is_satisfiable(name, tiny_llama):
    """Parsing is not enough: the calibration data a config asks for must exist (200 prompts per task once
    exceeded WinoGrande's reserved set and failed only at run time)."""
    from prunekit.data import CalibrationDataModule

    config = yaml.safe_load((CONFIGS / name).read_text())
    data = dict(config.get("data", {}))
    if "tasks" in config:  # the activations command passes its --tasks to the task corpus (its own defaults)
        data = {"corpus": "task", "packing": "documents", "sampling": "random", "num_samples": 64,
                "corpus_options": {"tasks": config["tasks"]}}
    dm = CalibrationDataModule(str(tiny_llama), **data)
    sources = dm.calibration_sources()
    assert len(sources) >= 7 and len(dm.calibration_sequences()) >= 7 * 32
