"""Architecture adapters: decoder layers, projection roles and orientation for every supported family."""

import types

import pytest
import torch

import tiny
from prunekit.arch import ADAPTERS, adapter_for, select_linears, supported_model_types
from prunekit.errors import PrunekitError
from prunekit.models import load_model

H, F = tiny.HIDDEN, tiny.FFN
KV = 2 * 16  # llama / gemma3: 2 key-value heads of head_dim 16

# role -> (out_features, in_features) of the tiny models
EXPECTED = {
    "llama": {"q": (H, H), "k": (KV, H), "v": (KV, H), "o": (H, H), "gate": (F, H), "up": (F, H), "down": (H, F)},
    "gemma3_text": {"q": (H, H), "k": (KV, H), "v": (KV, H), "o": (H, H), "gate": (F, H), "up": (F, H),
                    "down": (H, F)},
    "opt": {"q": (H, H), "k": (H, H), "v": (H, H), "o": (H, H), "fc1": (F, H), "fc2": (H, F)},
    "gpt2": {"qkv": (3 * H, H), "o": (H, H), "fc1": (F, H), "fc2": (H, F)},
    "gpt_neox": {"qkv": (3 * H, H), "o": (H, H), "fc1": (F, H), "fc2": (H, F)},
}
ATTENTION = {"llama": (4, 2, 16), "gemma3_text": (4, 2, 16), "opt": (4, 4, 16), "gpt2": (4, 4, 16),
             "gpt_neox": (4, 4, 16)}


@pytest.fixture(scope="module")
def models(tiny_models):
    return {family: load_model(str(folder)) for family, folder in tiny_models.items()}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_adapter_layers_and_roles(models, family):
    model = models[family]
    adapter = adapter_for(model)
    assert adapter.family == family
    assert adapter_for(model.config) is adapter
    assert len(adapter.layers(model)) == tiny.LAYERS
    refs = adapter.linears(model)
    assert len(refs) == tiny.LAYERS * len(EXPECTED[family])
    for i in range(tiny.LAYERS):
        layer_refs = [r for r in refs if r.layer == i]
        assert [r.role for r in layer_refs] == list(EXPECTED[family])
        for r in layer_refs:
            assert r.module is model.get_submodule(r.name)
            assert r.name.startswith(f"{adapter.layers_path}.{i}.")
            assert r.module in list(adapter.layers(model)[i].modules())
    names = {r.name for r in refs}
    assert len(names) == len(refs)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_linear_ref_weight_is_out_in(models, family):
    model = models[family]
    torch.manual_seed(0)
    for ref in adapter_for(model).linears(model):
        out_f, in_f = EXPECTED[family][ref.role]
        assert tuple(ref.weight.shape) == (out_f, in_f), ref.name
        assert (ref.out_features, ref.in_features) == (out_f, in_f)
        assert ref.transposed == (family == "gpt2")
        # the module computes x @ W.T (+ b) with W = ref.weight: the orientation every score formula assumes
        x = torch.randn(3, in_f)
        bias = getattr(ref.module, "bias", None)
        expected = x @ ref.weight.T + (bias if bias is not None else 0)
        torch.testing.assert_close(ref.module(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_linear_ref_weight_is_a_view_and_set_weight_writes_through(tiny_models, family):
    model = load_model(str(tiny_models[family]))  # private copy: edited below
    ref = adapter_for(model).linears(model)[-1]  # fc2 / down: non-square
    raw = ref.module.weight
    ref.weight[1, 2] = 123.0
    if family == "gpt2":
        assert raw[2, 1] == 123.0
    else:
        assert raw[1, 2] == 123.0
    new = torch.arange(ref.weight.numel(), dtype=torch.float64).reshape(ref.weight.shape)
    ref.set_weight(new)
    assert raw.dtype == torch.float32
    torch.testing.assert_close(ref.weight, new.float())
    torch.testing.assert_close(raw, new.float().T if family == "gpt2" else new.float())


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_attention_shape(models, family):
    assert adapter_for(models[family]).attention_shape(models[family].config) == ATTENTION[family]


def test_attention_shape_llama_and_opt_from_configs():
    assert ADAPTERS["llama"].attention_shape(tiny.config("llama")) == (4, 2, 16)
    assert ADAPTERS["opt"].attention_shape(tiny.config("opt")) == (4, 4, 16)


def test_attention_shape_missing_attribute_raises():
    with pytest.raises(PrunekitError, match="num_attention_heads"):
        ADAPTERS["llama"].attention_shape(types.SimpleNamespace(hidden_size=64))


def test_unsupported_model_type_names_supported_types():
    import transformers

    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(PrunekitError) as e:
        adapter_for(config)
    message = str(e.value)
    assert "'bert'" in message
    for model_type in supported_model_types():
        assert model_type in message
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt", "gpt2", "gpt_neox"} <= set(
        supported_model_types())
    with pytest.raises(PrunekitError, match="unsupported architecture None"):
        adapter_for(types.SimpleNamespace())


def test_unsupported_model_folder_fails_before_loading(tmp_path):
    import transformers

    transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(PrunekitError, match="supported model types"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_select_linears_groups(models, family):
    model = models[family]
    attn = select_linears(model, ["attn"])
    mlp = select_linears(model, ["mlp"])
    assert {r.group for r in attn} == {"attn"} and {r.group for r in mlp} == {"mlp"}
    roles = list(EXPECTED[family])
    assert len(attn) + len(mlp) == tiny.LAYERS * len(roles)
    every = [r.name for r in adapter_for(model).linears(model)]
    assert [r.name for r in select_linears(model, ["attn", "mlp"])] == every
    last = roles[-1]
    only = select_linears(model, [last], layers=[0, -1])
    assert [(r.layer, r.role) for r in only] == [(0, last), (tiny.LAYERS - 1, last)]
    # embeddings / LM head are never selected
    for ref in select_linears(model, ["attn", "mlp"]):
        assert ref.module is not model.get_output_embeddings()


def test_select_linears_errors(models):
    model = models["llama"]
    with pytest.raises(PrunekitError, match="unknown module kind 'lm_head'"):
        select_linears(model, ["lm_head"])
    with pytest.raises(PrunekitError, match="unknown module kind 'mpl'"):
        select_linears(model, ["attn", "mpl"])
    with pytest.raises(PrunekitError, match=r"out of range.*3 decoder layers"):
        select_linears(model, ["attn"], layers=[3])
    with pytest.raises(PrunekitError, match="out of range"):
        select_linears(model, ["attn"], layers=[-4])
    with pytest.raises(PrunekitError, match="selects no projection"):
        select_linears(model, ["fc1"])  # llama has gate/up/down, no fc1
    with pytest.raises(PrunekitError, match="selects no projection"):
        select_linears(models["gpt2"], ["q"])  # GPT-2 has a fused qkv
