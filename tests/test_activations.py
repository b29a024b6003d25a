"""Activation profiles: per-dimension RMS per layer, two random halves per task, similarity, heatmaps, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from prunekit.strategies.seap.activations import halves, profile, similarity, site_refs
from prunekit.cli import main
from prunekit.data import sequence_loader
from prunekit.errors import PrunekitError
from prunekit.module import PrunableLM


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, inference_mode=False)


def test_profile_is_the_rms_of_each_layers_normalised_input(tiny_llama):
    """Checked against an independent path: the model's own hidden states through each input layernorm."""
    module = PrunableLM(str(tiny_llama))
    g = torch.Generator().manual_seed(0)
    vocab = module.model.config.vocab_size
    seqs = [torch.randint(vocab, (n,), generator=g) for n in (5, 17, 9)]
    got = profile(_trainer(), module, sequence_loader(seqs), ["attn_in", "mlp_mid"])
    layers = module.model.model.layers
    with torch.no_grad():
        hidden = [module.model(input_ids=s[None], output_hidden_states=True).hidden_states for s in seqs]
    for i, layer in enumerate(layers):
        x = torch.cat([layer.input_layernorm(h[i])[0] for h in hidden]).double()
        torch.testing.assert_close(got["attn_in"][i], x.square().mean(0).sqrt(), rtol=1e-5, atol=1e-7)
    assert got["mlp_mid"].shape == (len(layers), module.model.config.intermediate_size)
    assert (got["mlp_mid"] > 0).all()
    # no hook is left behind, and a strategy-style "calibrate" pass is not observed
    assert all(not ref.module._forward_hooks for site in ("attn_in", "mlp_mid") for ref in site_refs(module.model, site))


def test_site_refs_pick_one_projection_per_layer_in_every_family(tiny_models):
    from prunekit.models import load_model

    for family, folder in tiny_models.items():
        model = load_model(str(folder))
        for site in ("attn_in", "mlp_in", "attn_mid", "mlp_mid"):
            refs = site_refs(model, site)
            assert [r.layer for r in refs] == list(range(len(refs))), (family, site)
    with pytest.raises(PrunekitError, match="unknown activation site"):
        site_refs(model, "residual")


def test_halves_are_disjoint_and_cover_everything():
    a, b = halves(list(range(7)))
    assert a == [0, 1, 2, 3] and b == [4, 5, 6]
    with pytest.raises(PrunekitError, match="at least 2 examples"):
        halves([1])


def test_similarity_finds_matching_halves_and_needs_two_tasks():
    g = torch.Generator().manual_seed(0)
    base = {t: torch.rand(4, 16, generator=g) + 0.1 for t in "xyz"}
    noisy = {t: {"A": v * (1 + 0.01 * torch.rand(4, 16, generator=g)), "B": v * (1 + 0.01 * torch.rand(4, 16, generator=g))}
             for t, v in base.items()}
    sim = similarity(noisy)
    assert sim["same_task"] > 0.9 > sim["other_tasks"] and sim["retrieval"] == 1.0
    assert sorted(sim["per_task"]) == ["x", "y", "z"] and len(sim["matrix"]) == 3
    swapped = {"x": {"A": noisy["x"]["A"], "B": noisy["y"]["B"]}, "y": {"A": noisy["y"]["A"], "B": noisy["x"]["B"]},
               "z": noisy["z"]}
    assert similarity(swapped)["retrieval"] == pytest.approx(1 / 3)
    assert similarity({"x": noisy["x"]})["same_task"] is None


def test_activations_cli_writes_profiles_heatmaps_and_is_deterministic(tiny_llama, tmp_path):
    def run(out: Path) -> dict:
        assert main(["activations", "--model", str(tiny_llama), "--tasks", "[copa, winogrande]",
                     "--sites", "[attn_in, mlp_mid]", "--data.num_samples", "7", "--data.seq_len", "48", "--dims", "8",
                     "--trainer.logger", "false", "--output_dir", str(out)]) == 0
        return json.loads((out / "metrics.json").read_text())

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first["examples"]["copa"] == {"A": {"examples": 4, "tokens": first["examples"]["copa"]["A"]["tokens"]},
                                         "B": {"examples": 3, "tokens": first["examples"]["copa"]["B"]["tokens"]}}
    assert first["similarity"]["attn_in"]["tasks"] == ["copa", "winogrande"]
    assert first["similarity"] == second["similarity"]
    p1, p2 = load_file(str(tmp_path / "a" / "activations.safetensors")), load_file(str(tmp_path / "b" / "activations.safetensors"))
    assert sorted(p1) == sorted(f"{s}/{t}/{h}" for s in ("attn_in", "mlp_mid") for t in ("copa", "winogrande") for h in "AB")
    for key in p1:
        assert torch.equal(p1[key], p2[key]), key
    assert not torch.equal(p1["attn_in/copa/A"], p1["attn_in/copa/B"])  # the halves are different examples
    projection = first["projection"]  # per-prompt hidden states of both tasks, every layer of the tiny model
    assert projection["layers"] == [0, 1, 2] and projection["prompts_per_task"] == {"copa": 7, "winogrande": 7}
    assert all(-1 <= v <= 1 for v in projection["silhouette"])
    for name in ("activation_heatmap_attn_in.png", "activation_similarity_mlp_mid.png", "task_projection.png"):
        assert (tmp_path / "a" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--sites", "[residual]"], "unknown --sites ['residual']"),
     (["--dims", "0"], "--dims must be >= 1"),
     (["--data.packing", "windows"], "keep data.packing=documents"),
     (["--tasks", "[perplexity]"], "names no task to profile"),
     (["--data.num_samples", "1"], "at least 2 examples"),
     (["--projection_samples", "-1"], "--projection_samples must be >= 0")],
)
def test_activations_cli_rejects_bad_input(tiny_llama, tmp_path, capsys, args, message):
    out = tmp_path / "x"
    assert main(["activations", "--model", str(tiny_llama), "--tasks", "[copa]", "--trainer.logger", "false",
                 "--data.seq_len", "32", *args, "--output_dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_activations_logged_to_wandb_offline(tiny_llama, tmp_path):
    from tiny import run_with_wandb_offline

    run = run_with_wandb_offline(["activations", "--model", str(tiny_llama), "--tasks", "[copa, boolq]",
                                  "--data.num_samples", "4", "--data.seq_len", "32", "--output_dir",
                                  str(tmp_path / "out")], tmp_path)
    assert b"attn_in/same_task" in next(run.glob("*.wandb")).read_bytes()
    images = [p.name for p in (run / "files" / "media" / "images").glob("*.png")]
    assert any(n.startswith("activation_heatmap_attn_in") for n in images)
    assert any(n.startswith("activation_similarity_attn_in") for n in images)


@pytest.mark.real
def test_smollm2_activation_profiles_are_task_specific(tmp_path):
    """SEAP's premise on the real model: two disjoint halves of one task agree more than different tasks do."""
    out = tmp_path / "act"
    assert main(["activations", "--tasks", "[seap7]", "--data.num_samples", "32", "--trainer.logger", "false",
                 "--projection_samples", "0",
                 "--output_dir", str(out)]) == 0
    sim = json.loads((out / "metrics.json").read_text())["similarity"]["attn_in"]
    print(f"\nSmolLM2 attn_in, 7 tasks x 2 halves of 16 examples: same task {sim['same_task']:.3f}, other tasks "
          f"{sim['other_tasks']:.3f}, retrieval {sim['retrieval']:.2f}; per task {sim['per_task']}")
    assert sim["same_task"] > sim["other_tasks"] + 0.2
    assert sim["retrieval"] >= 5 / 7
