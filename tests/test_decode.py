"""prunekit.decode: the fast greedy paths give greedy generate's tokens; unsupported models are refused clearly.

No timing here: speed is what benchmarks/decode.py measures and prints.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
import tiny
from prunekit.bench import bench, check_decode
from prunekit.decode import Decoder, decoder_for, fast_generate, unsupported
from prunekit.errors import PrunekitError
from prunekit.realize.cuts import save_cut
from prunekit.surgery import cut_attention_heads, cut_mlp_channels, structure

PROMPT, NEW = 28, 12  # Gemma 3's tiny sliding window is 32: prompt + new tokens pass beyond it


def _prompts(batch: int = 2, seed: int = 0):
    """Random prompts and a mask that left-pads the last one by 3 tokens."""
    ids = torch.randint(1, tiny.VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[-1, :3] = 0
    return ids, mask


def _greedy(model, ids, mask=None, new=NEW, eos=None, pad=0):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                              do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad)


def _assert_same_as_generate(model, mode: str, batch: int = 2) -> None:
    ids, mask = _prompts(batch)
    for attention_mask in (None, mask):
        expected = _greedy(model, ids, attention_mask)
        got = fast_generate(model, ids, NEW, attention_mask=attention_mask, eos_token_id=None, pad_token_id=0,
                            mode=mode)
        assert torch.equal(got, expected), (mode, attention_mask is not None)


def _cut_unevenly(model) -> None:
    """Per-layer widths as adaptive allocation leaves them, and emptied parts: layer 0 keeps half its MLP and two
    of four heads (one of two KV groups under GQA), layer 1 loses every head, layer 2 every MLP channel."""
    cut_mlp_channels(model, 0, range(tiny.FFN // 2))
    cut_attention_heads(model, 0, [0, 1])
    cut_attention_heads(model, 1, [], allow_empty=True)
    cut_mlp_channels(model, 2, [], allow_empty=True)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_static_path_gives_greedy_generate_tokens(tiny_models, family):
    """The eager static-cache loop: the same tokens as generate(do_sample=False), with and without left padding."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    _assert_same_as_generate(model, "static")


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_static_path_on_cut_models_with_uneven_and_empty_layers(tiny_models, family, tmp_path):
    """A cut folder (per-layer widths, a headless attention, an MLP without channels) loaded by load_pruned decodes
    to generate's tokens; the cache takes each layer's own number of KV heads."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    _cut_unevenly(model)
    save_cut(model, tmp_path / "cut", tiny.tokenizer())
    loaded = prunekit.load_pruned(tmp_path / "cut")
    assert [layer["heads"] for layer in structure(loaded)][1] == 0
    _assert_same_as_generate(loaded, "static")


def test_end_token_stops_and_pads_as_generate_does(tiny_llama):
    """A sequence that produced the end token continues with pad; decoding stops once all have (generate's rule)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids, _ = _prompts(3)
    free = _greedy(model, ids, new=NEW)[:, PROMPT:]
    eos = int(free[0, 2])  # the first sequence's third token ends it
    expected = _greedy(model, ids, eos=eos, pad=5)
    got = fast_generate(model, ids, NEW, eos_token_id=eos, pad_token_id=5, mode="static")
    assert torch.equal(got, expected)
    assert (got[0, PROMPT + 3:] == 5).all()
    # every sequence ending at once: both stop early, at the same length
    first = free[:, 0]
    expected = _greedy(model, ids, eos=first.tolist(), pad=5)
    got = fast_generate(model, ids, NEW, eos_token_id=first.tolist(), pad_token_id=5, mode="static")
    assert got.shape[1] == PROMPT + 1 and torch.equal(got, expected)


def test_generation_config_defaults_and_generate_mode(tiny_llama):
    """Without end/pad arguments fast_generate takes the model's generation config, as generate does; mode
    'generate' is generate itself."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids, _ = _prompts(1)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=NEW)
    assert torch.equal(fast_generate(model, ids, NEW, mode="static"), expected)
    assert torch.equal(fast_generate(model, ids, NEW, mode="generate"), expected)


@pytest.mark.slow
def test_compiled_path_gives_greedy_generate_tokens_and_compiles_once(tiny_models, tmp_path):
    """The one compile test: a cut llama (uneven widths, a headless layer) with a left-padded batch; the compiled
    step gives generate's tokens, and a second prompt of the same shape reuses it (no new compilation)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    _cut_unevenly(model)
    ids, mask = _prompts(2)
    decoder = decoder_for(model, "compiled")
    got = fast_generate(model, ids, NEW, attention_mask=mask, eos_token_id=None, pad_token_id=0, mode="compiled")
    assert torch.equal(got, _greedy(model, ids, mask))
    key = (2, PROMPT + NEW - 1, True)  # batch, cache length, padded
    assert list(decoder.compile_s) == [key] and decoder.compile_s[key] > 0
    other, _ = _prompts(2, seed=1)
    got = fast_generate(model, other, NEW, attention_mask=mask, eos_token_id=None, pad_token_id=0, mode="compiled")
    assert torch.equal(got, _greedy(model, other, mask))
    assert decoder_for(model, "compiled") is decoder and len(decoder.compile_s) == 1
    assert decoder.last["steps"] == NEW - 1 and decoder.last["decode_s"] > 0


def test_a_changed_model_gets_a_new_decoder(tiny_llama):
    """A decoder (and any compiled step) belongs to the model as it was: a further cut makes a new one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    first = decoder_for(model, "static")
    assert decoder_for(model, "static") is first
    cut_mlp_channels(model, 0, range(tiny.FFN // 2))
    assert decoder_for(model, "static") is not first
    _assert_same_as_generate(model, "static")


def test_unsupported_models_and_modes_are_refused(tiny_llama):
    """A model with a prunekit runtime (GRIFFIN & co. select weights inside generate), a module that is not a
    transformers model, an unknown mode: clear errors naming generate; generate itself stays available."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert unsupported(model, "compiled") is None and unsupported(model, "static") is None
    with pytest.raises(PrunekitError, match="unknown decode mode 'fast'"):
        Decoder(model, "fast")
    model.__dict__["_prunekit_runtime"] = object()
    for mode in ("static", "compiled"):
        with pytest.raises(PrunekitError, match="runtime.*mode 'generate'"):
            fast_generate(model, torch.ones(1, 4, dtype=torch.long), 2, mode=mode)
    assert unsupported(model, "generate") is None
    with pytest.raises(PrunekitError, match="not a transformers model.*'generate'"):
        Decoder(torch.nn.Linear(2, 2), "static")


def test_bench_takes_one_path_for_all_models(tiny_llama):
    """bench measures every model along each requested path (speed-up against the baseline on the same path); a
    path one model cannot take is refused before measuring."""
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    cut = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    cut_mlp_channels(cut, 0, range(tiny.FFN // 2))
    rows = bench({"dense": dense, "cut": cut}, batch_sizes=(1,), prompt_len=8, new_tokens=3, repeats=1,
                 progress=False, decodes=("generate", "static"))
    assert {(r["model"], r["decode"]) for r in rows} == {(m, d) for m in ("dense", "cut")
                                                         for d in ("generate", "static")}
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["cpu_ms_per_token"] >= 0 and "compile_s" not in r
        if r["model"] == "dense":
            assert r["decode_speedup"] == 1
    cut.__dict__["_prunekit_runtime"] = object()
    with pytest.raises(PrunekitError, match="--decode static cannot decode cut.*--decode generate"):
        check_decode({"dense": dense, "cut": cut}, ("static",))
    check_decode({"dense": dense, "cut": cut}, ("generate",))


def test_cut_folder_says_how_to_decode_fast(tiny_llama, tmp_path):
    """The folder's record (prunekit.json 'loading', from save_cut) names prunekit.fast_generate."""
    from prunekit.cli import main

    assert main(["prune", "--model", str(tiny_llama), "--strategy", "magnitude-sp", "--strategy.sparsity", "0.5",
                 "--data.seq_len", "32", "--data.num_samples", "2", "--data.eval_samples", "1", "--eval_dense",
                 "false", "--trainer.logger", "false", "--output_dir", str(tmp_path / "cut")]) == 0
    record = json.loads((tmp_path / "cut" / "prunekit.json").read_text())
    assert "prunekit.fast_generate" in record["loading"]["decode"]


@pytest.mark.real
def test_fast_paths_give_generate_tokens_on_a_cut_smollm2():
    """The real SmolLM2-135M cut unevenly (as FLAP's adaptive allocation leaves it): the static and compiled paths
    decode the same greedy tokens as transformers' generate from real prompts: one sequence (static) and a
    left-padded pair (static and compiled)."""
    from prunekit.models import load_tokenizer
    from prunekit.module import PrunableLM

    model, tokenizer = PrunableLM("smollm2-135m").model.eval(), load_tokenizer("smollm2-135m")
    for layer in range(0, 30, 3):
        cut_mlp_channels(model, layer, range(0, 1536, 2))
        cut_attention_heads(model, layer + 1, range(6))  # drops the last of three KV groups (3 query heads each)
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for ids, mask in ((batch.input_ids[:1, -5:], None), (batch.input_ids, batch.attention_mask)):
        expected = _greedy(model, ids, mask, new=16, pad=pad)
        for mode in ("static", "compiled") if mask is not None else ("static",):  # one compilation: the padded pair
            got = fast_generate(model, ids, 16, attention_mask=mask, eos_token_id=None, pad_token_id=pad, mode=mode)
            assert torch.equal(got, expected), (mode, ids.shape)
