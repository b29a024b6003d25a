"""Every shipped YAML config parses with the command it documents (so the docs cannot rot)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunekit.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"
PRUNE = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name not in ("eval.yaml", "eval-tasks.yaml", "wandb.yaml", "activations.yaml", "sensitivity.yaml"))


@pytest.mark.parametrize("name", PRUNE)
def test_prune_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--config", str(CONFIGS / name), "--print_config"])
    assert e.value.code == 0
    assert "class_path: prunekit.strategies." in capsys.readouterr().out


def test_wandb_config_combines_with_a_method(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--config", str(CONFIGS / "wanda.yaml"), "--config", str(CONFIGS / "wandb.yaml"), "--print_config"])
    assert e.value.code == 0
    assert "lightning.pytorch.loggers.WandbLogger" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["eval.yaml", "eval-tasks.yaml"])
def test_eval_config_parses(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--config", str(CONFIGS / name), "--model", "some/folder", "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "model: some/folder" in out
    if name == "eval-tasks.yaml":
        assert "- seap7" in out and "limit: 200" in out


def test_activations_config_parses(capsys):
    with pytest.raises(SystemExit) as e:
        main(["activations", "--config", str(CONFIGS / "activations.yaml"), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "packing: documents" in out and "- mlp_mid" in out and "dims: 32" in out


def test_sensitivity_config_parses(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sensitivity", "--config", str(CONFIGS / "sensitivity.yaml"), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "metric: piqa" in out and "- 1.0" in out


@pytest.mark.parametrize("name", ["seap.yaml", "seap-gen.yaml", "activations.yaml"])
def test_task_data_of_configs_is_satisfiable(name, tiny_llama):
    """Parsing is not enough: the calibration data a config asks for must exist (200 prompts per task once
    exceeded WinoGrande's reserved set and failed only at run time)."""
    import yaml

    from prunekit.data import CalibrationDataModule

    config = yaml.safe_load((CONFIGS / name).read_text())
    data = config["data"]
    if "tasks" in config:  # the activations command passes its --tasks to the task corpus
        data["corpus_options"] = {"tasks": config["tasks"]}
    dm = CalibrationDataModule(str(tiny_llama), **data)
    sources = dm.calibration_sources()
    assert len(sources) >= 7 and len(dm.calibration_sequences()) >= 7 * 32
