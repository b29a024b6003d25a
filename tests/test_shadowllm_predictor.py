"""ShadowLLM / DejaVu predictors: min-max normalisation, output blocks, training on a synthetic mapping (both the
regression and the binary DejaVu form), seeded reproducibility, Spearman against scipy, the (config, tensors)
round trip, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.strategies.shadowllm.predictor import (
    HIDDEN,
    RANK,
    Blocks,
    LayerPredictor,
    ShadowPredictor,
    binary_targets,
    fit,
    from_state,
    mean_spearman,
    minmax,
    spearman,
    to_state,
)

F_IN = 12
BLOCKS = [("1.heads", 4), ("1.neurons", 20), ("2.heads", 4)]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    """Inputs (E, F) and raw scores = relu of a fixed random linear map (plus a little noise): 200 train, 60 test."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(260, F_IN, generator=g)
    w = torch.randn(F_IN, sum(n for _, n in BLOCKS), generator=g)
    scores = torch.relu(x @ w + 0.05 * torch.randn(260, w.shape[1], generator=g)) + 0.01 * x[:, :1].abs()
    return x[:200], scores[:200], x[200:], scores[200:]


# ------------------------------------------------------------------------------------------- minmax, Blocks


def test_minmax_per_row_and_constant_rows():
    x = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [-4.0, 0.0, -2.0]])
    assert torch.allclose(minmax(x), torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.5]]))
    assert torch.equal(minmax(torch.tensor([2, 2])), torch.zeros(2))  # integers → float, constant → zeros
    assert minmax(x.double()).dtype == torch.float64
    big = torch.randn(7, 50) * 100 + 3
    out = minmax(big)
    assert torch.allclose(out.amin(-1), torch.zeros(7)) and torch.allclose(out.amax(-1), torch.ones(7))
    assert torch.equal(out.argsort(-1), big.argsort(-1))  # order preserved
    with pytest.raises(PrunekitError, match="at least one value"):
        minmax(torch.zeros(3, 0))


def test_blocks_split_cat_normalise():
    b = Blocks(BLOCKS)
    assert b.names == ["1.heads", "1.neurons", "2.heads"] and b.sizes == [4, 20, 4]
    assert b.offsets == [0, 4, 24] and b.total == 28 and len(b) == 3
    assert Blocks(json.loads(json.dumps(b.to_list()))) == b
    t = torch.randn(5, 28)
    parts = b.split(t)
    assert [tuple(v.shape) for v in parts.values()] == [(5, 4), (5, 20), (5, 4)]
    assert torch.equal(parts["1.neurons"], t[:, 4:24]) and torch.equal(t[:, b.slice("2.heads")], parts["2.heads"])
    assert torch.equal(b.cat(parts), t)
    assert torch.equal(b.cat(dict(reversed(list(parts.items())))), t)  # block order, not dict order

    n = b.normalise(t)
    for name, block in b.split(n).items():  # each block spans [0, 1] on its own, per example
        assert torch.allclose(block.amin(-1), torch.zeros(5)) and torch.allclose(block.amax(-1), torch.ones(5))
        assert torch.allclose(block, minmax(parts[name]))
    assert not torch.allclose(n, minmax(t))  # per block differs from over the whole row
    as_dict = b.normalise(parts)
    assert isinstance(as_dict, dict) and torch.equal(b.cat(as_dict), n)


def test_blocks_errors():
    b = Blocks(BLOCKS)
    with pytest.raises(PrunekitError, match="27 columns but the blocks hold 28"):
        b.split(torch.zeros(2, 27))
    with pytest.raises(PrunekitError, match="missing"):
        b.cat({"1.heads": torch.zeros(2, 4)})
    with pytest.raises(PrunekitError, match="should have 20 columns"):
        b.cat({"1.heads": torch.zeros(2, 4), "1.neurons": torch.zeros(2, 19), "2.heads": torch.zeros(2, 4)})
    with pytest.raises(PrunekitError, match="unique"):
        Blocks([("a", 1), ("a", 2)])
    with pytest.raises(PrunekitError, match="sizes must be integers >= 1"):
        Blocks([("a", 0)])
    with pytest.raises(PrunekitError, match="empty"):
        Blocks([])
    with pytest.raises(PrunekitError, match="no block"):
        b.slice("3.heads")


def test_binary_targets_top_fraction_per_block():
    b = Blocks([("h", 10), ("n", 3)])
    s = torch.randn(6, 13)
    y = binary_targets(s, b, keep=0.3)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    parts = b.split(y)
    assert torch.equal(parts["h"].sum(-1), torch.full((6,), 3.0))  # floor(0.3·10) = 3
    assert torch.equal(parts["n"].sum(-1), torch.full((6,), 1.0))  # floor(0.9) = 0 → at least one
    for name, block in b.split(s).items():  # the marked units are the largest of their block
        marked = parts[name].bool()
        assert (block[marked].view(6, -1).amin(-1) >= block.masked_fill(marked, -1e9).amax(-1)).all()
    assert torch.equal(binary_targets(s, b, keep=1.0), torch.ones(6, 13))
    with pytest.raises(PrunekitError, match=r"in \(0, 1\]"):
        binary_targets(s, b, keep=0.0)


# --------------------------------------------------------------------------------------------- spearman


def test_spearman_equals_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 4, (12, 15), generator=g).float()  # many ties
    target = torch.randn(12, 15, generator=g)
    target[::3, ::2] = 0.5  # ties in the target too
    rho = spearman(pred, target)
    expected = torch.tensor([stats.spearmanr(pred[i].numpy(), target[i].numpy())[0] for i in range(12)])
    assert rho.shape == (12,)
    assert torch.allclose(rho, expected.double(), atol=1e-10)
    cont = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    expected = torch.tensor([stats.spearmanr(cont[0][i].numpy(), cont[1][i].numpy())[0] for i in range(4)])
    assert torch.allclose(spearman(*cont), expected.double(), atol=1e-10)
    assert torch.allclose(spearman(target, target), torch.ones(12, dtype=torch.float64))
    assert torch.allclose(spearman(target, -target), -torch.ones(12, dtype=torch.float64))
    assert spearman(pred[0], target[0]).shape == (1,)  # one row as a vector


def test_spearman_constant_rows_are_nan():
    x = torch.stack([torch.arange(5.0), torch.full((5,), 2.0)])
    y = torch.stack([torch.arange(5.0).flip(0), torch.arange(5.0)])
    rho = spearman(x, y)
    assert rho[0] == -1 and torch.isnan(rho[1])
    assert mean_spearman(x, y) == -1.0  # NaN rows are left out of the mean
    with pytest.raises(PrunekitError, match="equal shape"):
        spearman(x, y[:, :4])
    with pytest.raises(PrunekitError, match="NaN"):
        spearman(x, torch.full_like(y, float("nan")))


# ------------------------------------------------------------------------------------------------ training


def _build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "shadow":
        return ShadowPredictor(F_IN, BLOCKS, hidden=64)
    if kind == "layer":
        return LayerPredictor(F_IN, BLOCKS, hidden=64)
    return LayerPredictor(F_IN, BLOCKS, hidden=16, binary=True)


@pytest.mark.parametrize("kind,loss", [("shadow", "mse"), ("shadow", "bce"), ("layer", "mse"), ("binary", "bce")])
def test_training_learns_the_mapping(data, kind, loss):
    x, scores, xt, st = data
    b = Blocks(BLOCKS)
    targets = b.normalise(scores) if loss == "mse" else binary_targets(scores, b, keep=0.3)
    val = (xt, b.normalise(st) if loss == "mse" else binary_targets(st, b, keep=0.3))
    net = _build(kind)
    with torch.no_grad():
        before = mean_spearman(net(xt), st)
    report = fit(net, x, targets, loss=loss, epochs=25, lr=1e-2, weight_decay=0.0, batch_size=40, seed=0, val=val)
    assert report["epochs"] == 25 and report["steps"] == 25 * 5 and len(report["train_loss"]) == 25
    assert report["train_loss"][-1] < 0.6 * report["train_loss"][0]
    assert report["val_loss"] is not None and report["val_loss"] < report["train_loss"][0]
    with torch.no_grad():
        after = mean_spearman(net(xt), st)  # held-out ranking of the raw scores (logits for bce)
    random_rho = mean_spearman(torch.randn(st.shape, generator=torch.Generator().manual_seed(5)), st)
    assert abs(random_rho) < 0.1 and abs(before) < 0.3
    assert after > 0.6, (kind, loss, after)
    assert report["val_spearman"] > 0.5


def test_fit_is_reproducible_under_a_seed(data):
    x, scores, _, _ = data
    y = Blocks(BLOCKS).normalise(scores)
    nets = [_build("shadow") for _ in range(3)]
    options = dict(epochs=2, lr=1e-2, weight_decay=0.01, batch_size=16)
    runs = [fit(nets[0], x, y, seed=3, **options), fit(nets[1], x, y, seed=3, **options)]
    fit(nets[2], x, y, seed=4, **options)
    assert runs[0]["train_loss"] == runs[1]["train_loss"]
    one, two, other = (n.state_dict() for n in nets)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(one[k], other[k]) for k in one)  # the seed orders the batches


def test_fit_bce_with_fixed_pos_weight(data):
    x, scores, _, _ = data
    b = Blocks(BLOCKS)
    net = _build("binary")
    report = fit(net, x, binary_targets(scores, b, 0.3), loss="bce", pos_weight=2.0, epochs=3, lr=1e-2,
                 weight_decay=0.0, batch_size=50, seed=0)
    assert report["train_loss"][-1] < report["train_loss"][0] and report["val_loss"] is None


def test_fit_bad_input_errors(data):
    x, scores, _, _ = data
    y = Blocks(BLOCKS).normalise(scores)
    net = _build("shadow")
    ok = dict(epochs=1, lr=1e-3, weight_decay=0.0, batch_size=8, seed=0)
    cases = [
        (dict(inputs=x[:10], targets=y[:9]), "10 input rows but 9 target rows"),
        (dict(inputs=x[:0], targets=y[:0]), "no examples"),
        (dict(inputs=x, targets=y[:, :20]), "targets have 20 columns"),
        (dict(inputs=x[:, :5], targets=y), "inputs have 5 features"),
        (dict(inputs=x[0], targets=y[0]), r"inputs must be \(E, F\)"),
        (dict(inputs=x, targets=y, epochs=0), "epochs must be an integer >= 1"),
        (dict(inputs=x, targets=y, batch_size=0), "batch_size must be"),
        (dict(inputs=x, targets=y, lr=0.0), "lr must be"),
        (dict(inputs=x, targets=y, weight_decay=-1.0), "weight_decay must be"),
        (dict(inputs=x, targets=y, loss="l1"), "loss must be"),
        (dict(inputs=x, targets=y * 3, loss="bce"), r"needs targets in \[0, 1\]"),
        (dict(inputs=x, targets=y, pos_weight=2.0), "pos_weight applies to loss='bce' only"),
        (dict(inputs=x, targets=y.round(), loss="bce", pos_weight=torch.ones(5)), "pos_weight must be"),
        (dict(inputs=x, targets=torch.where(y > 0.5, float("nan"), y)), "NaN or infinite"),
        (dict(inputs=x, targets=y, val=(x[:4], y[:3])), "validation data: 4 input rows but 3"),
    ]
    for kwargs, message in cases:
        args = {**ok, **kwargs}
        with pytest.raises(PrunekitError, match=message):
            fit(net, args.pop("inputs"), args.pop("targets"), **args)
    plain = torch.nn.Linear(F_IN, 7)
    with pytest.raises(PrunekitError, match="output for one example"):
        fit(plain, x, y, **ok)
    with pytest.raises(PrunekitError, match=r"takes features \(E, 12\)"):
        net(x[:, :11])


# ------------------------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize("kind", ["shadow", "layer", "binary"])
def test_state_round_trip(tmp_path, kind):
    from safetensors.torch import load_file, save_file

    net = _build(kind, seed=7)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)  # not the default initialisation
    config, tensors = to_state(net)
    (tmp_path / "predictor.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "predictor.safetensors"))
    loaded = from_state(json.loads((tmp_path / "predictor.json").read_text()),
                        load_file(str(tmp_path / "predictor.safetensors")))
    assert type(loaded) is type(net) and loaded.blocks == net.blocks and not loaded.training
    assert loaded.config() == net.config()
    x = torch.randn(9, F_IN)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert {k: v.shape for k, v in loaded.scores(x).items()} == {n: (9, s) for n, s in BLOCKS}


def test_defaults_and_state_errors():
    assert ShadowPredictor(F_IN, BLOCKS).hidden == HIDDEN == 2048
    layer, binary = LayerPredictor(F_IN, BLOCKS), LayerPredictor(F_IN, BLOCKS, binary=True)
    assert layer.hidden == HIDDEN and layer.normalise_input and layer.fc1.bias is not None
    assert binary.hidden == RANK == 1000 and not binary.normalise_input and binary.fc1.bias is None
    config, tensors = to_state(ShadowPredictor(F_IN, BLOCKS, hidden=8))
    wrong = dict(tensors, **{"fc1.weight": torch.zeros(16, F_IN)})
    with pytest.raises(PrunekitError, match="trained with another shape"):
        from_state(config, wrong)
    with pytest.raises(PrunekitError, match="missing"):
        from_state(config, {k: v for k, v in tensors.items() if k != "fc2.bias"})
    with pytest.raises(PrunekitError, match="must name its class"):
        from_state(dict(config, **{"class": "Mystery"}), tensors)
    with pytest.raises(PrunekitError, match="ShadowPredictor or LayerPredictor"):
        to_state(torch.nn.Linear(2, 2))
    with pytest.raises(PrunekitError, match="probabilities"):
        layer.probabilities(torch.zeros(1, F_IN))
