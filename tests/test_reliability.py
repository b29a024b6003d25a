"""A run a user can trust: signals at every phase, unwritable outputs, clear errors for bad input, statistics
fingerprints, honest loading claims, what is logged, help text, permissions."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prunekit.cli import main

TESTS = Path(__file__).parent
DATA = ["--data.seq_len", "64", "--data.num_samples", "4", "--data.eval_samples", "3"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------- signals
CASES = [  # (command, phase, signal): every phase of both commands, both signals (dense and pruned perplexity are
    ("prune", "calibration", signal.SIGTERM),  # the same kind of pass)
    ("prune", "decide", signal.SIGINT),
    ("prune", "evaluation", signal.SIGTERM),
    ("prune", "save", signal.SIGTERM),
    ("prune", "layer", signal.SIGTERM),  # streaming, two layer shards written, activations offloaded to disk
    ("eval", "perplexity", signal.SIGINT),
]


@pytest.mark.slow
def test_signals_stop_every_phase_promptly_and_leave_nothing(tiny_llama, tmp_path):
    """A real SIGTERM/SIGINT to the installed command at each phase (reached through a callback that pauses
    there): exit 128 + signal within seconds, a one-line message, no output folder, no hidden temporary folder
    beside it, no scratch folder in TMPDIR."""
    exe = str(Path(sys.executable).with_name("prunekit"))
    runs = []
    for i, (command, phase, sig) in enumerate(CASES):
        work = tmp_path / f"case{i}"
        (work / "tmp").mkdir(parents=True)
        config = work / "pause.yaml"
        config.write_text(f"trainer:\n  callbacks:\n    - class_path: pause.Pause\n      init_args:\n        phase: {phase}\n")
        args = [exe, command, "--model", str(tiny_llama), *DATA, "--config", str(config),
                "--output_dir", str(work / "out")]
        if command == "prune":
            args += ["--strategy", "wanda"]
        if phase == "layer":
            args += ["--calibration.streaming", "true", "--calibration.memory", "300KB"]
        env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", "TMPDIR": str(work / "tmp")}
        err = open(work / "stderr.txt", "w")
        runs.append((command, phase, sig, work, err,
                     subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, cwd=work, env=env)))
    deadline = time.time() + 240
    for command, phase, sig, work, err, proc in runs:
        while "PAUSED" not in (work / "stderr.txt").read_text():
            assert proc.poll() is None, f"{command} {phase} ended before pausing:\n{(work / 'stderr.txt').read_text()[-2000:]}"
            assert time.time() < deadline, f"{command} {phase} never reached its pause"
            time.sleep(0.2)
        sent = time.time()
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        took = time.time() - sent
        err.close()
        text = (work / "stderr.txt").read_text()
        name = signal.Signals(sig).name
        assert code == 128 + sig, f"{command} {phase} {name}: exit {code}\n{text[-2000:]}"
        assert f"prunekit {command}: stopped by {name}; nothing was written" in text
        assert took < 20, f"{command} {phase} {name} took {took:.1f} s to stop"
        assert not (work / "out").exists(), f"{command} {phase}: output folder left"
        assert not [p.name for p in work.iterdir() if p.name.startswith(".")], f"{command} {phase}: temp folder left"
        assert not list((work / "tmp").iterdir()), f"{command} {phase}: scratch left in TMPDIR"


# ----------------------------------------------------------------------------- checked before heavy work
def test_unwritable_output_location_is_refused_before_loading(tiny_llama, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    start = time.perf_counter()
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "wanda", *DATA,
                 "--output_dir", str(blocker / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "wanda", *DATA,
                 "--output_dir", "/proc/prunekit-out"]) == 2  # not writable, even by root
    assert "cannot write output folder /proc/prunekit-out" in capsys.readouterr().err
    assert time.perf_counter() - start < 5  # refused before the model, data or trainer exist


# ----------------------------------------------------------------------------- clear errors, exit 2
def test_bad_input_gives_one_clear_line(tiny_llama, tmp_path, capsys):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    corrupt = tmp_path / "statistics.safetensors"
    corrupt.write_bytes(b"\x00\x01not safetensors at all")
    base = ["prune", "--model", str(tiny_llama), *DATA, "--output_dir", str(tmp_path / "out")]
    cases = [
        (["--strategy", "wanda", "--data.corpus", "text", "--data.paths", f"[{binary}]"], "is not UTF-8 text"),
        (["--strategy", "wanda", "--strategy.mode", "all-at-once", "--statistics", str(corrupt)],
         "is not a readable statistics file"),
        (["--strategy", "wanda", "--trainer.accelerator", "gpu"], "--trainer"),
        (["--strategy.sparsity", "0.3"], "name the pruning method first (--strategy NAME"),
        (["--strategy", "wanda", "--strategy.sparsity", "lots"], "sparsity"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        last = err.strip().replace("\r", "\n").splitlines()[-1]
        assert last.startswith("prunekit prune: error: ") and message in last, (extra, err[-2000:])
        assert "Traceback" not in err and "usage:" not in err  # one message, not a parser dump
    assert not (tmp_path / "out").exists()


def test_help_shows_prunekit_options_and_methods(capsys):
    assert main(["prune", "--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("usage: prunekit prune") and len(lines) < 80
    assert "Lightning Trainer command line tool" not in text
    assert "one of: dejavu, flap, griffin, magnitude, magnitude-sp, seap, seap-gen, shadowllm, shadowllm-static, sparsegpt, wanda, wanda-sp" in text
    assert "--output_dir" in text and "--data.num_samples" in text and "--trainer.strategy" in text
    assert "Lightning's distributed engine" in text


def test_strategy_help_names_the_methods_options(capsys):
    code = main(["prune", "--strategy.help", "sparsegpt"])
    out = capsys.readouterr().out
    assert code == 0 and "blocksize" in out and "percdamp" in out


def test_a_failed_replacement_puts_the_previous_folder_back(tmp_path, monkeypatch):
    """--overwrite: if moving the new folder into place fails (or a signal lands there), the old one returns."""
    from prunekit.export import write_atomically

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".out.tmp-"):
            raise KeyboardInterrupt  # as a signal would, at the worst moment
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(out, True, lambda tmp: (tmp / "new.txt").write_text("new"))
    assert (out / "keep.txt").read_text() == "previous run" and not (out / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or trash folder left


def test_light_commands_import_neither_torch_nor_lightning():
    code = ("import sys\nfrom prunekit.cli import main\nassert main(['--help']) == 0\nassert main(['strategies']) == 0\n"
            "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    r = subprocess.run([sys.executable, "-m", "prunekit.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "sensitivity" in r.stdout and not r.stderr  # plugin commands as `python -m` too


# ----------------------------------------------------------------------------- statistics fingerprints
def test_statistics_of_another_model_or_data_are_refused(tiny_llama, tiny_models, tmp_path, capsys):
    common = ["--strategy", "wanda", "--strategy.mode", "all-at-once", "--eval_dense", "false"]
    assert main(["prune", "--model", str(tiny_llama), *common, *DATA, "--save_statistics", "true",
                 "--output_dir", str(tmp_path / "first")]) == 0
    saved = tmp_path / "first" / "statistics.safetensors"
    capsys.readouterr()
    other_data = [*DATA[:2], "--data.num_samples", "5", *DATA[4:]]
    assert main(["prune", "--model", str(tiny_llama), *common, *other_data, "--statistics", str(saved),
                 "--output_dir", str(tmp_path / "x")]) == 2
    assert "calibrated on other data" in capsys.readouterr().err
    from tiny import make_model

    other = make_model("llama", tmp_path / "other-llama", seed=5)  # same shapes, other weights
    assert main(["prune", "--model", str(other), *common, *DATA, "--statistics", str(saved),
                 "--output_dir", str(tmp_path / "y")]) == 2
    assert "calibrated on another model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert main(["prune", "--model", str(tiny_llama), *common, *other_data, "--statistics", str(saved), "--force",
                 "true", "--output_dir", str(tmp_path / "forced")]) == 0
    assert "warning: --statistics" in capsys.readouterr().out
    record = json.loads((tmp_path / "forced" / "metrics.json").read_text())
    assert record["data"]["num_samples"] == 4 and record["data"]["statistics"] == str(saved)  # what it really saw


# ----------------------------------------------------------------------------- honest loading claims
def test_adaptive_cut_says_why_plain_loading_fails(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import prunekit

    out = tmp_path / "flap"
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "flap", "--strategy.sparsity", "0.3", *DATA,
                 "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "prunekit.json").read_text())
    assert record["plan"] == "unit_cut" and record["loading"]["plain"] is False
    assert "cannot load this folder: its layers differ in MLP width" in record["loading"]["note"]
    assert "note: plain AutoModelForCausalLM.from_pretrained (and lm_eval --model hf) cannot load" in printed
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(out)
    prunekit.load_pruned(out)  # what the folder says works, works


# ----------------------------------------------------------------------------- what loggers get
def test_structured_runs_log_the_removed_fraction(tiny_llama, tmp_path):
    import csv

    assert main(["prune", "--model", str(tiny_llama), "--strategy", "wanda-sp", "--strategy.sparsity", "0.3", *DATA,
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--output_dir",
                 str(tmp_path / "wsp")]) == 0
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}
    assert logged["pruned/fraction"] == pytest.approx(0.3, abs=0.05)  # the removed fraction, not zeros
    assert logged["pruned/zero_fraction"] < 0.01
    assert logged["layers/00/mlp_channels"] < 128


# ----------------------------------------------------------------------------- permissions
def test_outputs_follow_the_users_umask(tiny_llama, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["prune", "--model", str(tiny_llama), "--strategy", "magnitude", *DATA,
                     "--output_dir", str(tmp_path / "perm")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "perm"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
