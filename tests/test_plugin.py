"""Third-party strategies, installed as a package registers them (entry points), run end to end: a seeded
random baseline, a gradient-criterion method with per-example records, and a dynamic runtime-policy method —
on one process in-process and on two processes (DDP) through the installed command."""

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

PLUGIN = Path(__file__).parent / "plugin"
DATA = ["--data.seq_len", "64", "--data.eval_samples", "2"]
TASK = ["--data.corpus", "task", "--data.corpus_options", "{tasks: [copa]}", "--data.packing", "documents",
        "--data.num_samples", "7"]


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
         str(PLUGIN)],
        check=True, capture_output=True,
    )
    return site


@pytest.fixture
def plugin(plugin_site, monkeypatch, tmp_path):
    """The plugin importable in this process too (entry points are found on sys.path)."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.chdir(tmp_path)
    return plugin_site


def _run(args, site, cwd, processes: int = 1):
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    if processes > 1:
        args = [*args, "--trainer.strategy", "ddp", "--trainer.devices", str(processes)]
    return subprocess.run([str(Path(sys.executable).with_name("prunekit")), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_plugin_listed_and_used(plugin, tiny_llama, tmp_path, capsys):
    assert main(["strategies"]) == 0
    listed = capsys.readouterr().out
    line = next(l for l in listed.splitlines() if l.startswith("random "))
    assert "third-party plugin example" in line and "prunekit-example-plugin" in line
    assert any(l.startswith("grad-probe ") for l in listed.splitlines())
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "random", "--strategy.sparsity", "0.3",
                 "--strategy.seed", "7", *DATA, "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == "random" and metrics["pruned"]["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert main(["prune", "--strategy", "nope"]) == 2
    assert ("available strategies: dejavu, flap, grad-probe, griffin, magnitude, magnitude-sp, random, seap, seap-gen, "
            "shadowllm, shadowllm-static, sparsegpt, topk-runtime, wanda, wanda-sp") in capsys.readouterr().err


def _direct_gradients(folder: Path, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: loss = mean CE on its continuation tokens, backward; (Σ_examples Σ_rows |W ⊙ ∂L/∂W| of
    layer 0's down_proj, per example Σ_t |Σ_d a·g| per head of layer 0's o_proj input) — plain autograd."""
    from prunekit.models import load_model

    model = load_model(str(folder))
    down = model.model.layers[0].mlp.down_proj
    down.weight.requires_grad_(True)
    heads = model.config.num_attention_heads
    saliency, records = torch.zeros(down.in_features, dtype=torch.float64), []
    for ids, mask in examples:
        captured = {}

        def grab(module, args):
            args[0].retain_grad()
            captured["a"] = args[0]

        h = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(grab)
        emb = model.get_input_embeddings()
        e = emb(ids[None]).detach().requires_grad_(True)
        logits = model(inputs_embeds=e, use_cache=False).logits
        h.remove()
        target = mask[None, 1:]
        ce = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="none")
        ce[target[0]].mean().backward()
        a, g = captured["a"].detach(), captured["a"].grad
        per_head = (a * g).reshape(*a.shape[:-1], heads, -1).sum(-1).abs().sum(1)
        records.append(per_head[0].double())
        saliency += (down.weight.detach() * down.weight.grad).abs().sum(0).double()
        down.weight.grad = None
    return saliency, torch.stack(records)


@pytest.mark.slow
def test_gradient_strategy_with_per_example_records_end_to_end(plugin, tiny_llama, tmp_path):
    """grad-probe through the CLI: the loss on each COPA example's gold answer only; weight-gradient sums and
    per-example head records equal plain autograd, and two processes give the same records and plan."""
    from prunekit.data import CalibrationDataModule

    args = ["prune", "--model", str(tiny_llama), "--strategy", "grad-probe", *TASK, *DATA,
            "--save_statistics", "true"]
    assert main([*args, "--output_dir", str(tmp_path / "one")]) == 0
    two = _run([*args, "--output_dir", str(tmp_path / "two")], plugin, tmp_path, processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (load_file(str(tmp_path / d / "statistics.safetensors")) for d in ("one", "two"))
    assert s1.keys() == s2.keys()
    for key in s1:
        torch.testing.assert_close(s2[key], s1[key], rtol=1e-10, atol=1e-12, msg=key)
    assert s1["heads.0.heads.index"].tolist() == list(range(7))  # ordered by example, whoever computed it

    dm = CalibrationDataModule(str(tiny_llama), corpus="task", corpus_options={"tasks": ["copa"]},
                               packing="documents", num_samples=7, seq_len=64)
    masks = dm.calibration_loss_masks()
    assert all(0 < int(m.sum()) < m.numel() - 1 for m in masks)  # the gold continuation, not the prompt
    saliency, records = _direct_gradients(tiny_llama, list(zip(dm.calibration_sequences(), masks)))
    torch.testing.assert_close(s1["saliency.0.saliency.total"], saliency, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(s1["heads.0.heads.values"], records, rtol=1e-4, atol=1e-9)

    plans = [json.loads((tmp_path / d / "prunekit_structure.json").read_text())["layers"] for d in ("one", "two")]
    assert plans[0] == plans[1] and plans[0][0]["mlp_channels"] == 128 - 32


@pytest.mark.slow
def test_runtime_policy_strategy_end_to_end(plugin, tiny_llama, tmp_path):
    """topk-runtime: the runtime is installed by the realizer, saved and installed again by load_pruned; the
    loaded model computes the per-token top-k exactly, generates with the KV cache, evaluates through the CLI,
    and two processes evaluate it as one does."""
    import prunekit
    from prunekit.models import load_model

    out = tmp_path / "rt"
    args = ["prune", "--model", str(tiny_llama), "--strategy", "topk-runtime", "--strategy.density", "0.25", *DATA]
    assert main([*args, "--output_dir", str(out)]) == 0
    record = json.loads((out / "prunekit.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert record["plan"] == "runtime_policy" and metrics["pruned"]["runtime"]["density"] == 0.25
    assert metrics["pruned"]["perplexity"] != pytest.approx(metrics["dense"]["perplexity"])

    model, dense = prunekit.load_pruned(out), load_model(str(tiny_llama))
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))

    def topk(module, inputs):
        z = inputs[0]
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.abs().topk(32, dim=-1).indices, True)
        return (z * keep,)

    for layer in dense.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(topk)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=0, atol=0)
        generated = model.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = dense.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected)

    assert main(["eval", "--model", str(out), *DATA, "--output_dir", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["perplexity"] == pytest.approx(metrics["pruned"]["perplexity"], rel=1e-6)
    two = _run([*args, "--output_dir", str(tmp_path / "rt2")], plugin, tmp_path, processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    m2 = json.loads((tmp_path / "rt2" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["pruned"]["perplexity"] == pytest.approx(metrics["pruned"]["perplexity"], rel=1e-5)
