"""GRIFFIN (prompt-phase feed-forward experts): scores and experts against a direct computation, the dense prompt,
sparse generation against the dense model with the other neurons' consumer columns zeroed, the modes (gen, class,
prefix, auto through ``Runtime.scoring``), batches (left padding, the shared rule), the variants, bad input, and
the CLI (prune, load_pruned in this and a fresh process, composition with a static cut, eval --runtime)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from prunekit.arch import adapter_for
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.strategies.griffin.runtime import (CACHE_ATTR, GriffinRuntime, magnitude_scores, neuron_scores,
                                                 select, shared_scores)
from prunekit.strategies.griffin.strategy import Griffin

FAMILIES = tiny.FAMILIES
DATA = ["--data.eval_samples", "2", "--data.seq_len", "64", "--data.num_samples", "4"]
GREEDY = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---------------------------------------------------------------------------------------------- helpers
def _model(family: str, seed: int = 0):
    """A tiny random model; its biases (zeros at initialisation) random too, so a lost bias shows."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny.config(family)).eval()
    for ref in adapter_for(model).linears(model):
        if getattr(ref.module, "bias", None) is not None:
            ref.module.bias.data.normal_(0, 0.1)
    return model


def _pair(family: str, **options):
    """(model with GRIFFIN installed, an identical dense model, the runtime)."""
    dense = _model(family)
    model = copy.deepcopy(dense)
    rt = GriffinRuntime(**{"density": 0.5, **options})
    rt.install(model)
    return model, dense, rt


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, tiny.VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):], mask[b, width - len(s):] = s, 1
    return ids, mask


def _consumers(model) -> dict:
    return {r.layer: r for r in adapter_for(model).linears(model) if r.role in ("down", "fc2")}


@contextmanager
def _capture(model, batch: int):
    """z (B, T, D) at every consumer, for the forwards inside the block (one entry per forward per layer)."""
    seen: dict[int, list[torch.Tensor]] = {}

    def grab(layer):
        def hook(module, args):
            z = args[0].detach().clone()
            seen.setdefault(layer, []).append(z.view(batch, -1, z.shape[-1]))
        return hook

    hooks = [ref.module.register_forward_pre_hook(grab(i)) for i, ref in _consumers(model).items()]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _assert_step_is_masked_dense(model, dense, out, ids, nxt, experts) -> None:
    """One generation step of ``model`` after the prompt ``ids`` (its output ``out``) equals the dense model's step
    with every neuron outside each row's experts zeroed (1e-6)."""
    step = model(nxt, past_key_values=out.past_key_values).logits
    d = dense(ids, use_cache=True)
    with _masked(dense, experts):
        torch.testing.assert_close(step, dense(nxt, past_key_values=d.past_key_values).logits, rtol=0, atol=1e-6)


@contextmanager
def _masked(model, experts: dict[int, torch.Tensor], where: torch.Tensor | None = None):
    """Zero, at every consumer's input, the neurons outside row b's experts (at positions ``where`` (B, T), or
    everywhere): the dense model with the other neurons' consumer columns zeroed."""

    def hook_for(layer):
        def hook(module, args):
            z = args[0]
            batch = experts[layer].shape[0]
            z3 = z.view(batch, -1, z.shape[-1])
            keep = torch.zeros(batch, z.shape[-1], dtype=z.dtype).scatter_(1, experts[layer], 1.0)
            keep = keep.unsqueeze(1).expand_as(z3)
            if where is not None:
                keep = torch.where(where.unsqueeze(-1), keep, torch.ones_like(keep))
            return ((z3 * keep).view(z.shape),)
        return hook

    hooks = [ref.module.register_forward_pre_hook(hook_for(i)) for i, ref in _consumers(model).items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _hand_scores(z: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """s (B, D) by the paper's formula, token by token in float64: Z̄_t = z_t/‖z_t‖, s_j = ‖Z̄_{·,j}‖."""
    rows = []
    for b in range(z.shape[0]):
        acc = torch.zeros(z.shape[-1], dtype=torch.float64)
        for t in range(z.shape[1]):
            if real[b, t]:
                zt = z[b, t].double()
                acc += (zt / zt.norm()) ** 2
        rows.append(acc.sqrt())
    return torch.stack(rows)


def _assert_top(rows: torch.Tensor, s: torch.Tensor, k: int, what: str = "") -> None:
    """``rows`` (k,) are the top-k of ``s`` (D,): sorted ascending, distinct, exactly the top-k set when the
    k-th and (k+1)-th scores are apart; with a near tie at the boundary, any top-k set."""
    assert rows.dtype == torch.long and rows.shape == (k,), (what, rows.shape, k)
    assert torch.equal(rows, rows.sort().values) and rows.unique().numel() == k, what
    values, order = s.sort(descending=True)
    if k < s.numel() and values[k - 1] - values[k] > 1e-6 * values[0]:
        assert torch.equal(rows, order[:k].sort().values), what
    else:
        assert s[rows].min() >= values[k - 1] - 1e-6 * values[0], what


def _experts_after_generate(rt, out) -> dict[int, torch.Tensor]:
    return rt.experts_of(out.past_key_values)


# ---------------------------------------------------------------------------------------------- 1. scores
@pytest.mark.parametrize("family", FAMILIES)
def test_experts_equal_a_direct_computation(family):
    """s and E from the consumer inputs captured in a prompt forward, by hand, equal the runtime's experts."""
    model, _, rt = _pair(family)
    ids = _ids(2, 12)
    with _capture(model, 2) as seen:
        out = model(ids, use_cache=True)
    experts = rt.experts_of(out.past_key_values)
    consumers = _consumers(model)
    assert sorted(experts) == sorted(consumers) == list(range(tiny.LAYERS))
    for i, ref in consumers.items():
        width = ref.weight.shape[1]
        k = int(0.5 * width)
        assert len(seen[i]) == 1 and seen[i][0].shape == (2, 12, width)
        s = _hand_scores(seen[i][0], torch.ones(2, 12, dtype=torch.bool))
        torch.testing.assert_close(neuron_scores(seen[i][0], torch.ones(2, 12, dtype=torch.bool)).double(), s,
                                   rtol=1e-5, atol=1e-6)
        assert experts[i].shape == (2, k)
        for b in range(2):
            _assert_top(experts[i][b], s[b], k, f"{family} layer {i} row {b}")
    assert not torch.equal(experts[0][0], experts[0][1])  # per sequence, not one set for the batch


def test_per_layer_density_gives_per_layer_k():
    model, dense, rt = _pair("llama", density=[1.0, 0.5, 0.25])
    ids = _ids(1, 10)
    out = model(ids, use_cache=True)
    experts = rt.experts_of(out.past_key_values)
    assert [experts[i].shape[1] for i in (1, 2)] == [int(0.5 * tiny.FFN), int(0.25 * tiny.FFN)]
    if 0 in experts:  # layer 0 keeps its full width: it may be reported with every neuron, or left out (dense)
        assert torch.equal(experts[0][0], torch.arange(tiny.FFN))
    experts = {i: experts.get(i, torch.arange(tiny.FFN)[None]) for i in range(3)}
    step = model(_ids(1, 1, 5), past_key_values=out.past_key_values).logits
    d = dense(ids, use_cache=True)
    with _masked(dense, experts):
        expected = dense(_ids(1, 1, 5), past_key_values=d.past_key_values).logits
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 2-4. exactness
@pytest.mark.parametrize("family", FAMILIES)
def test_density_one_is_the_dense_model(family):
    model, dense, rt = _pair(family, density=1.0)
    ids = _ids(2, 9)
    out = model(ids, use_cache=True)
    assert torch.equal(out.logits, dense(ids).logits)
    for e in rt.experts_of(out.past_key_values).values():  # a layer at full width may be left out (dense)
        assert torch.equal(e, torch.arange(tiny.FFN).expand(2, -1))
    mask = torch.ones_like(ids)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
    want = dense.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logits_are_the_dense_models(family):
    model, dense, rt = _pair(family, mode="gen")
    ids = _ids(2, 11, seed=3)
    out = model(ids, use_cache=True)
    assert torch.equal(out.logits, dense(ids).logits)
    assert getattr(out.past_key_values, CACHE_ATTR, None) is not None
    assert torch.equal(model(ids).logits, dense(ids).logits)  # a plain call (auto/gen) too


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_is_the_dense_model_with_other_columns_zeroed(family):
    """Two sequences with different experts (the union/keep path): the first decode step equals the dense model
    whose consumer sees only each sequence's own experts."""
    model, dense, rt = _pair(family)
    ids, nxt = _ids(2, 10, seed=4), _ids(2, 1, seed=5)
    out = model(ids, use_cache=True)
    experts = rt.experts_of(out.past_key_values)
    step = model(nxt, past_key_values=out.past_key_values).logits
    d = dense(ids, use_cache=True)
    plain = dense(nxt, past_key_values=copy.deepcopy(d.past_key_values)).logits
    with _masked(dense, experts):
        expected = dense(nxt, past_key_values=d.past_key_values).logits
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-6)
    assert (step - plain).abs().max() > 1e-4  # the step is sparse, not dense
    # a second step keeps the same experts
    nxt2 = _ids(2, 1, seed=6)
    step2 = model(nxt2, past_key_values=out.past_key_values).logits
    with _masked(dense, experts):
        expected2 = dense(nxt2, past_key_values=d.past_key_values).logits
    torch.testing.assert_close(step2, expected2, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 5. prefix
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_mode_equals_prefill_then_cached_decode(family):
    P, T = 6, 15
    model, _, rt = _pair(family, mode="prefix", prefix=P)
    ids = _ids(1, T, seed=7)
    one = model(ids, use_cache=True)
    experts_one = rt.experts_of(one.past_key_values)
    rt.configure(mode="gen")
    pre = model(ids[:, :P], use_cache=True)
    cache = pre.past_key_values
    experts_pre = rt.experts_of(cache)
    logits = [pre.logits[:, P - 1]]
    for t in range(P, T):
        logits.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    stepwise = torch.stack(logits, 1)
    assert experts_one.keys() == experts_pre.keys()
    assert all(torch.equal(experts_one[i], experts_pre[i]) for i in experts_pre)
    torch.testing.assert_close(one.logits[:, P - 1:], stepwise, rtol=0, atol=1e-5)
    # the prefix itself is dense (a 6-token and a 15-token forward may round differently: CPU kernels pick their
    # blocking by shape, so this compares to float tolerance, as the decoded part above)
    torch.testing.assert_close(one.logits[:, :P], pre.logits, rtol=0, atol=1e-6)


def test_prefix_counts_real_tokens_of_left_padded_rows():
    P = 4
    model, _, rt = _pair("llama", mode="prefix", prefix=P)
    seqs = [_ids(1, 12, seed=8)[0], _ids(1, 7, seed=9)[0]]
    ids, mask = _left_pad(seqs)
    batch = model(ids, attention_mask=mask, use_cache=True)
    eb = rt.experts_of(batch.past_key_values)
    for b, s in enumerate(seqs):
        alone = model(s[None], use_cache=True)
        ea = rt.experts_of(alone.past_key_values)
        assert all(torch.equal(eb[i][b], ea[i][0]) for i in ea), b
        torch.testing.assert_close(batch.logits[b, -len(s):][P - 1:], alone.logits[0, P - 1:], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- 6-7. batches
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_generates_what_each_sequence_generates_alone(family):
    model, _, rt = _pair(family)
    seqs = [_ids(1, n, seed=10 + n)[0] for n in (12, 7, 9)]
    ids, mask = _left_pad(seqs)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, **GREEDY)
    eb = _experts_after_generate(rt, batch)
    for b, s in enumerate(seqs):
        alone = model.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), max_new_tokens=5,
                               **GREEDY)
        ea = _experts_after_generate(rt, alone)
        for i in ea:
            assert torch.equal(eb[i][b], ea[i][0]), (family, b, i)
        assert torch.equal(batch.sequences[b, ids.shape[1]:], alone.sequences[0, len(s):]), (family, b)
        for step in (0, 1):
            torch.testing.assert_close(batch.logits[step][b], alone.logits[step][0], rtol=0, atol=1e-5)


def test_a_then_b_equals_b_alone():
    model, _, rt = _pair("llama")
    a, b, one = _ids(2, 10, seed=20), _ids(1, 8, seed=21), _ids(1, 1, seed=22)
    first = model.generate(a, attention_mask=torch.ones_like(a), max_new_tokens=5, **GREEDY)
    after_a = model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=5, **GREEDY)
    after_b = model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=5, **GREEDY)
    for got, alone in ((after_a, b), (after_b, one)):  # each against a fresh model that saw nothing before
        fresh_model, _, fresh = _pair("llama")
        want = fresh_model.generate(alone, attention_mask=torch.ones_like(alone), max_new_tokens=5, **GREEDY)
        assert torch.equal(got.sequences, want.sequences)
        assert all(torch.equal(x, y) for x, y in zip(got.logits, want.logits))
        e_got, e_want = rt.experts_of(got.past_key_values), fresh.experts_of(want.past_key_values)
        assert e_got.keys() == e_want.keys() and all(torch.equal(e_got[i], e_want[i]) for i in e_want)
    assert rt.experts_of(first.past_key_values)[0].shape[0] == 2  # A's experts stay on A's cache


# ---------------------------------------------------------------------------------------------- 8. class
@pytest.mark.parametrize("family", FAMILIES)
def test_class_mode(family):
    """Experts from every real token but the last; only the last position differs from dense, and it equals the
    dense model restricted to the experts there."""
    model, dense, rt = _pair(family, mode="class")
    seqs = [_ids(1, 10, seed=30)[0], _ids(1, 6, seed=31)[0]]
    ids, mask = _left_pad(seqs)
    with _capture(dense, 2) as seen:
        want = dense(ids, attention_mask=mask).logits
    got = model(ids, attention_mask=mask, use_cache=True)
    experts = rt.experts_of(got.past_key_values)
    real = mask.bool().clone()
    real[:, -1] = False  # left padding: every row's last real token is the last position
    for i, e in experts.items():
        s = _hand_scores(seen[i][0], real)
        for b in range(2):
            _assert_top(e[b], s[b], int(0.5 * tiny.FFN), f"{family} layer {i} row {b}")
    assert torch.equal(got.logits[:, :-1], want[:, :-1])
    last = torch.zeros_like(mask, dtype=torch.bool)
    last[:, -1] = True
    with _masked(dense, experts, where=last):
        restricted = dense(ids, attention_mask=mask).logits
    torch.testing.assert_close(got.logits[:, -1], restricted[:, -1], rtol=0, atol=1e-6)
    assert (got.logits[:, -1] - want[:, -1]).abs().amax(-1).min() > 1e-4


def test_scoring_purposes_select_the_modes_under_auto():
    from prunekit.plans import RuntimePolicy
    from prunekit.realize.runtime import RuntimePolicyRealizer, runtime_of, scoring

    dense = _model("llama")
    model = copy.deepcopy(dense)
    rt = GriffinRuntime(density=0.5)
    RuntimePolicyRealizer().apply(model, RuntimePolicy(runtime=rt))
    assert runtime_of(model) is rt
    ref = {m: _pair("llama", **opts) for m, opts in
           (("class", dict(mode="class")), ("prefix", dict(mode="prefix", prefix=6)), ("gen", dict(mode="gen")))}
    ids = _ids(2, 12, seed=40)
    for purpose, seq_len, mode in (("loglikelihood", None, "class"), ("perplexity", 12, "prefix"),
                                   ("generate", None, "gen"), (None, None, "gen")):
        if purpose is None:
            got = model(ids, use_cache=True)
        else:
            with scoring(model, purpose, seq_len=seq_len):
                got = model(ids, use_cache=True)
        rmodel, _, rrt = ref[mode]
        want = rmodel(ids, use_cache=True)
        assert torch.equal(got.logits, want.logits), purpose
        e_got, e_want = rt.experts_of(got.past_key_values), rrt.experts_of(want.past_key_values)
        assert all(torch.equal(e_got[i], e_want[i]) for i in e_want), purpose
    with scoring(model, "loglikelihood"):
        assert not torch.equal(model(ids).logits, dense(ids).logits)
    assert torch.equal(model(ids).logits, dense(ids).logits)  # the context is over


# ---------------------------------------------------------------------------------------------- 9. shared
def test_shared_batch_rule_is_one_set_from_the_summed_normalised_scores():
    model, dense, rt = _pair("llama", batch_rule="shared")
    seqs = [_ids(1, 10, seed=50)[0], _ids(1, 6, seed=51)[0]]
    ids, mask = _left_pad(seqs)
    with _capture(dense, 2) as seen:
        dense(ids, attention_mask=mask)
    out = model(ids, attention_mask=mask, use_cache=True)
    experts = rt.experts_of(out.past_key_values)
    k = int(0.5 * tiny.FFN)
    for i, e in experts.items():
        s = _hand_scores(seen[i][0], mask.bool())
        total = s[0] / len(seqs[0]) ** 0.5 + s[1] / len(seqs[1]) ** 0.5
        assert torch.equal(e[0], e[1])
        _assert_top(e[0], total, k, f"layer {i}")
        torch.testing.assert_close(shared_scores(s.float(), mask.bool()), total[None].float(), rtol=1e-6, atol=0)
    # generation runs on that one set for both sequences
    nxt = _ids(2, 1, seed=52)
    step = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                 past_key_values=out.past_key_values).logits
    d = dense(ids, attention_mask=mask, use_cache=True)
    with _masked(dense, experts):
        want = dense(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                     past_key_values=d.past_key_values).logits
    torch.testing.assert_close(step, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 10. variants
@pytest.mark.parametrize("variant", ["sample", "topk_sample", "random"])
def test_sampling_variants(variant):
    ids = _ids(2, 12, seed=60)
    model, dense, rt = _pair("llama", variant=variant, seed=3)
    with _capture(dense, 2) as seen:
        dense(ids)
    experts = rt.experts_of(model(ids, use_cache=True).past_key_values)
    k = int(0.5 * tiny.FFN)
    for i, e in experts.items():
        assert e.shape == (2, k) and e.dtype == torch.long
        for row in e:
            assert torch.equal(row, row.sort().values) and row.unique().numel() == k
            assert 0 <= int(row.min()) and int(row.max()) < tiny.FFN
        if variant == "topk_sample":
            s = _hand_scores(seen[i][0], torch.ones(2, 12, dtype=torch.bool))
            for b in range(2):
                top = s[b].topk(k // 2).indices
                assert set(top.tolist()) <= set(e[b].tolist()), (i, b)
    # same seed, same prompt: the same experts (another model, another runtime, another batch composition)
    again_model, _, again = _pair("llama", variant=variant, seed=3)
    alone = again.experts_of(again_model(ids[1:], use_cache=True).past_key_values)
    with_other = again.experts_of(again_model(torch.cat([ids[1:], _ids(1, 12, seed=61)]), use_cache=True)
                                  .past_key_values)
    for i in experts:
        assert torch.equal(alone[i][0], experts[i][1]) and torch.equal(with_other[i][0], experts[i][1])
    other_model, _, other = _pair("llama", variant=variant, seed=4)
    different = other.experts_of(other_model(ids, use_cache=True).past_key_values)
    assert any(not torch.equal(different[i], experts[i]) for i in experts)
    # the generation uses the sampled experts
    out = model(ids, use_cache=True)
    experts = rt.experts_of(out.past_key_values)
    nxt = _ids(2, 1, seed=62)
    _assert_step_is_masked_dense(model, dense, out, ids, nxt, experts)


def test_sample_draws_zero_score_neurons_last():
    """ReLU (OPT), one-token prompt: many s_j = 0; positive-score neurons are drawn before any zero one."""
    model, dense, rt = _pair("opt", variant="sample", density=0.75)
    k = int(0.75 * tiny.FFN)
    for seed in range(3):
        ids = _ids(1, 1, seed=70 + seed)
        with _capture(dense, 1) as seen:
            dense(ids)
        experts = rt.experts_of(model(ids, use_cache=True).past_key_values)
        for i, e in experts.items():
            positive = set((seen[i][0][0, 0] > 0).nonzero().flatten().tolist())
            chosen = set(e[0].tolist())
            assert len(chosen) == k
            assert positive <= chosen if len(positive) <= k else chosen <= positive, (seed, i, len(positive))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_magnitude_variant_is_one_static_set(family):
    model, dense, rt = _pair(family, variant="magnitude")
    ids = _ids(2, 9, seed=80)
    out = model(ids, use_cache=True)
    assert torch.equal(out.logits, dense(ids).logits)
    experts = rt.experts_of(out.past_key_values)
    k = int(0.5 * tiny.FFN)
    for i, e in experts.items():
        if family == "llama":
            mlp = dense.model.layers[i].mlp
            score = mlp.gate_proj.weight.double().norm(dim=1) * mlp.up_proj.weight.double().norm(dim=1)
        elif family == "opt":
            score = dense.model.decoder.layers[i].fc1.weight.double().norm(dim=1)
        else:  # GPT-2's Conv1D stores (in, out): neuron j is column j
            score = dense.transformer.h[i].mlp.c_fc.weight.double().norm(dim=0)
        assert e.shape == (2, k) and torch.equal(e[0], e[1])
        _assert_top(e[0], score, k, f"layer {i}")
    nxt = _ids(2, 1, seed=81)
    _assert_step_is_masked_dense(model, dense, out, ids, nxt, experts)
    refs = {r.role: r.weight for r in adapter_for(dense).linears(dense) if r.layer == 0 and r.role in ("gate", "up", "fc1")}
    assert torch.equal(magnitude_scores(refs).topk(k).indices.sort().values, experts[0][0])


@pytest.mark.parametrize("variant", ["topk", "magnitude"])
def test_generation_follows_the_model_to_another_dtype(variant):
    """Experts' weights are gathered from the model's current weights: after ``model.to(dtype)`` (or a device
    move) between two generations, the second still runs, on the new weights."""
    model, dense, rt = _pair("llama", variant=variant)
    ids = _ids(1, 6, seed=85)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, **GREEDY)
    model.to(torch.float64)
    dense.to(torch.float64)
    out = model(ids, use_cache=True)
    experts = rt.experts_of(out.past_key_values)
    nxt = _ids(1, 1, seed=86)
    step = model(nxt, past_key_values=out.past_key_values).logits
    d = dense(ids, use_cache=True)
    with _masked(dense, experts):
        want = dense(nxt, past_key_values=d.past_key_values).logits
    assert step.dtype == torch.float64
    torch.testing.assert_close(step, want, rtol=0, atol=1e-10)


def test_scores_guard_an_all_zero_token():
    """A token whose z is all zeros adds nothing (ε guards its norm) instead of NaNs."""
    z = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    z[0, 2] = 0
    prompt = torch.ones(1, 4, dtype=torch.bool)
    s = neuron_scores(z, prompt)
    assert torch.isfinite(s).all()
    without = prompt.clone()
    without[0, 2] = False
    torch.testing.assert_close(s, neuron_scores(z, without))
    torch.testing.assert_close(s.double(), _hand_scores(z, without), rtol=1e-6, atol=1e-7)


def test_decode_macs_count_the_experts_width():
    model, _, rt = _pair("llama", density=[0.5, 0.25, 1.0])
    total = 0
    for ref in adapter_for(model).linears(model):
        n = ref.weight.numel()
        if ref.role in ("gate", "up", "down"):
            n = int(n * int([0.5, 0.25, 1.0][ref.layer] * tiny.FFN) / tiny.FFN)
        total += n
    assert rt.decode_macs(model) == total


def test_select_function_contract():
    s = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.0, 0.5], [0.6, 0.0, 0.2, 0.8, 0.4, 0.1]])
    top = select(s, 3, "topk", [None, None])
    assert top.tolist() == [[1, 3, 5], [0, 3, 4]]
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    half = select(s, 3, "topk_sample", gens)
    assert 1 in half[0].tolist() and 3 in half[1].tolist()
    with pytest.raises(PrunekitError, match="variant"):
        select(s, 3, "bogus", [None, None])


# ---------------------------------------------------------------------------------------------- 11. one token
@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_prompt_chooses_from_that_token(family):
    model, dense, rt = _pair(family, mode="gen")
    ids = _ids(2, 1, seed=90)
    with _capture(dense, 2) as seen:
        dense(ids)
    out = model(ids, use_cache=True)
    experts = rt.experts_of(out.past_key_values)
    for i, e in experts.items():
        z = seen[i][0][:, 0].double()
        s = z.abs() / z.norm(dim=-1, keepdim=True)
        for b in range(2):
            _assert_top(e[b], s[b], int(0.5 * tiny.FFN), f"layer {i} row {b}")
    nxt = _ids(2, 1, seed=91)
    _assert_step_is_masked_dense(model, dense, out, ids, nxt, experts)


def test_class_mode_needs_two_tokens_and_the_model_still_works_after():
    model, dense, rt = _pair("llama", mode="class")
    with pytest.raises(PrunekitError, match="class mode"):
        model(_ids(1, 1, seed=92))
    ids, mask = _left_pad([_ids(1, 5, seed=93)[0], _ids(1, 1, seed=94)[0]])
    with pytest.raises(PrunekitError, match="class mode"):
        model(ids, attention_mask=mask)
    rt.configure(mode="gen")
    ok = _ids(1, 5, seed=95)
    out = model(ok, use_cache=True)
    assert torch.equal(out.logits, dense(ok).logits) and rt.experts_of(out.past_key_values)[0].shape == (1, 64)


# ---------------------------------------------------------------------------------------------- 12. bad input
@pytest.mark.parametrize("density", [0, 1.5, -0.1, [0.5, 0, 0.5], [0.5, 1.5, 0.5]])
def test_bad_density(density):
    with pytest.raises(PrunekitError, match="density"):
        GriffinRuntime(density=density)
    with pytest.raises(PrunekitError, match="density"):
        Griffin(density=density)


def test_strategy_refuses_the_densities_the_runtime_refuses():
    """GriffinRuntime refuses a bool density (True is not a fraction); the strategy must not turn it into 1.0."""
    with pytest.raises(PrunekitError, match="density"):
        GriffinRuntime(density=True)
    with pytest.raises(PrunekitError, match="density"):
        Griffin(density=True)


def test_bad_options():
    for kwargs, word in ((dict(variant="bogus"), "variant"), (dict(mode="bogus"), "mode"),
                         (dict(batch_rule="bogus"), "batch_rule"), (dict(mode="prefix"), "prefix"),
                         (dict(mode="prefix", prefix=0), "prefix"), (dict(mode="gen", prefix=3), "prefix")):
        with pytest.raises(PrunekitError, match=word):
            GriffinRuntime(**kwargs)
        with pytest.raises(PrunekitError, match=word):
            Griffin(**kwargs)
    rt = GriffinRuntime()
    with pytest.raises(PrunekitError, match="bogus"):
        rt.configure(bogus=1)
    with pytest.raises(PrunekitError, match="prefix"):
        rt.configure(mode="prefix")
    assert rt.state()["mode"] == "auto" and rt.state()["prefix"] is None  # a refused change leaves it as it was


def test_prefix_beyond_the_sequence_is_refused():
    model, dense, rt = _pair("llama", mode="prefix", prefix=8)
    for length in (8, 5):
        with pytest.raises(PrunekitError, match="prefix"):
            model(_ids(1, length, seed=100))
    ids, mask = _left_pad([_ids(1, 12, seed=101)[0], _ids(1, 8, seed=102)[0]])
    with pytest.raises(PrunekitError, match="prefix"):  # P counts each row's real tokens
        model(ids, attention_mask=mask)
    ok = _ids(1, 9, seed=103)
    assert torch.equal(model(ok).logits[:, :8], dense(ok).logits[:, :8])


def test_decode_on_a_cache_the_runtime_did_not_fill_is_refused():
    model, dense, rt = _pair("llama")
    ids, nxt = _ids(2, 6, seed=110), _ids(2, 1, seed=111)
    foreign = dense(ids, use_cache=True).past_key_values
    with pytest.raises(PrunekitError, match="did not fill"):
        model(nxt, past_key_values=foreign)
    filled = model(ids, use_cache=True).past_key_values
    with pytest.raises(PrunekitError, match="batch"):
        model(nxt[:1], past_key_values=filled)
    with pytest.raises(PrunekitError, match="no GRIFFIN experts"):
        rt.experts_of(foreign)
    out = model(ids, use_cache=True)  # still works after the refusals
    assert torch.equal(out.logits, dense(ids).logits)
    model(nxt, past_key_values=out.past_key_values)


def test_unsupported_families_are_refused_clearly(monkeypatch):
    import transformers as tf

    from prunekit import arch

    torch.manual_seed(0)
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=tiny.VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()
    with pytest.raises(PrunekitError, match="unsupported architecture 'bloom'"):
        Griffin().check(bloom)
    with pytest.raises(PrunekitError, match="unsupported architecture 'bloom'"):
        GriffinRuntime().install(bloom)
    # a family whose adapter has no MLP projections
    no_mlp = {r: p for r, p in arch.ADAPTERS["llama"].linear_paths.items() if r in arch.ATTN_ROLES}
    monkeypatch.setitem(arch.ADAPTERS, "llama", arch.Adapter("llama", ("llama",), "model.layers", no_mlp))
    model = _model("llama")
    with pytest.raises(PrunekitError, match="needs an MLP"):
        Griffin().check(model)
    rt = GriffinRuntime()
    with pytest.raises(PrunekitError, match="needs an MLP"):
        rt.install(model)
    monkeypatch.undo()
    rt.install(model)  # a refused install leaves the runtime installable


def test_strategy_check():
    model = _model("llama")
    with pytest.raises(PrunekitError, match="per-layer densities"):
        Griffin(density=[0.5, 0.5]).check(model)
    Griffin(density=[0.5, 0.5, 0.5]).check(model)
    assert all("forward" not in r.module.__dict__ for r in adapter_for(model).linears(model))  # probe removed
    model.__dict__["_prunekit_runtime"] = GriffinRuntime()
    with pytest.raises(PrunekitError, match="already carries a runtime"):
        Griffin().check(model)
    assert Griffin(density=0.25).sparsity == pytest.approx(0.75)


@pytest.mark.parametrize("variant", ["topk", "sample", "topk_sample", "random", "magnitude"])
def test_density_rounding_to_zero_experts(variant):
    """density 0.004 is in (0, 1] but k = int(0.004 * 128) = 0: the runtime must refuse it with a PrunekitError
    (at install) or run; it must not crash in the middle of generation."""
    model = _model("llama")
    rt = GriffinRuntime(density=0.004, variant=variant)
    try:
        rt.install(model)
    except PrunekitError as e:
        assert "density" in str(e)
        return
    ids = _ids(2, 5, seed=120)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, **GREEDY)


# ---------------------------------------------------------------------------------------------- 13-15. CLI
@contextmanager
def _cwd(path: Path):
    here = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def griffin_folder(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("griffin")
    with _cwd(root):
        assert main(["prune", "--model", str(tiny_llama), "--strategy", "griffin", "--strategy.density", "0.5",
                     *DATA, "--eval_dense", "false", "--output_dir", str(root / "g")]) == 0
    return root / "g"


@pytest.fixture(scope="module")
def composed(tiny_llama, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("composed")
    with _cwd(root):
        assert main(["prune", "--model", str(tiny_llama), "--strategy", "wanda-sp", "--strategy.sparsity", "0.3",
                     "--strategy.prune_heads", "false", *DATA, "--eval_dense", "false",
                     "--output_dir", str(root / "A")]) == 0
        assert main(["prune", "--model", str(root / "A"), "--strategy", "griffin", *DATA, "--eval_dense", "false",
                     "--output_dir", str(root / "B")]) == 0
    return root / "A", root / "B"


PROMPT = [[17, 250, 33, 99, 8, 140, 61, 212, 5, 77, 300, 41]]


def _generate(model, new: int = 6):
    ids = torch.tensor(PROMPT)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, **GREEDY)


def test_cli_prune_and_load(griffin_folder, tiny_llama):
    import prunekit
    from prunekit.models import load_model
    from prunekit.realize.runtime import runtime_of

    record = json.loads((griffin_folder / "prunekit.json").read_text())
    metrics = json.loads((griffin_folder / "metrics.json").read_text())
    assert record["plan"] == "runtime_policy" and record["pruned_by"]["strategy"] == "griffin"
    assert metrics["pruned"]["runtime"]["density"] == 0.5 and metrics["pruned"]["runtime"]["runtime"] == "griffin"
    loaded = prunekit.load_pruned(griffin_folder)
    rt = runtime_of(loaded)
    assert isinstance(rt, GriffinRuntime) and rt.state() == GriffinRuntime(density=0.5).state()
    here = load_model(str(tiny_llama))
    dense = copy.deepcopy(here)
    GriffinRuntime(density=0.5).install(here)
    got, want, plain = _generate(loaded), _generate(here), _generate(dense)
    assert torch.equal(got.sequences, want.sequences)
    # same computation; a reloaded tensor's memory layout may select another CPU kernel (last-bit rounding)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.logits[0], plain.logits[0], rtol=0, atol=1e-6)  # the prompt is dense
    assert not torch.allclose(got.logits[1], plain.logits[1], atol=1e-3)  # generation is not
    e_got, e_want = rt.experts_of(got.past_key_values), rt.experts_of(want.past_key_values)
    assert all(torch.equal(e_got[i], e_want[i]) for i in e_want)


@pytest.mark.slow
def test_cli_folder_generates_the_same_in_a_fresh_process(griffin_folder, tiny_llama):
    from prunekit.models import load_model

    code = ("import sys, json, torch\nimport prunekit\n"
            "m = prunekit.load_pruned(sys.argv[1])\n"
            f"ids = torch.tensor({PROMPT})\n"
            "with torch.no_grad():\n"
            "    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,\n"
            "                     pad_token_id=0)\n"
            "print(json.dumps({'ids': out.tolist(), 'runtime': type(m._prunekit_runtime).__name__}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code, str(griffin_folder)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["runtime"] == "GriffinRuntime"
    here = load_model(str(tiny_llama))
    GriffinRuntime(density=0.5).install(here)
    assert result["ids"] == _generate(here).sequences.tolist()


def test_composition_with_a_static_cut(composed):
    import prunekit
    from prunekit.realize.runtime import runtime_of

    a, b = composed
    cut, both = prunekit.load_pruned(a), prunekit.load_pruned(b)
    widths = {i: ref.weight.shape[1] for i, ref in _consumers(cut).items()}
    assert all(w < tiny.FFN for w in widths.values())  # the static cut happened
    assert {i: ref.weight.shape[1] for i, ref in _consumers(both).items()} == widths
    rt = runtime_of(both)
    assert isinstance(rt, GriffinRuntime)
    sd_cut, sd_both = cut.state_dict(), both.state_dict()
    assert sd_cut.keys() == sd_both.keys() and all(torch.equal(sd_cut[k], sd_both[k]) for k in sd_cut)
    out = _generate(both)
    experts = rt.experts_of(out.past_key_values)
    assert {i: e.shape[1] for i, e in experts.items()} == {i: int(0.5 * w) for i, w in widths.items()}
    here = copy.deepcopy(cut)
    here_rt = GriffinRuntime(density=0.5)
    here_rt.install(here)
    want = _generate(here)
    assert torch.equal(out.sequences, want.sequences)
    for x, y in zip(out.logits, want.logits):  # to float tolerance: see test_cli_prune_and_load
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert not torch.allclose(out.logits[1], _generate(cut).logits[1], atol=1e-3)


def test_eval_runtime_options(composed, tiny_llama, tmp_path, monkeypatch, capsys):
    _, b = composed
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", str(b), "--tasks", "[perplexity]", *DATA, "--output_dir", str(tmp_path / "auto")]) == 0
    assert main(["eval", "--model", str(b), "--tasks", "[perplexity]", "--runtime", "{mode: class}", *DATA,
                 "--output_dir", str(tmp_path / "class")]) == 0
    auto, cls = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("auto", "class"))
    pruned = json.loads((b / "metrics.json").read_text())["pruned"]
    assert auto["runtime"]["mode"] == "auto" and cls["runtime"]["mode"] == "class"
    assert auto["perplexity"] == pytest.approx(pruned["perplexity"], rel=1e-6)
    assert cls["perplexity"] != pytest.approx(auto["perplexity"], rel=1e-9)
    capsys.readouterr()
    assert main(["eval", "--model", str(b), "--tasks", "[perplexity]", "--runtime", "{bogus: 1}", *DATA,
                 "--output_dir", str(tmp_path / "bogus")]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["eval", "--model", str(b), "--tasks", "[perplexity]", "--runtime", "{mode: prefix}", *DATA,
                 "--output_dir", str(tmp_path / "noprefix")]) == 2
    assert "prefix" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_llama), "--tasks", "[perplexity]", "--runtime", "{mode: class}", *DATA,
                 "--output_dir", str(tmp_path / "plain")]) == 2
    assert "--runtime" in capsys.readouterr().err


def test_sampling_generation_uses_the_prompt_experts():
    """generate with do_sample=True: reproducible under a seed, and every step's logits equal the teacher-forced
    prefix-mode logits of the sampled sequence (the prompt's experts decoded every sampled token)."""
    model, _, rt = _pair("llama")
    ids = _ids(1, 9, seed=77)
    kwargs = dict(do_sample=True, top_k=0, temperature=1.0, max_new_tokens=6, min_new_tokens=6, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True, attention_mask=torch.ones_like(ids))
    torch.manual_seed(11)
    first = model.generate(ids, **kwargs)
    torch.manual_seed(11)
    again = model.generate(ids, **kwargs)
    assert torch.equal(first.sequences, again.sequences)
    rt.configure(mode="prefix", prefix=ids.shape[1])
    forced = model(first.sequences[:, :-1], use_cache=False).logits[0, ids.shape[1] - 1:]
    steps = torch.cat(first.logits)
    assert torch.allclose(forced, steps, atol=1e-5)
    rt.configure(mode="gen")
