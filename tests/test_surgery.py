"""MLP channel surgery: the physically cut model computes what the zeroed model computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.surgery import CONSUMERS, cut_mlp_channels, mlp_width


def _zero_channels(model, layer, drop):
    for ref in adapter_for(model).linears(model):
        if ref.layer == layer and ref.role in CONSUMERS:
            ref.weight[:, drop] = 0


def _assert_same_behaviour(cut, zeroed, seed: int, length: int = 24) -> None:
    """Same logits and the same greedy generation (with KV cache) as the model with zeroed columns."""
    ids = torch.randint(0, tiny.VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, zeroed(ids).logits, rtol=1e-5, atol=1e-5)
        out = cut.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True)
        ref = zeroed.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_cut_equals_zeroed_and_generates(tiny_models, family):
    torch.manual_seed(0)
    cut = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    zeroed = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    before = sum(p.numel() for p in cut.parameters())
    widths = {}
    for layer, fraction in enumerate((0.5, 0.25, 0.75)):  # per-layer widths differ
        width = mlp_width(cut, layer)
        keep = torch.randperm(width)[: int(width * (1 - fraction))].sort().values
        drop = torch.tensor(sorted(set(range(width)) - set(keep.tolist())))
        cut_mlp_channels(cut, layer, keep)
        _zero_channels(zeroed, layer, drop)
        widths[layer] = keep.numel()
    assert {layer: mlp_width(cut, layer) for layer in widths} == widths
    removed = sum((tiny.FFN - w) for w in widths.values())
    per_channel = 3 * tiny.HIDDEN if family in ("llama", "gemma3_text") else 2 * tiny.HIDDEN + 1  # + fc1 bias
    assert sum(p.numel() for p in cut.parameters()) == before - removed * per_channel
    _assert_same_behaviour(cut, zeroed, seed=1)


def test_cut_rejects_bad_indices(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(PrunekitError, match=r"in \[0, 128\)"):
        cut_mlp_channels(model, 0, [0, 500])
    with pytest.raises(PrunekitError, match="keep at least one"):
        cut_mlp_channels(model, 0, [])


def _zero_heads(model, layer, drop_heads, head_dim):
    cols = (torch.as_tensor(drop_heads).unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()
    for ref in adapter_for(model).linears(model):
        if ref.layer == layer and ref.role == "o":
            ref.weight[:, cols] = 0


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_head_cut_equals_zeroed_and_generates(tiny_models, family):
    from prunekit.surgery import attention_heads, cut_attention_heads

    cut = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    zeroed = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    _, _, d = adapter_for(cut).attention_shape(cut.config)
    n_q, n_kv = attention_heads(cut, 0)
    # layer 0: drop a whole KV group (GQA) or two heads; layer 1: one query head per group; layer 2: keep one head
    plans = {0: [2, 3], 1: [0, 2] if n_kv < n_q else [0, 1, 3], 2: [1]} if n_kv < n_q else {0: [0, 1], 1: [0, 1, 3], 2: [1]}
    before = sum(p.numel() for p in cut.parameters())
    for layer, keep in plans.items():
        cut_attention_heads(cut, layer, keep)
        _zero_heads(zeroed, layer, sorted(set(range(n_q)) - set(keep)), d)
        assert attention_heads(cut, layer)[0] == len(keep)
    assert sum(p.numel() for p in cut.parameters()) < before
    _assert_same_behaviour(cut, zeroed, seed=2)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_empty_layers_when_allowed(tiny_models, family, tmp_path):
    """A layer without heads and one without channels: zeroed-model logits, cached generation, reload."""
    from prunekit import load_pruned
    from prunekit.realize.cuts import save_cut as save_pruned
    from prunekit.surgery import attention_heads, cut_attention_heads

    cut = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    zeroed = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    _, _, d = adapter_for(cut).attention_shape(cut.config)
    n_q, _ = attention_heads(cut, 0)
    for layer in (0, 1):  # layer 0 holds the cache length generate() reads
        cut_attention_heads(cut, layer, [], allow_empty=True)
        _zero_heads(zeroed, layer, list(range(n_q)), d)
        assert attention_heads(cut, layer) == (0, 0)
    cut_mlp_channels(cut, 2, [], allow_empty=True)
    _zero_channels(zeroed, 2, list(range(tiny.FFN)))
    assert mlp_width(cut, 2) == 0
    _assert_same_behaviour(cut, zeroed, seed=7)
    save_pruned(cut, tmp_path / "m", tiny.tokenizer())
    ids = torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(tmp_path / "m")(ids).logits, cut(ids).logits, rtol=0, atol=0)


def test_gqa_needs_consistent_heads_per_group(tiny_llama):
    from prunekit.surgery import cut_attention_heads

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # 4 query heads, 2 KV groups of 2
    with pytest.raises(PrunekitError, match=r"same number of kept query heads in every kept KV group, got \[2, 1\]"):
        cut_attention_heads(model, 0, [0, 1, 2])
    with pytest.raises(PrunekitError, match="keep at least one"):
        cut_attention_heads(model, 0, [])


@pytest.mark.parametrize("keep", [[3, 4, 5], [0, 1, 3, 4, 6, 7], [2, 5, 8]], ids=["whole-group", "2-per-group", "1-per-group"])
def test_gqa_9_query_3_kv_heads(tmp_path, keep):
    """SmolLM2's attention shape: 9 query heads in 3 KV groups."""
    from transformers import LlamaConfig

    from prunekit.surgery import attention_heads, cut_attention_heads

    config = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64)
    torch.manual_seed(3)
    cut = AutoModelForCausalLM.from_config(config).eval()
    zeroed = AutoModelForCausalLM.from_config(config).eval()
    zeroed.load_state_dict(cut.state_dict())
    cut_attention_heads(cut, 1, keep)
    _zero_heads(zeroed, 1, sorted(set(range(9)) - set(keep)), 8)
    kv = len({h // 3 for h in keep})
    assert attention_heads(cut, 1) == (len(keep), kv)
    assert cut.model.layers[1].self_attn.num_key_value_groups == len(keep) // kv
    _assert_same_behaviour(cut, zeroed, seed=4, length=16)


def test_reload_in_a_fresh_process_gives_identical_logits(tiny_models, tmp_path):
    """Per-layer widths, GQA heads and an added bias survive save → load_pruned in another process."""
    import subprocess
    import sys

    from prunekit.realize.cuts import STRUCTURE_FILE, save_cut as save_pruned
    from prunekit.surgery import attention_heads, cut_attention_heads

    ids = torch.randint(0, tiny.VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    expected = {}
    for family, folder in tiny_models.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        for layer, keep in enumerate(([0, 5, 9], list(range(0, 128, 2)), list(range(100)))):
            cut_mlp_channels(model, layer, keep)
        n_q, n_kv = attention_heads(model, 1)
        cut_attention_heads(model, 1, [2, 3] if n_kv < n_q else [0, 2, 3])
        o = next(r for r in adapter_for(model).linears(model) if r.layer == 2 and r.role == "o")
        if o.module.bias is None:  # what bias compensation adds to bias-free models
            o.module.bias = torch.nn.Parameter(torch.randn(o.out_features) * 0.1, requires_grad=False)
        save_pruned(model, tmp_path / family, tiny.tokenizer())
        assert (tmp_path / family / STRUCTURE_FILE).is_file()
        with torch.no_grad():
            expected[family] = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\nfrom prunekit import load_pruned\nids = torch.load(sys.argv[1] + '/ids.pt')\n"
        f"out = {{f: load_pruned(sys.argv[1] + '/' + f)(ids).logits for f in {list(tiny_models)!r}}}\n"
        "torch.save(out, sys.argv[1] + '/reloaded.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    reloaded = torch.load(tmp_path / "reloaded.pt")
    for family in tiny_models:
        torch.testing.assert_close(reloaded[family], expected[family], rtol=0, atol=0, msg=family)


def test_uniform_widths_load_with_plain_automodel(tiny_models, tmp_path):
    """Uniform cut widths (+ compensation biases) → a config plain ``from_pretrained`` rebuilds exactly.

    Families whose head size follows hidden/heads (OPT, GPT-2, GPT-NeoX) can state a cut MLP width but not
    cut heads; for those the folder says so and still loads through ``load_pruned``.
    """
    import json

    from prunekit import load_pruned
    from prunekit.realize.cuts import STRUCTURE_FILE, save_cut as save_pruned
    from prunekit.surgery import attention_heads, cut_attention_heads

    ids = torch.randint(0, tiny.VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    for family, folder in tiny_models.items():
        for cut_heads in (False, True):
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            for layer in range(tiny.LAYERS):
                cut_mlp_channels(model, layer, list(range(0, tiny.FFN, 2)))
                if cut_heads:
                    n_q, n_kv = attention_heads(model, layer)
                    cut_attention_heads(model, layer, [0, 1] if n_kv < n_q else [0, 2])
                biased = ("o", "down") if family == "llama" else ("o",)  # Gemma 3's config has no mlp_bias
                for ref in adapter_for(model).linears(model):
                    if ref.layer == layer and ref.role in biased and ref.module.bias is None:
                        ref.module.bias = torch.nn.Parameter(torch.randn(ref.out_features) * 0.1, requires_grad=False)
            out = tmp_path / f"{family}-{cut_heads}"
            plain = save_pruned(model, out, tiny.tokenizer())["plain"]
            assert json.loads((out / STRUCTURE_FILE).read_text())["plain_loadable"] == plain
            with torch.no_grad():
                expected = model(ids).logits
                torch.testing.assert_close(load_pruned(out)(ids).logits, expected, rtol=0, atol=0)
                if family in ("llama", "gemma3_text") or not cut_heads:
                    assert plain, (family, cut_heads)
                    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
                    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0, msg=family)
                else:
                    assert not plain, (family, cut_heads)


def test_non_uniform_widths_are_not_plain_loadable(tiny_models, tmp_path):
    from prunekit.realize.cuts import plain_config

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    cut_mlp_channels(model, 0, list(range(10)))
    reason = plain_config(model)
    assert isinstance(reason, str) and "layer 0: 10, layer 1: 128" in reason and "MLP width" in reason
