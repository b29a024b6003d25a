"""ShadowLLM's multi-pass probes (grasp, nwot, jacov, epenas) against independent computations on tiny models of
every family: GraSP against ``torch.autograd.functional.hvp`` of the loss as a function of additive perturbations
of the scored activations (and a finite-difference Hessian-vector product), NASWOT against kernels built by hand from
hooked activations, jacov / EPE-NAS against ``torch.autograd.functional.jacobian`` and numpy scores written from the
papers' definitions; plus the loss covering only target tokens, per-example rows, and the errors."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM

import tiny
from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.strategies.shadowllm import probes
from prunekit.strategies.shadowllm.probes import PROBES, check, epenas, example_losses, grasp, jacov, nwot

CONSUMERS, PRE = ("down", "fc2"), ("gate", "fc1")
KK = 1e-5
CLOSE = dict(rtol=1e-6, atol=1e-9)
# Llama's and Gemma's RMSNorm compute in float32 even in a float64 model: two algorithms (hvp's double-backward trick
# and grasp's vector-Hessian product) then agree to float32 precision only.
FAMILY_CLOSE = {"llama": dict(rtol=1e-4, atol=1e-8), "gemma3_text": dict(rtol=1e-4, atol=1e-8)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two, and leaves the other core to a parallel worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@lru_cache(maxsize=None)
def _model(family: str, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.config(family)).eval()
    for ref in adapter_for(model).linears(model):
        if getattr(ref.module, "bias", None) is not None:
            ref.module.bias.data.normal_(0, 0.1)
    return model.to(dtype)


def _ids(batch=2, length=8, seed=3, high=tiny.VOCAB):
    return torch.randint(1, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def _targets(ids, first):
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[:, first:] = True
    return targets


def _modules(model, layer):
    refs = {r.role: r.module for r in adapter_for(model).linears(model) if r.layer == layer}
    return {"heads": refs["o"], "mid": next(refs[r] for r in CONSUMERS if r in refs),
            "pre": next(refs[r] for r in PRE if r in refs)}


def _loss(logits, ids, targets):
    """Σ over examples of the mean cross-entropy over the example's target tokens (written out, one by one)."""
    total = 0
    for b in range(ids.shape[0]):
        chosen = targets[b, 1:]
        total = total + F.cross_entropy(logits[b, :-1][chosen], ids[b, 1:][chosen])
    return total


def _capture(model, ids, sites):
    """{(kind, layer): tensor as (B, T, F)} read by plain hooks in one no-grad forward."""
    seen, handles = {}, []
    for kind, layer in sites:
        module = _modules(model, layer)[kind]
        if kind == "pre":
            handles.append(module.register_forward_hook(lambda m, a, out, k=(kind, layer): seen.__setitem__(k, out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, a, k=(kind, layer): seen.__setitem__(k, a[0])))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {k: v.reshape(*ids.shape, v.shape[-1]) for k, v in seen.items()}


def _loss_of_perturbations(model, ids, targets, sites):
    """f(ε_1, …) = the loss with ε_s (B, T, F) added to the input of site s (head contexts, or z)."""
    def f(*eps):
        handles = []
        for (kind, layer), e in zip(sites, eps):
            module = _modules(model, layer)[kind]
            handles.append(module.register_forward_pre_hook(lambda m, a, e=e: (a[0] + e.reshape(a[0].shape),)))
        try:
            with sdpa_kernel(SDPBackend.MATH):
                return _loss(model(input_ids=ids).logits, ids, targets)
        finally:
            for h in handles:
                h.remove()
    return f


def _grasp_by_hvp(model, ids, targets, sites):
    """−act ⊙ Hg per site, H and g of the loss over the perturbations of ``sites`` (one joint Hessian)."""
    acts = _capture(model, ids, sites)
    zeros = tuple(torch.zeros_like(acts[s]) for s in sites)
    f = _loss_of_perturbations(model, ids, targets, sites)
    _, g = torch.autograd.functional.vjp(f, zeros)
    _, hv = torch.autograd.functional.hvp(f, zeros, v=g)
    return {s: -(acts[s] * h) for s, h in zip(sites, hv)}


def _fold(family, site_scores, kind):
    heads = tiny.config(family).num_attention_heads if family != "gpt2" else tiny.config(family).n_head
    if kind == "heads":
        return site_scores.reshape(*site_scores.shape[:2], heads, -1).sum((1, 3))
    return site_scores.sum(1)


# ---------------------------------------------------------------------------------------------- grasp
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_grasp_equals_hvp_of_each_site(family):
    """hessian='site': a head context's and a z's own Hessian block times its gradient, loss on the last 3 tokens
    only; per example."""
    model, ids = _model(family), _ids()
    targets = _targets(ids, ids.shape[1] - 3)
    result = grasp(model, ids, targets, layers=[1])
    assert list(result["heads"]) == [1] and list(result["neurons"]) == [1]
    assert result["heads"][1].shape == (2, 4) and result["neurons"][1].shape == (2, tiny.FFN)
    for kind, unit in (("heads", "heads"), ("mid", "neurons")):
        expected = _fold(family, _grasp_by_hvp(model, ids, targets, [(kind, 1)])[(kind, 1)], kind)
        torch.testing.assert_close(result[unit][1], expected, **FAMILY_CLOSE.get(family, CLOSE))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_grasp_joint_equals_hvp_over_every_site(family):
    """hessian='joint': H and g over the head contexts and z of every layer, whatever the request."""
    model, ids = _model(family), _ids()
    targets = _targets(ids, 2)
    layers = len(adapter_for(model).layers(model))
    sites = [(kind, i) for i in range(layers) for kind in ("heads", "mid")]
    expected = _grasp_by_hvp(model, ids, targets, sites)
    result = grasp(model, ids, targets, layers=[1], hessian="joint")
    close = FAMILY_CLOSE.get(family, CLOSE)
    torch.testing.assert_close(result["heads"][1], _fold(family, expected[("heads", 1)], "heads"), **close)
    torch.testing.assert_close(result["neurons"][1], _fold(family, expected[("mid", 1)], "neurons"), **close)
    only_heads = grasp(model, ids, targets, layers=[1], units=("heads",), hessian="joint")
    assert only_heads["neurons"] == {}
    torch.testing.assert_close(only_heads["heads"][1], result["heads"][1], **CLOSE)


def test_grasp_hessian_vector_product_matches_finite_differences():
    """Hg of layer 1's head contexts and z by central differences of the gradient along g (OPT: float64 throughout)."""
    model, ids = _model("opt"), _ids()
    targets = _targets(ids, 3)
    result = grasp(model, ids, targets, layers=[1])
    for site, unit in ((("heads", 1), "heads"), (("mid", 1), "neurons")):
        act = _capture(model, ids, [site])[site]
        f = _loss_of_perturbations(model, ids, targets, [site])

        def grad_at(eps, f=f):
            eps = eps.clone().requires_grad_(True)
            return torch.autograd.grad(f(eps), eps)[0]

        g = grad_at(torch.zeros_like(act))
        step = 1e-4 / g.norm()
        hg = (grad_at(step * g) - grad_at(-step * g)) / (2 * step)
        torch.testing.assert_close(result[unit][1], _fold("opt", -(act * hg), site[0]), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("hessian", probes.HESSIANS)
def test_grasp_per_example_rows_equal_each_example_alone_and_layers_do_not_interact(hessian):
    model, ids = _model("gpt_neox"), _ids(seed=7)
    targets = _targets(ids, 4)
    batch = grasp(model, ids, targets, hessian=hessian)
    for b in range(2):
        alone = grasp(model, ids[b:b + 1], targets[b:b + 1], layers=[2, 0], hessian=hessian)
        assert list(alone["heads"]) == [2, 0]
        for unit in ("heads", "neurons"):
            for layer in (0, 2):
                torch.testing.assert_close(alone[unit][layer][0], batch[unit][layer][b], **CLOSE)


def test_only_target_tokens_carry_the_loss():
    model, ids = _model("llama"), _ids(length=9)
    logits = torch.randn(2, 9, tiny.VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = _targets(ids, 5)
    relabelled = ids.clone()
    relabelled[:, 2] = (ids[:, 2] + 1) % tiny.VOCAB  # a non-target label
    torch.testing.assert_close(example_losses(logits, relabelled, targets), example_losses(logits, ids, targets))
    relabelled[:, 6] = (ids[:, 6] + 1) % tiny.VOCAB  # a target label
    assert not torch.allclose(example_losses(logits, relabelled, targets), example_losses(logits, ids, targets))
    # in the model: the last token feeds no loss when it is not a target, so its label cannot change grasp
    targets = _targets(ids, 4)
    targets[:, -1] = False
    other = ids.clone()
    other[:, -1] = (ids[:, -1] + 5) % tiny.VOCAB
    before, after = grasp(model, ids, targets), grasp(model, other, targets)
    for unit in ("heads", "neurons"):
        for layer, scores in before[unit].items():
            torch.testing.assert_close(after[unit][layer], scores, **CLOSE)
    targets[:, -1] = True  # ... and does once it is one
    assert not torch.allclose(grasp(model, other, targets)["heads"][2], grasp(model, ids, targets)["heads"][2])


def test_grasp_runs_in_float32_and_keeps_the_model_mode():
    model = _model("gemma3_text", torch.float32).train()
    ids = _ids()
    result = grasp(model, ids, _targets(ids, 2), layers=[1])
    assert model.training
    model.eval()
    reference = grasp(_model("gemma3_text"), ids, _targets(ids, 2), layers=[1])
    torch.testing.assert_close(result["heads"][1], reference["heads"][1], rtol=2e-3, atol=1e-5)
    assert result["heads"][1].dtype == torch.float64


# ---------------------------------------------------------------------------------------------- nwot
def _logdet(kernel):
    sign, logabs = np.linalg.slogdet(kernel)
    return logabs if sign > 0 else -np.inf


def _hamming_kernel(codes):
    """K_ij = N − Hamming(c_i, c_j) for (B, N) binary codes, entry by entry."""
    n = codes.shape[0]
    return np.array([[codes.shape[1] - np.count_nonzero(codes[i] != codes[j]) for j in range(n)] for i in range(n)],
                    dtype=np.float64)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_nwot_equals_hand_built_kernels(family):
    model, ids = _model(family), _ids(batch=3, seed=11)
    result = nwot(model, ids, None, layers=[1])
    acts = _capture(model, ids, [("heads", 1), ("pre", 1)])
    a = acts[("heads", 1)].numpy()
    heads = result["heads"][1].shape[1]
    d = a.shape[-1] // heads
    expected_heads = [_logdet(_hamming_kernel((a[:, :, h * d:(h + 1) * d] > 0).reshape(3, -1))) for h in range(heads)]
    u = acts[("pre", 1)].numpy()
    expected_neurons = [_logdet(_hamming_kernel(u[:, :, j] > 0)) for j in range(u.shape[-1])]
    assert result["heads"][1].shape == (1, heads) and result["neurons"][1].shape == (1, u.shape[-1])
    np.testing.assert_allclose(result["heads"][1][0].numpy(), expected_heads, rtol=1e-10)
    np.testing.assert_allclose(result["neurons"][1][0].numpy(), expected_neurons, rtol=1e-10)


def test_nwot_of_a_repeated_example_is_minus_infinity():
    model, ids = _model("llama"), _ids()
    twice = torch.cat([ids[:1], ids[:1]])
    result = nwot(model, twice, None, layers=[0], units=("heads",))
    assert result["neurons"] == {} and bool(torch.isneginf(result["heads"][0]).all())


# ---------------------------------------------------------------------------------------------- jacov / epenas
def _input_jacobian_rows(model, ids, targets, layer):
    """[head] → (N, T·hidden) rows ∂(Σ_d a_{b,p,h,d})/∂e_b for the loss positions, by functional.jacobian."""
    emb = model.get_input_embeddings()
    o = _modules(model, layer)["heads"]
    heads = adapter_for(model).attention_shape(model.config)[0]

    def f(e):
        seen = {}
        h1 = emb.register_forward_hook(lambda m, a, out: e)
        h2 = o.register_forward_pre_hook(lambda m, a: seen.__setitem__("a", a[0]))
        try:
            model(input_ids=ids)
        finally:
            h1.remove()
            h2.remove()
        return seen["a"].reshape(*ids.shape, heads, -1).sum(-1)  # each head's output summed over its dims

    with torch.no_grad():
        e0 = emb(ids)
    jac = torch.autograd.functional.jacobian(f, e0, vectorize=True)  # (B, T, H, B, T, hidden)
    positions = [(b, p) for b in range(ids.shape[0]) for p in range(ids.shape[1] - 1) if targets[b, p + 1]]
    return [np.stack([jac[b, p, h, b].reshape(-1).numpy() for b, p in positions]) for h in range(heads)], \
        np.array([int(ids[b, p + 1]) for b, p in positions])


def _loss_gradient_rows(model, ids, targets, layer):
    site = ("heads", layer)
    a = _capture(model, ids, [site])[site]
    eps = torch.zeros_like(a, requires_grad=True)
    g = torch.autograd.grad(_loss_of_perturbations(model, ids, targets, [site])(eps), eps)[0]
    heads = adapter_for(model).attention_shape(model.config)[0]
    d = g.shape[-1] // heads
    positions = [(b, p) for b in range(ids.shape[0]) for p in range(ids.shape[1] - 1) if targets[b, p + 1]]
    return [np.stack([g[b, p, h * d:(h + 1) * d].numpy() for b, p in positions]) for h in range(heads)]


def _jacov_np(rows):
    v = np.clip(np.linalg.eigvalsh(np.corrcoef(rows)), 0, None)
    return -np.sum(np.log(v + KK) + 1.0 / (v + KK))


def _epenas_np(rows, labels):
    """EPE-NAS for more than 100 classes: per-class Σ log(|corr| + k) / n_c; Σ_c Σ_c' |s_c − s_c'| / classes."""
    per_class = {}
    for row, label in zip(rows, labels):
        per_class.setdefault(label, []).append(row)
    s = {c: np.sum(np.log(np.abs(np.corrcoef(np.stack(r))) + KK)) / len(r) for c, r in per_class.items() if len(r) > 1}
    return sum(abs(s[c] - s[cj]) for c in s for cj in s) / len(s)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_jacov_and_epenas_equal_input_jacobians(family):
    model = _model(family)
    ids = _ids(high=5, seed=13)  # four distinct tokens: targets repeat
    targets = _targets(ids, 2)
    targets[1, 5] = False
    rows, labels = _input_jacobian_rows(model, ids, targets, 1)
    got_jacov = jacov(model, ids, targets, layers=[1])
    got_epenas = epenas(model, ids, targets, layers=[1])
    assert got_jacov["neurons"] == {} and got_jacov["heads"][1].shape == (1, len(rows))
    rtol = 1e-5 if family in FAMILY_CLOSE else 1e-8
    np.testing.assert_allclose(got_jacov["heads"][1][0].numpy(), [_jacov_np(r) for r in rows], rtol=rtol)
    np.testing.assert_allclose(got_epenas["heads"][1][0].numpy(), [_epenas_np(r, labels) for r in rows], rtol=rtol)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_jacov_and_epenas_on_loss_gradients(family):
    """jacobian='loss' (the reference's tensor): rows are ∂L/∂a at each loss position."""
    model = _model(family)
    ids = _ids(batch=3, length=10, high=4, seed=17)
    targets = _targets(ids, 3)
    rows = _loss_gradient_rows(model, ids, targets, 2)
    labels = np.array([int(ids[b, p + 1]) for b in range(3) for p in range(9) if targets[b, p + 1]])
    got_jacov = jacov(model, ids, targets, layers=[2], jacobian="loss")["heads"][2][0].numpy()
    got_epenas = epenas(model, ids, targets, layers=[2], jacobian="loss")["heads"][2][0].numpy()
    rtol = 1e-5 if family in FAMILY_CLOSE else 1e-8
    np.testing.assert_allclose(got_jacov, [_jacov_np(r) for r in rows], rtol=rtol)
    np.testing.assert_allclose(got_epenas, [_epenas_np(r, labels) for r in rows], rtol=rtol)


# ---------------------------------------------------------------------------------------------- registry & errors
def test_registry_describes_every_probe():
    assert set(PROBES) == {"grasp", "nwot", "jacov", "epenas"}
    assert PROBES["nwot"].min_batch == 2 and not PROBES["nwot"].needs_grad
    assert PROBES["grasp"].per_example and PROBES["grasp"].keep == "low"
    assert PROBES["jacov"].units == ("heads",) == PROBES["epenas"].units
    assert check("grasp", ("heads", "neurons"), batch_size=1) is PROBES["grasp"]
    model, ids = _model("opt"), _ids(batch=2)
    via_table = PROBES["nwot"](model, ids, None, [0])
    torch.testing.assert_close(via_table["heads"][0], nwot(model, ids, None, [0])["heads"][0])


def test_clear_errors():
    model, ids = _model("llama"), _ids()
    none = torch.zeros_like(ids, dtype=torch.bool)
    with pytest.raises(PrunekitError, match="unknown probe 'snip'; available: epenas, grasp, jacov, nwot"):
        check("snip")
    with pytest.raises(PrunekitError, match="needs batches of at least 2 examples"):
        nwot(model, ids[:1], None)
    with pytest.raises(PrunekitError, match="needs batches of at least 2 examples"):
        check("nwot", batch_size=1)
    for fn in (jacov, epenas):
        with pytest.raises(PrunekitError, match="scores heads only, not neurons"):
            fn(model, ids, _targets(ids, 1), units=("heads", "neurons"))
    for fn in (grasp, jacov, epenas):
        with pytest.raises(PrunekitError, match="no target tokens"):
            fn(model, ids, none)
    one_empty = _targets(ids, 3)
    one_empty[1] = False
    with pytest.raises(PrunekitError, match=r"examples \[1\] of the batch have no target tokens"):
        grasp(model, ids, one_empty)
    single = none.clone()
    single[0, -1] = True
    with pytest.raises(PrunekitError, match="needs at least 2"):
        jacov(model, ids, single)
    distinct = torch.arange(1, 17).reshape(2, 8)
    with pytest.raises(PrunekitError, match="none does"):
        epenas(model, distinct, _targets(distinct, 1))
    with pytest.raises(PrunekitError, match="hessian must be one of"):
        grasp(model, ids, _targets(ids, 1), hessian="full")
    with pytest.raises(PrunekitError, match="jacobian must be one of"):
        jacov(model, ids, _targets(ids, 1), jacobian="output")
    with pytest.raises(PrunekitError, match="units must be a non-empty subset"):
        grasp(model, ids, _targets(ids, 1), units=("experts",))
    with pytest.raises(PrunekitError, match=r"layers \[3\] out of range"):
        grasp(model, ids, _targets(ids, 1), layers=[3])
    with pytest.raises(PrunekitError, match="must have the shape of input_ids"):
        grasp(model, ids, _targets(ids, 1)[:, :4])
    with torch.inference_mode(), pytest.raises(PrunekitError, match="outside torch.inference_mode"):
        grasp(model, ids, _targets(ids, 1))
