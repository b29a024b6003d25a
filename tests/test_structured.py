"""Structured strategies (wanda-sp, flap, magnitude-sp): reference formulas, allocation, bias compensation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tiny
from prunekit.arch import LinearRef
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.api import prune
from prunekit.evaluate import sparsity_rows
from prunekit.module import PrunableLM
from prunekit.plans import UnitCut
from prunekit.stats import ChannelMoments, ChannelSumSq
from prunekit.strategies.flap import FLAP
from prunekit.strategies.magnitude_sp import MagnitudeSP
from prunekit.strategies.wanda_sp import WandaSP
from prunekit.structured import StructuredStrategy, compensation
from prunekit.surgery import add_bias, structure

WINDOWS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


class _Data:
    def predict_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(WINDOWS), batch_size=2)


def _run(folder, strategy) -> PrunableLM:
    module = PrunableLM(str(folder))
    out = prune(strategy, module, _Data())
    assert isinstance(out.plan, UnitCut) and out.realized is module.model
    return module


def linear_counts(model) -> tuple[int, int]:
    """(projection weights, non-zero ones)."""
    rows = sparsity_rows(model)
    total = sum(r["numel"] for r in rows)
    return total, total - sum(r["zeros"] for r in rows)


def _stats(x):
    s, m = ChannelSumSq(x.shape[-1]), ChannelMoments(x.shape[-1])
    s.update(x), m.update(x)
    return {"act": s, "moments": m}


def test_dimension_scores_follow_the_reference_formulas():
    torch.manual_seed(0)
    w, x = torch.randn(16, 24), torch.randn(50, 24) * torch.linspace(0.1, 3, 24)
    ref = LinearRef("l", 0, "down", nn.Linear(24, 16, bias=False))
    ref.module.weight.data.copy_(w)
    st = _stats(x)
    w64, x64 = w.double(), x.double()
    wanda = (w64.abs() * x64.square().sum(0).sqrt()).mean(0)  # mean over rows of |W| * ||X_j||
    torch.testing.assert_close(WandaSP().dimension_scores(ref, st, attention=False), wanda)
    wifv = x64.var(0, unbiased=False) * w64.square().sum(0)  # Var[x_j] * sum_i W_ij^2
    torch.testing.assert_close(FLAP().dimension_scores(ref, st, attention=False), wifv)
    torch.testing.assert_close(FLAP().dimension_scores(ref, st, attention=True), wifv.square())  # as the reference
    torch.testing.assert_close(MagnitudeSP().dimension_scores(ref, {}, attention=False), w64.norm(dim=0))


def test_bias_compensation_replaces_removed_inputs_by_their_mean():
    torch.manual_seed(1)
    lin = nn.Linear(12, 5, bias=False)
    x = torch.randn(40, 12) + torch.linspace(-2, 2, 12)
    ref = LinearRef("down", 0, "down", lin)
    removed = torch.tensor([1, 4, 7])
    kept = torch.tensor([i for i in range(12) if i not in removed])
    target = x.clone()
    target[:, removed] = x[:, removed].mean(0)
    expected = lin(target)
    delta = compensation({"mlp": ref}, {"down": _stats(x)}, [], removed.tolist(), head_dim=1)["down"]
    add_bias(ref, delta)
    got = x[:, kept] @ lin.weight[:, kept].T + lin.bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and it is the best constant: the output error on the data is lower than without compensation
    full = lin(x) - lin.bias
    assert ((got - full) ** 2).sum() < ((x[:, kept] @ lin.weight[:, kept].T - full) ** 2).sum()


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_uniform_allocation_counts(tiny_models, family):
    module = _run(tiny_models[family], WandaSP(sparsity=0.5))
    gqa = family in ("llama", "gemma3_text")
    for layer in structure(module.model):
        assert layer["mlp_channels"] == tiny.FFN - int(0.5 * tiny.FFN)
        assert (layer["heads"], layer["kv_heads"]) == ((2, 1) if gqa else (2, 2))  # a whole KV group under GQA


def test_uniform_meets_the_ratio_despite_coarse_gqa_heads(tiny_llama):
    """0.3 of 2 KV groups floors to no head: channels take the layer's whole budget (reference floors: 38)."""
    dense = linear_counts(PrunableLM(str(tiny_llama)).model)[0]
    module = _run(tiny_llama, WandaSP(sparsity=0.3))
    layers = structure(module.model)
    assert {(l["heads"], l["kv_heads"]) for l in layers} == {(4, 2)}
    channel = 3 * tiny.HIDDEN
    removed = dense - linear_counts(module.model)[0]
    assert abs(removed - 0.3 * dense) <= tiny.LAYERS * channel / 2
    reference = _run(tiny_llama, WandaSP(sparsity=0.3, meet_ratio=False))
    assert {l["mlp_channels"] for l in structure(reference.model)} == {tiny.FFN - int(0.3 * tiny.FFN)}


def test_query_unit_keeps_every_kv_group(tiny_llama):
    module = _run(tiny_llama, MagnitudeSP(sparsity=0.5, head_unit="query"))
    assert {(l["heads"], l["kv_heads"]) for l in structure(module.model)} == {(2, 2)}


def test_logistic_keeps_first_and_last_layers(tiny_llama):
    module = _run(tiny_llama, WandaSP(sparsity=0.3, allocation="logistic", keep_first=1, keep_last=1))
    widths = structure(module.model)
    assert widths[0]["mlp_channels"] == widths[2]["mlp_channels"] == tiny.FFN
    assert widths[1]["mlp_channels"] < tiny.FFN


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_flap_adaptive_meets_the_budget(tiny_models, ratio):
    dense_total = linear_counts(PrunableLM(str(tiny_models["opt"])).model)[0]
    module = _run(tiny_models["opt"], FLAP(sparsity=ratio))
    removed = 1 - linear_counts(module.model)[0] / dense_total
    head = 4 * tiny.HIDDEN * 16 / (tiny.LAYERS * (4 * tiny.HIDDEN * tiny.HIDDEN + 2 * tiny.HIDDEN * tiny.FFN))
    assert ratio - head - 1e-9 <= removed <= ratio + 1e-9
    assert module.model.model.decoder.layers[0].self_attn.out_proj.bias is not None


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_allow_empty_lets_adaptive_empty_a_layer(tiny_models, family, tmp_path):
    """At 85% FLAP's pooled ranking empties some layer's attention or MLP only when allowed; the model runs."""
    kept = structure(_run(tiny_models[family], FLAP(sparsity=0.85)).model)
    assert min(min(l["heads"], l["mlp_channels"]) for l in kept) >= 1
    module = _run(tiny_models[family], FLAP(sparsity=0.85, allow_empty=True))
    emptied = structure(module.model)
    assert min(min(l["heads"], l["mlp_channels"]) for l in emptied) == 0
    with torch.no_grad():
        assert torch.isfinite(module.model(WINDOWS).logits).all()
    from prunekit.realize.cuts import save_cut

    (tmp_path / "emptied").mkdir()
    save_cut(module.model, tmp_path / "emptied", tiny.tokenizer())
    again = structure(_run(tmp_path / "emptied", WandaSP(sparsity=0.3)).model)  # an emptied model prunes further
    assert sum(l["mlp_channels"] for l in again) < sum(l["mlp_channels"] for l in emptied)


def test_zeros_on_a_cut_model_save_and_load(tiny_llama, tmp_path, monkeypatch):
    """Unstructured pruning of a folder that was cut before: the folder keeps the per-layer widths and loads."""
    import prunekit

    monkeypatch.chdir(tmp_path)
    data = ["--data.seq_len", "64", "--data.num_samples", "4", "--data.eval_samples", "3"]
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "flap", "--strategy.sparsity", "0.3", *data,
                 "--output_dir", str(tmp_path / "cut")]) == 0
    assert main(["prune", "--model", str(tmp_path / "cut"), "--strategy", "magnitude", *data,
                 "--output_dir", str(tmp_path / "zeros")]) == 0
    first, second = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("cut", "zeros"))
    model = prunekit.load_pruned(tmp_path / "zeros")
    assert structure(model) == first["pruned"]["structure"]
    with torch.no_grad():
        assert torch.isfinite(model(WINDOWS[:1]).logits).all()
    assert second["saved"]["plain"] is False
    assert main(["eval", "--model", str(tmp_path / "zeros"), *data, "--output_dir", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["perplexity"] == pytest.approx(second["pruned"]["perplexity"], rel=1e-6)


def test_structured_cli_round_trip(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = ["--data.seq_len", "64", "--data.num_samples", "4", "--data.eval_samples", "3"]
    out = tmp_path / "flap"
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "flap", "--strategy.sparsity", "0.3", *data,
                 "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pruned"]["pruned_fraction"] == pytest.approx(0.3, abs=0.05)
    assert metrics["pruned"]["params_total"] < metrics["dense"]["params_total"]
    assert len(metrics["pruned"]["structure"]) == tiny.LAYERS and metrics["plan"] == "unit_cut"
    assert main(["eval", "--model", str(out), *data, "--output_dir", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["perplexity"] == pytest.approx(metrics["pruned"]["perplexity"], rel=1e-6)
    assert again["params_total"] == metrics["pruned"]["params_total"]


def test_structured_bad_options():
    with pytest.raises(PrunekitError, match="needs mode='all-at-once'"):
        FLAP(mode="sequential")
    with pytest.raises(PrunekitError, match="nothing to prune"):
        WandaSP(prune_heads=False, prune_channels=False)
    with pytest.raises(PrunekitError, match="head_unit"):
        WandaSP(head_unit="rows")
    with pytest.raises(PrunekitError, match="in \\[0, 1\\)"):
        FLAP(sparsity=1.2)


def test_adaptive_query_unit_under_gqa_is_refused_before_calibration(tiny_llama):
    strategy = FLAP(sparsity=0.3, head_unit="query")
    with pytest.raises(PrunekitError, match="whole KV groups"):
        strategy.check(PrunableLM(str(tiny_llama)).model)


@pytest.fixture(scope="module")
def tiny_mqa(tmp_path_factory):
    """A tiny Gemma 3 with one KV head for its four query heads (Gemma-3-270M's layout)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny.config("gemma3_text")
    cfg.num_key_value_heads = 1
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mqa")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
    tiny.tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("make", [lambda: FLAP(sparsity=0.6, head_unit="query"),
                                  lambda: WandaSP(sparsity=0.5, head_unit="query")], ids=["flap", "wanda-sp"])
def test_single_kv_head_query_unit_removes_query_heads_and_keeps_the_kv_head(tiny_mqa, make):
    """Under one KV head the query unit works with every allocation (adaptive too): query heads go, K/V stays,
    and the ratio is of all attention+MLP weights, the shared K/V head included."""
    from prunekit.surgery import attention_heads

    dense_total, _ = linear_counts(PrunableLM(str(tiny_mqa)).model)
    strategy = make()
    module = _run(tiny_mqa, strategy)
    heads = [attention_heads(module.model, i) for i in range(tiny.LAYERS)]
    assert all(kv == 1 for _, kv in heads), heads
    assert any(q < 4 for q, _ in heads), f"no query head removed: {heads}"
    total, _ = linear_counts(module.model)
    assert abs((1 - total / dense_total) - strategy.sparsity) < 0.05, (total, dense_total)


def test_single_kv_head_group_unit_is_the_whole_attention(tiny_mqa):
    """kv_group under one KV head: the unit is all of a layer's attention, which a layer keeps; channels
    carry the ratio."""
    from prunekit.surgery import attention_heads

    module = _run(tiny_mqa, WandaSP(sparsity=0.5))
    assert [attention_heads(module.model, i) for i in range(tiny.LAYERS)] == [(4, 1)] * tiny.LAYERS
    assert all(m.mlp.down_proj.in_features < tiny.FFN for m in module.model.model.layers)
