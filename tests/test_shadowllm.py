"""ShadowLLM / DejaVu (dynamic) and shadowllm-static: a zero head/neuron mask equals the statically cut model
(logits and cached greedy generation, every family), layer 0 stays dense, local/global counts (select.py and the
runtime's per-sequence totals), per-example target normalisation, left-padded batches against each row alone,
seeded reproducibility and the static cut against a hand computation from the traces, save/reload, the prefix
and dense-prompt modes, and clear errors for bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.plans import LayerCut, UnitCut
from prunekit.strategies.shadowllm.predictor import LayerPredictor, ShadowPredictor, to_state
from prunekit.strategies.shadowllm.runtime import ShadowRuntime
from prunekit.strategies.shadowllm.select import drop_static, keep_dynamic
from prunekit.strategies.shadowllm.static import ShadowStatic
from prunekit.strategies.shadowllm.strategy import DejaVu, ShadowLLM, normalised_targets

FAMILIES = tiny.FAMILIES
HEADS, FFN, LAYERS = 4, tiny.FFN, tiny.LAYERS
GREEDY = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
WRAPPED = ("o", "gate", "up", "fc1", "down", "fc2")
TASKS = dict(corpus="task", corpus_options={"tasks": ["copa", "piqa"]}, packing="documents", num_samples=4,
             seq_len=64)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast and does not fight the other tests for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- helpers
def _model(family: str, seed: int = 0, **config):
    """A tiny random model with random biases (a lost bias shows)."""
    torch.manual_seed(seed)
    cfg = tiny.config(family)
    for k, v in config.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for ref in adapter_for(model).linears(model):
        if getattr(ref.module, "bias", None) is not None:
            ref.module.bias.data.normal_(0, 0.1)
    return model


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, tiny.VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_pad(seqs):
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):], mask[b, width - len(s):] = s, 1
    return ids, mask


def _blocks(layers=range(1, LAYERS), heads=HEADS, neurons=FFN):
    return [(f"{i}.{k}", n) for i in layers for k, n in (("heads", heads), ("neurons", neurons))]


def _feature_width(model) -> int:
    n_q, _, d = adapter_for(model).attention_shape(model.config)
    return n_q * d


def _constant(model, scores: dict[int, tuple[torch.Tensor, torch.Tensor]], design: str = "shadowllm"):
    """A stand-in predictor whose output is ``scores`` whatever the input: zero weights, the scores as bias."""
    if design == "shadowllm":
        net = ShadowPredictor(_feature_width(model), _blocks(sorted(scores)), hidden=16)
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
            net.fc2.bias.copy_(torch.cat([t for i in sorted(scores) for t in scores[i]]))
        return net.eval()
    out = {}
    for i, (h, n) in scores.items():
        net = LayerPredictor(model.config.hidden_size, _blocks([i]), hidden=16)
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
            net.fc2.bias.copy_(torch.cat([h, n]))
        out[i] = net.eval()
    return out


def _random_predictor(model, design: str = "shadowllm", seed: int = 0):
    """A real (input-dependent) predictor: random weights, hidden 16, larger output weights so choices vary."""
    torch.manual_seed(seed)
    if design == "shadowllm":
        net = ShadowPredictor(_feature_width(model), _blocks(), hidden=16)
        nets = [net]
    else:
        net = {i: LayerPredictor(model.config.hidden_size, _blocks([i]), hidden=16) for i in range(1, LAYERS)}
        nets = list(net.values())
    with torch.no_grad():
        for n in nets:
            n.fc1.weight.normal_(0, 3.0)
            n.fc2.weight.normal_(0, 1.0)
    return net.eval() if design == "shadowllm" else {i: n.eval() for i, n in net.items()}


def _scores_for(drop: dict[int, tuple[list[int], list[int]]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Distinct scores per unit: dropped units in [-2, -1), kept ones in [1, 2)."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for i, (heads, neurons) in drop.items():
        parts = []
        for n, dropped in ((HEADS, heads), (FFN, neurons)):
            s = 1 + torch.rand(n, generator=g)
            s[list(dropped)] -= 3
            parts.append(s)
        out[i] = tuple(parts)
    return out


def _cut(dense, drop: dict[int, tuple[list[int], list[int]]]):
    from prunekit.realize import realizer_for

    model = copy.deepcopy(dense)
    plan = UnitCut({i: LayerCut(h, n) for i, (h, n) in drop.items()}, allow_empty=True)
    return realizer_for(plan).apply(model, plan)


def _installed(dense, predictor, blocks=None, **options):
    model = copy.deepcopy(dense)
    rt = ShadowRuntime(predictor, blocks or _blocks(), **options)
    rt.install(model)
    return model, rt


def _generate(model, ids, mask=None, new: int = 6):
    return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=new,
                          **GREEDY)


def _same_generation(got, want, atol=1e-5) -> None:
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


# ---------------------------------------------------------------------------------------------- 1. mask = cut
def _drops(scope: str) -> dict[int, tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(3)
    if scope == "local":  # 2 of 4 heads (one per KV group in layer 1, a whole group in layer 2), 64 of 128 neurons
        return {1: ([1, 2], sorted(torch.randperm(FFN, generator=g)[:64].tolist())),
                2: ([0, 1], sorted(torch.randperm(FFN, generator=g)[:64].tolist()))}
    if scope == "global":  # int(0.5 * 8) = 4 heads, all in layer 2; int(0.5 * 256) = 128 neurons as 40 + 88
        return {1: ([], sorted(torch.randperm(FFN, generator=g)[:40].tolist())),
                2: ([0, 1, 2, 3], sorted(torch.randperm(FFN, generator=g)[:88].tolist()))}
    # global, the other way round: layer 1 loses every neuron (its MLP adds only its bias), layer 2 none
    return {1: ([1, 3], list(range(FFN))), 2: ([0, 2], [])}


@pytest.mark.parametrize("scope", ["local", "global", "global-empty-mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_mask_equals_the_cut_model(family, scope):
    """A constant predictor fixes which heads and neurons go: the runtime (gen, sparse prompt) gives the logits
    and the cached greedy generation (gathered decode) of the model with those units physically removed."""
    dense = _model(family)
    drop = _drops(scope)
    model, rt = _installed(dense, _constant(dense, _scores_for(drop)), sparsity=0.5, scope=scope.split("-")[0],
                           mode="gen", prompt="sparse")
    cut = _cut(dense, drop)
    ids = _ids(2, 10, seed=11)
    with torch.no_grad():
        got, want = model(ids, use_cache=True), cut(ids)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
        assert (want.logits - dense(ids).logits).abs().max() > 1e-3  # the cut is not a no-op
        choices = rt.choices_of(got.past_key_values)
        assert sorted(choices) == sorted(drop)
        for i, (heads, neurons) in drop.items():
            for b in range(2):
                assert (~choices[i][0][b]).nonzero().flatten().tolist() == heads
                assert (~choices[i][1][b]).nonzero().flatten().tolist() == neurons
        _same_generation(_generate(model, ids), _generate(cut, ids))


def test_zero_mask_equals_the_cut_model_dejavu():
    """The same with per-layer (DejaVu) constant predictors."""
    dense = _model("llama")
    drop = _drops("local")
    model, _ = _installed(dense, _constant(dense, _scores_for(drop), "dejavu"), design="dejavu", sparsity=0.5,
                          scope="local", mode="gen")
    cut = _cut(dense, drop)
    ids = _ids(1, 9, seed=12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, cut(ids).logits, rtol=0, atol=1e-5)
        _same_generation(_generate(model, ids), _generate(cut, ids))


# ---------------------------------------------------------------------------------------------- 2. layer 0
@pytest.mark.parametrize("design", ["shadowllm", "dejavu"])
def test_layer_zero_stays_dense(design):
    dense = _model("llama", num_hidden_layers=4)
    blocks = _blocks(range(1, 4))
    torch.manual_seed(0)
    if design == "shadowllm":
        predictor = ShadowPredictor(_feature_width(dense), blocks, hidden=16).eval()
    else:
        predictor = {i: LayerPredictor(dense.config.hidden_size, _blocks([i]), hidden=16).eval() for i in (1, 2, 3)}
    opts = dict(scope="global") if design == "shadowllm" else dict(scope="local")
    model, rt = _installed(dense, predictor, blocks, design=design, sparsity=0.5, mode="gen", **opts)
    for ref in adapter_for(model).linears(model):
        wrapped = "forward" in ref.module.__dict__
        assert wrapped == (ref.layer > 0 and ref.role in WRAPPED), (ref.name, wrapped)
    outputs = {}

    def grab(name):
        def hook(module, args, out):
            outputs.setdefault(name, []).append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return hook

    hooks = [m.model.layers[0].register_forward_hook(grab(n)) for n, m in (("rt", model), ("dense", dense))]
    ids = _ids(2, 8, seed=13)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        full = dense(ids)
    for h in hooks:
        h.remove()
    assert torch.equal(outputs["rt"][0], outputs["dense"][0])  # layer 0's output is the dense one
    assert (out.logits - full.logits).abs().max() > 1e-3  # but the model is sparse after it
    choices = rt.choices_of(out.past_key_values)
    assert sorted(choices) == [1, 2, 3]
    assert all(c[0].shape == (2, HEADS) and c[1].shape == (2, FFN) for c in choices.values())
    # a predictor that also covers layer 0 is refused
    with pytest.raises(PrunekitError, match="other layer shapes"):
        ShadowRuntime(ShadowPredictor(_feature_width(dense), _blocks(range(4)), hidden=16), _blocks(range(4)),
                      sparsity=0.5).install(copy.deepcopy(dense))


# ---------------------------------------------------------------------------------------------- 3. counts
def test_drop_static_counts_and_floor():
    g = torch.Generator().manual_seed(0)
    scores = {0: torch.rand(10, generator=g), 1: torch.rand(7, generator=g), 2: torch.rand(3, generator=g)}
    local = drop_static(scores, 0.45, "local")
    assert {i: len(v) for i, v in local.items()} == {0: 4, 1: 3, 2: 1}  # int(0.45 n)
    for i, v in local.items():
        assert v == sorted(scores[i].argsort()[:len(v)].tolist())
    assert {i: len(v) for i, v in drop_static(scores, 0.9, "local").items()} == {0: 9, 1: 6, 2: 2}
    assert {i: len(v) for i, v in drop_static(scores, 0.9, "local", floor=2).items()} == {0: 8, 1: 5, 2: 1}
    glob = drop_static(scores, 0.45, "global")
    assert sum(len(v) for v in glob.values()) == int(0.45 * 20) == 9
    flat = sorted((float(s), i, j) for i, t in scores.items() for j, s in enumerate(t))[:9]
    assert {i: sorted(j for _, l, j in flat if l == i) for i in scores} == glob  # lowest 9 overall
    # the floor: layer 1 scores lowest everywhere, keeps its best unit; the budget goes on to layer 2
    low = {1: torch.tensor([0.0, 0.1, 0.2, 0.3]), 2: torch.tensor([5.0, 6.0, 7.0, 8.0])}
    assert drop_static(low, 0.75, "global") == {1: [0, 1, 2], 2: [0, 1, 2]}
    assert drop_static(low, 0.75, "global", floor=2) == {1: [0, 1], 2: [0, 1]}  # 4 < 6: every layer at its floor


def test_keep_dynamic_counts():
    g = torch.Generator().manual_seed(1)
    scores = {1: torch.randn(3, 10, generator=g), 2: torch.randn(3, 6, generator=g) + 0.5}
    local = keep_dynamic(scores, 0.45, "local")
    assert local[1].sum(1).tolist() == [10 - 4] * 3 and local[2].sum(1).tolist() == [6 - 2] * 3
    for i, m in local.items():
        for b in range(3):
            assert set(m[b].nonzero().flatten().tolist()) == set(scores[i][b].topk(int(m[b].sum())).indices.tolist())
    glob = keep_dynamic(scores, 0.45, "global")
    total = glob[1].sum(1) + glob[2].sum(1)
    assert total.tolist() == [16 - int(0.45 * 16)] * 3 == [9] * 3
    for b in range(3):
        flat = torch.cat([scores[1][b], scores[2][b]])
        kept = torch.cat([glob[1][b], glob[2][b]])
        assert flat[kept].min() > flat[~kept].max()  # the top of all units together
    assert (glob[2].sum(1) != local[2].sum(1)).any()  # global moved units between layers


@pytest.mark.parametrize("scope", ["local", "global"])
def test_runtime_kept_totals_per_sequence(scope):
    dense = _model("llama")
    net = _random_predictor(dense)
    with torch.no_grad():  # favour layer 1's neurons: a global choice then keeps more there
        net.fc2.bias[HEADS:HEADS + FFN] += 100.0
    p = 0.45
    model, rt = _installed(dense, net, sparsity=p, scope=scope, mode="gen")
    with torch.no_grad():
        out = model(_ids(3, 7, seed=14), use_cache=True)
    choices = rt.choices_of(out.past_key_values)
    heads = torch.stack([choices[i][0].sum(1) for i in (1, 2)], 1)  # (B, layers)
    neurons = torch.stack([choices[i][1].sum(1) for i in (1, 2)], 1)
    if scope == "local":
        assert (heads == HEADS - int(p * HEADS)).all() and (neurons == FFN - int(p * FFN)).all()
    else:
        assert heads.sum(1).tolist() == [2 * HEADS - int(p * 2 * HEADS)] * 3  # 8 - 3 = 5, not 2 + 2
        assert neurons.sum(1).tolist() == [2 * FFN - int(p * 2 * FFN)] * 3  # 256 - 115 = 141, not 70 + 70
        assert (neurons[:, 0] > neurons[:, 1]).all()


# ---------------------------------------------------------------------------------------------- 4. targets
def test_normalised_targets_per_example_and_block():
    g = torch.Generator().manual_seed(2)
    table = {"heads": {1: torch.rand(4, 3, generator=g) * 100, 2: torch.rand(4, 3, generator=g) - 5},
             "neurons": {1: torch.rand(4, 5, generator=g).double() * 1e-3, 2: torch.rand(4, 5, generator=g) * 7}}
    table["heads"][2][1] = 3.0  # one constant row
    targets, blocks = normalised_targets(table, [1, 2])
    assert blocks == [("1.heads", 3), ("1.neurons", 5), ("2.heads", 3), ("2.neurons", 5)]
    assert targets.shape == (4, 16) and targets.dtype == torch.float32
    start = 0
    for name, size in blocks:
        layer, kind = name.split(".")
        part, raw = targets[:, start:start + size], table[kind][int(layer)].float()
        start += size
        for e in range(4):
            if raw[e].max() == raw[e].min():
                assert torch.equal(part[e], torch.zeros(size))
            else:
                assert float(part[e].min()) == 0.0 and float(part[e].max()) == pytest.approx(1.0, abs=1e-6)
                torch.testing.assert_close(part[e], (raw[e] - raw[e].min()) / (raw[e].max() - raw[e].min()))


# ---------------------------------------------------------------------------------------------- 5. batches
@pytest.mark.parametrize("design", ["shadowllm", "dejavu"])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_left_padded_batch_equals_each_row_alone(family, design):
    dense = _model(family)
    scope = "global" if design == "shadowllm" else "local"
    model, rt = _installed(dense, _random_predictor(dense, design), design=design, sparsity=0.5, scope=scope,
                           mode="gen")
    seqs = [_ids(1, 9, seed=15)[0], _ids(1, 5, seed=16)[0]]
    ids, mask = _left_pad(seqs)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
        cb = rt.choices_of(batch.past_key_values)
        assert any(not torch.equal(cb[i][k][0], cb[i][k][1]) for i in cb for k in (0, 1))  # rows choose apart
        gen = _generate(model, ids, mask)
        for b, s in enumerate(seqs):
            alone = model(s[None], use_cache=True)
            ca = rt.choices_of(alone.past_key_values)
            for i in ca:
                assert torch.equal(cb[i][0][b], ca[i][0][0]) and torch.equal(cb[i][1][b], ca[i][1][0]), (b, i)
            torch.testing.assert_close(batch.logits[b, -len(s):], alone.logits[0], rtol=0, atol=1e-5)
            one = _generate(model, s[None])
            assert torch.equal(gen.sequences[b, ids.shape[1]:], one.sequences[0, len(s):]), b
            for step in range(len(one.logits)):
                torch.testing.assert_close(gen.logits[step][b], one.logits[step][0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- 6. seeds, static
def _prune(strategy, folder, **data):
    from prunekit.api import prune
    from prunekit.data import CalibrationDataModule

    dm = CalibrationDataModule(str(folder), **{**TASKS, **data})
    return prune(strategy, str(folder), dm), dm


@pytest.fixture(scope="module")
def shadow_runs(tiny_llama):
    options = dict(sparsity=0.5, hidden=16, epochs=3, batch_size=4)
    return [_prune(ShadowLLM(seed=seed, **options), tiny_llama)[0] for seed in (0, 0, 1)]


def test_same_seed_same_predictor(shadow_runs):
    a, b, other = (to_state(o.plan.runtime.predictor) for o in shadow_runs)
    assert a[0] == b[0] and a[0]["hidden"] == 16
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert any(not torch.equal(a[1][k], other[1][k]) for k in a[1])  # the seed matters
    assert shadow_runs[0].plan.runtime.blocks == _blocks()
    assert shadow_runs[0].plan.runtime.report["examples"] == 8


@pytest.fixture
def uneven_corpus(monkeypatch):
    """Task-like answered examples: source ``a`` has 2, ``b`` 5 (mean over tasks ≠ mean over examples)."""
    from prunekit import data

    words = "the a cat dog ran sat on mat blue red green house tree big small".split()
    g = torch.Generator().manual_seed(4)

    def text(n):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g))

    docs = {"a": [(text(12), " " + text(4)) for _ in range(2)], "b": [(text(9), " " + text(5)) for _ in range(5)]}
    monkeypatch.setitem(data._CORPORA, "shadow_uneven", lambda split, **_: docs)
    return "shadow_uneven"


def _drop_lowest(units: list[tuple[float, int, int]], budget: int, sizes: dict[int, int], floor: int = 1):
    """(score, layer, unit) → per layer the dropped units: lowest first, each layer keeping ``floor``."""
    left, out = dict(sizes), {i: [] for i in sizes}
    for _, i, j in sorted(units):
        if budget == 0:
            break
        if left[i] > floor:
            out[i].append(j)
            left[i] -= 1
            budget -= 1
    return {i: sorted(v) for i, v in out.items()}


@pytest.mark.parametrize("scope,head_unit,p", [("global", "kv_group", 0.3), ("local", "query", 0.5)])
def test_static_cut_equals_the_hand_computation(tiny_llama, uneven_corpus, scope, head_unit, p):
    from prunekit.strategies.shadowllm import traces
    from prunekit.strategies.shadowllm.criteria import get

    outcome, dm = _prune(ShadowStatic("plainact", sparsity=p, scope=scope, head_unit=head_unit), tiny_llama,
                         corpus=uneven_corpus, corpus_options={}, num_samples=5, allow_fewer=True)
    labels = torch.tensor(dm.calibration_labels())
    assert labels.tolist() == [0, 0, 1, 1, 1, 1, 1]
    table = traces.per_example(outcome.realized, outcome.calibration.observed(), get("plainact"))
    assert table["index"].tolist() == list(range(7))
    expected = {}
    for kind in ("heads", "neurons"):
        per_task = {i: (t[labels == 0].mean(0) + t[labels == 1].mean(0)) / 2 for i, t in table[kind].items()}
        pooled = {i: t.mean(0) for i, t in table[kind].items()}
        if scope == "global":
            if kind == "heads":  # KV groups of 2 query heads, scored by their sum
                units = [(float(s[2 * u] + s[2 * u + 1]), i, u) for i, s in per_task.items() for u in range(2)]
                groups = _drop_lowest(units, int(p * 6), {i: 2 for i in per_task})
                expected[kind] = {i: [2 * u + k for u in v for k in (0, 1)] for i, v in groups.items()}
            else:
                units = [(float(v), i, j) for i, s in per_task.items() for j, v in enumerate(s)]
                expected[kind] = _drop_lowest(units, int(p * FFN * LAYERS), {i: FFN for i in per_task})
                units = [(float(v), i, j) for i, s in pooled.items() for j, v in enumerate(s)]
                assert _drop_lowest(units, int(p * FFN * LAYERS), {i: FFN for i in pooled}) != expected[kind]
        elif kind == "heads":  # the same count, int(p * 2) = 1, from every KV group: its lower query head
            expected[kind] = {i: [2 * g + int(s[2 * g:2 * g + 2].argmin()) for g in range(2)]
                              for i, s in per_task.items()}
        else:
            expected[kind] = {i: sorted(s.argsort()[:int(p * FFN)].tolist()) for i, s in per_task.items()}
            assert any(sorted(pooled[i].argsort()[:int(p * FFN)].tolist()) != v for i, v in expected[kind].items())
    cut = outcome.plan
    assert sorted(cut.cuts) == list(range(LAYERS))
    assert {i: c.heads for i, c in cut.cuts.items()} == expected["heads"]
    assert {i: c.channels for i, c in cut.cuts.items()} == expected["neurons"]


# ---------------------------------------------------------------------------------------------- 7. save/reload
@pytest.fixture(scope="module")
def dejavu_run(tiny_llama):
    return _prune(DejaVu(sparsity=0.5, hidden=16, epochs=3, batch_size=4), tiny_llama)[0]


@pytest.mark.parametrize("design", ["shadowllm", "dejavu"])
def test_dynamic_model_save_and_reload(design, shadow_runs, dejavu_run, tiny_llama, tmp_path):
    import prunekit
    from prunekit.models import load_model, load_tokenizer
    from prunekit.realize import realizer_for
    from prunekit.realize.runtime import runtime_of

    outcome = shadow_runs[0] if design == "shadowllm" else dejavu_run
    realized = outcome.realized
    assert runtime_of(realized) is outcome.plan.runtime and outcome.plan.runtime.design == design
    folder = tmp_path / design
    folder.mkdir()
    realizer_for(outcome.plan).save(realized, folder, load_tokenizer(str(tiny_llama)))
    (folder / "prunekit.json").write_text(json.dumps({"plan": outcome.plan.kind}))
    back = prunekit.load_pruned(folder)
    rt = runtime_of(back)
    assert isinstance(rt, ShadowRuntime) and rt is not outcome.plan.runtime
    assert rt.state() == outcome.plan.runtime.state()
    ids = torch.tensor([[17, 250, 33, 99, 8, 140, 61, 212, 5, 77, 300, 41]])
    with torch.no_grad():
        got, want = back(ids, use_cache=True), realized(ids, use_cache=True)
        assert torch.equal(got.logits, want.logits)
        c_got, c_want = rt.choices_of(got.past_key_values), outcome.plan.runtime.choices_of(want.past_key_values)
        assert all(torch.equal(c_got[i][k], c_want[i][k]) for i in c_want for k in (0, 1))
        assert (want.logits - load_model(str(tiny_llama))(ids).logits).abs().max() > 1e-4  # it is sparse
        g_got, g_want = _generate(back, ids), _generate(realized, ids)
        assert torch.equal(g_got.sequences, g_want.sequences)
        assert all(torch.equal(a, b) for a, b in zip(g_got.logits, g_want.logits))


# ---------------------------------------------------------------------------------------------- 8. modes
@pytest.mark.parametrize("design", ["shadowllm", "dejavu"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_prefix_mode_with_dense_prompt_equals_prefill_then_decode(family, design):
    P, T = 5, 12
    dense = _model(family)
    scope = "global" if design == "shadowllm" else "local"
    model, rt = _installed(dense, _random_predictor(dense, design), design=design, sparsity=0.5, scope=scope,
                           mode="prefix", prefix=P, prompt="dense")
    ids = _ids(1, T, seed=17)
    with torch.no_grad():
        one = model(ids, use_cache=True)
        c_one = rt.choices_of(one.past_key_values)
        full = dense(ids).logits
        assert torch.equal(one.logits[:, :P], full[:, :P])  # the prefix is dense
        assert (one.logits[:, P:] - full[:, P:]).abs().max() > 1e-3  # what follows is not
        rt.configure(mode="gen")
        pre = model(ids[:, :P], use_cache=True)
        cache = pre.past_key_values
        c_pre = rt.choices_of(cache)
        steps = [pre.logits[:, P - 1]]
        for t in range(P, T):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    assert all(torch.equal(c_one[i][k], c_pre[i][k]) for i in c_pre for k in (0, 1))
    torch.testing.assert_close(one.logits[:, P - 1:], torch.stack(steps, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("design", ["shadowllm", "dejavu"])
def test_dense_prompt_keeps_the_prompt_logits_dense(design):
    dense = _model("llama")
    scope = "global" if design == "shadowllm" else "local"
    model, rt = _installed(dense, _random_predictor(dense, design), design=design, sparsity=0.5, scope=scope,
                           mode="gen", prompt="dense")
    sparse_model, _ = _installed(dense, _random_predictor(dense, design), design=design, sparsity=0.5, scope=scope,
                                 mode="gen", prompt="sparse")
    ids = _ids(2, 9, seed=18)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        assert torch.equal(out.logits, dense(ids).logits)
        assert not torch.allclose(sparse_model(ids).logits, dense(ids).logits, atol=1e-3)
        assert sorted(rt.choices_of(out.past_key_values)) == [1, 2]  # chosen for the generation
        got, plain = _generate(model, ids), _generate(dense, ids)
    assert torch.equal(got.logits[0], plain.logits[0])  # the first token comes from the dense prompt
    assert not torch.allclose(got.logits[1], plain.logits[1], atol=1e-3)  # generation is sparse


# ---------------------------------------------------------------------------------------------- 9. bad input
@pytest.mark.parametrize("cls", [ShadowStatic, ShadowLLM, DejaVu])
def test_unknown_criterion_lists_the_registry(cls):
    with pytest.raises(PrunekitError, match="unknown criterion 'nope'; registered: fisher, grad_norm, l2_norm, "
                                            "plainact, snip"):
        cls(criterion="nope")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, True])
@pytest.mark.parametrize("cls", [ShadowStatic, ShadowLLM, DejaVu])
def test_sparsity_outside_the_range(cls, sparsity):
    with pytest.raises(PrunekitError, match=r"sparsity must be a number in \[0, 1\)"):
        cls(sparsity=sparsity)


def test_static_query_heads_cannot_be_ranked_globally_under_gqa():
    with pytest.raises(PrunekitError, match="head_unit='query' with scope='global'"):
        ShadowStatic(head_unit="query", scope="global").check(_model("llama"))
    ShadowStatic(head_unit="query", scope="global").check(_model("opt"))  # one query head per KV head: fine
    with pytest.raises(PrunekitError, match="head_unit must be"):
        ShadowStatic(head_unit="group")
    with pytest.raises(PrunekitError, match="nothing to prune"):
        ShadowStatic(prune_heads=False, prune_neurons=False)


def test_dejavu_is_local_only():
    with pytest.raises(PrunekitError, match="scope must be 'local'"):
        DejaVu(scope="global")
    with pytest.raises(PrunekitError, match="scope must be 'local'"):
        ShadowRuntime({}, [], design="dejavu", scope="global")
    DejaVu(scope="local")


@pytest.fixture
def unanswerable_corpus(monkeypatch):
    """Answered examples whose answer has no tokens: no token carries the loss."""
    from prunekit import data

    docs = {"a": [("the cat sat on the mat and the dog ran to the big red house", "")] * 2}
    monkeypatch.setitem(data._CORPORA, "shadow_unanswerable", lambda split, **_: docs)
    return "shadow_unanswerable"


@pytest.mark.parametrize("strategy", [lambda: ShadowLLM(epochs=1, hidden=16), lambda: ShadowStatic("snip")])
def test_gradient_criterion_with_an_empty_loss_mask(tiny_llama, unanswerable_corpus, strategy):
    with pytest.raises(PrunekitError, match="no target tokens for the loss"):
        _prune(strategy(), tiny_llama, corpus=unanswerable_corpus, corpus_options={}, num_samples=2)


def test_predictor_for_other_layer_shapes_is_refused():
    llama = _model("llama")
    wider = _model("llama", intermediate_size=96)
    deeper = _model("llama", num_hidden_layers=4)
    for design in ("shadowllm", "dejavu"):
        predictor = _random_predictor(llama, design)
        scope = "global" if design == "shadowllm" else "local"
        for other in (wider, deeper):
            rt = ShadowRuntime(predictor, _blocks(), design=design, sparsity=0.5, scope=scope)
            with pytest.raises(PrunekitError, match="trained for other layer shapes"):
                rt.install(other)
            assert all("forward" not in r.module.__dict__ for r in adapter_for(other).linears(other))
            rt.install(copy.deepcopy(llama))  # a refused install leaves the runtime installable
    with pytest.raises(PrunekitError, match="one predictor per layer"):
        ShadowRuntime({1: _random_predictor(llama, "dejavu")[1]}, _blocks(), design="dejavu",
                      scope="local").install(copy.deepcopy(llama))


def test_cli_prune_eval_and_bench_a_dynamic_folder(tiny_llama, tmp_path, capsys, monkeypatch):
    """The commands users run: prune with shadowllm (task data), then eval (perplexity and a task, with an
    evaluation option for the runtime) and bench on the folder it wrote."""
    from prunekit.cli import main

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "shadow"
    assert main(["prune", "--model", str(tiny_llama), "--strategy", "shadowllm", "--strategy.hidden", "8",
                 "--strategy.epochs", "2", "--data.corpus", "task", "--data.corpus_options", "{tasks: [copa, piqa]}",
                 "--data.packing", "documents", "--data.num_samples", "3", "--data.seq_len", "96",
                 "--data.eval_samples", "2", "--eval_dense", "false", "--output_dir", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "shadowllm (plainact, 50% global)" in printed and "held_out_spearman" in printed
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["pruned"]["runtime"]["runtime"] == "shadowllm" and (folder / "runtime.safetensors").is_file()
    assert main(["eval", "--model", str(folder), "--tasks", "[perplexity,copa]", "--limit", "2",
                 "--data.eval_samples", "2", "--data.seq_len", "96", "--runtime", "{prompt: dense}"]) == 0
    assert "copa" in capsys.readouterr().out
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_llama), "--pruned", f"[{folder}]", "--batch_sizes", "[1]",
                 "--prompt_len", "16", "--new_tokens", "4", "--repeats", "1", "--peak_memory", "false",
                 "--output", str(out)]) == 0
    row = next(r for r in json.loads(out.read_text()) if r["model"] == "shadow")
    assert row["decode_tok_s"] > 0 and "gather_ms" in row and row["ideal_speedup"] > 1


def test_an_answered_example_longer_than_seq_len_keeps_its_answer(tiny_llama, monkeypatch):
    """Task examples are truncated from the left (as lm-eval truncates a request): the answer, which carries the
    loss, stays in the window."""
    from prunekit import data

    context = " ".join(["the cat sat on the mat"] * 30)
    docs = {"a": [(context, " and the dog ran home")]}
    monkeypatch.setitem(data._CORPORA, "shadow_long", lambda split, **_: docs)
    dm = data.CalibrationDataModule(str(tiny_llama), corpus="shadow_long", packing="documents", num_samples=1,
                                    seq_len=32)
    ids, mask = dm.calibration_sequences()[0], dm.calibration_loss_masks()[0]
    tok = tiny.tokenizer()
    full = tok(context + " and the dog ran home")["input_ids"]
    answer = len(full) - len(tok(context)["input_ids"])
    assert len(full) > 32 and ids.tolist() == full[-32:]
    assert mask.sum() == answer and mask[-answer:].all()
