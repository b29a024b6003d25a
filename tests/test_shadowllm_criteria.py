"""ShadowLLM's criteria (groundwork): each equals a direct autograd computation — the gradient of a unit mask for
snip, plainact (per token and head) and fisher, autograd's own weight gradients for the weight criteria — on a
tiny model of every family, with the loss on the continuation only, and per-example scores of a padded batch equal
to each example alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import tiny
from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.strategies.shadowllm.criteria import CRITERIA, Criterion, NeuronTrace, get, register

PRODUCERS = ("gate", "up", "fc1")
CONSUMERS = ("down", "fc2")
CONT = 3  # continuation tokens that carry the loss


def _model(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.config(family)).eval()
    for ref in adapter_for(model).linears(model):
        if getattr(ref.module, "bias", None) is not None:
            ref.module.bias.data.normal_(0, 0.1)
    return model


def _trace(model, ids, mask, layer=1):
    """Forward + backward with unit masks on the head contexts (per token, head and dim), on u and on z; returns
    (a, g, NeuronTrace, mask gradients, weight gradients) of ``layer``."""
    heads = adapter_for(model).attention_shape(model.config)[0]
    refs = {r.role: r for r in adapter_for(model).linears(model) if r.layer == layer}
    B, T = ids.shape
    store, handles = {}, []
    o = refs["o"].module
    width = next(refs[r] for r in CONSUMERS if r in refs).in_features
    m_ctx = torch.ones(B, T, refs["o"].in_features, requires_grad=True)
    m_u = torch.ones(B, T, width, requires_grad=True)
    m_z = torch.ones(B, T, width, requires_grad=True)

    def pre_o(module, args):
        a = args[0]
        a.retain_grad()
        store["a"] = a
        return (a * m_ctx,) + args[1:]

    handles.append(o.register_forward_pre_hook(pre_o))
    producers = {r: refs[r] for r in PRODUCERS if r in refs}
    u_role = "gate" if "gate" in producers else "fc1"
    for role, ref in producers.items():
        def hook(module, args, out, role=role):
            store["x"] = args[0]
            out.retain_grad()
            store[role] = out
            return out * m_u if role == u_role else out
        handles.append(ref.module.register_forward_hook(hook))
    consumer = next(refs[r] for r in CONSUMERS if r in refs)

    def pre_c(module, args):
        z = args[0]
        z.retain_grad()
        store["z"] = z
        return (z * m_z,) + args[1:]

    handles.append(consumer.module.register_forward_pre_hook(pre_c))
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    lengths = mask.sum(1)
    loss = 0
    for b in range(B):  # next-token loss on each example's last CONT real tokens only
        n = int(lengths[b])
        loss = loss + F.cross_entropy(logits[b, n - CONT - 1:n - 1], ids[b, n - CONT:n], reduction="sum")
    loss.backward()
    for h in handles:
        h.remove()
    a = store["a"].detach().reshape(B, T, heads, -1)
    g = store["a"].grad.reshape(B, T, heads, -1)
    x = store["x"].detach().reshape(B, T, -1)
    outputs = {r: (store[r].detach().reshape(B, T, -1), store[r].grad.reshape(B, T, -1)) for r in producers}
    z, gz = store["z"].detach().reshape(B, T, -1), store["z"].grad.reshape(B, T, -1)
    trace = NeuronTrace(x, outputs, {r: ref.weight.detach() for r, ref in producers.items()}, z, gz, mask.bool())
    wgrads = {r: (ref.module.weight.grad.t() if ref.transposed else ref.module.weight.grad) for r, ref in producers.items()}
    return a, g, trace, {"ctx": m_ctx.grad.reshape(B, T, heads, -1), "u": m_u.grad, "z": m_z.grad}, wgrads


@pytest.fixture
def ids():
    return torch.randint(1, tiny.VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_criteria_equal_autograd(family, ids):
    model = _model(family)
    mask = torch.ones_like(ids)
    a, g, trace, mgrad, wgrads = _trace(model, ids, mask)
    close = dict(rtol=1e-4, atol=1e-6)
    # heads
    assert torch.allclose(get("snip").heads(a, g, mask.bool()), mgrad["ctx"].sum((1, 3)).abs(), **close)
    assert torch.allclose(get("plainact").heads(a, g, mask.bool()), mgrad["ctx"].sum(3).abs().sum(1), **close)
    assert torch.allclose(get("fisher").heads(a, g, mask.bool()), mgrad["ctx"].pow(2).mean(1).sum(-1), **close)
    assert torch.allclose(get("l2_norm").heads(a, g, mask.bool()), a.pow(2).sum((1, 3)).sqrt(), **close)
    assert torch.allclose(get("grad_norm").heads(a, g, mask.bool()), g.pow(2).sum((1, 3)).sqrt(), **close)
    # neurons: weight criteria against autograd's weight gradients (one example)
    plain = sum((trace.weights[r] * wgrads[r]).abs().sum(-1) for r in wgrads)
    assert torch.allclose(get("plainact").neurons(trace)[0], plain, **close)
    gnorm = sum(wgrads[r].pow(2).sum(-1) for r in wgrads).sqrt()
    assert torch.allclose(get("grad_norm").neurons(trace)[0], gnorm, **close)
    assert torch.allclose(get("snip").neurons(trace), mgrad["z"].sum(1).abs(), **close)
    assert torch.allclose(get("fisher").neurons(trace), mgrad["u"].pow(2).mean(1), **close)
    u = trace.u[0]
    assert torch.allclose(get("l2_norm").neurons(trace), u.pow(2).sum(1).sqrt(), **close)
    for criterion in CRITERIA.values():  # every score is a finite, non-negative number per unit
        assert criterion.heads(a, g, mask.bool()).shape == a.shape[:1] + a.shape[2:3]
        scores = criterion.neurons(trace)
        assert scores.shape == trace.z.shape[::2] and bool((scores >= 0).all() and scores.isfinite().all())


def test_the_loss_covers_only_the_continuation(ids):
    """In the last layer a head's context at position t reaches only the logits at t: with the loss on the last CONT
    tokens only, the positions that predict context tokens get no gradient, the ones predicting the answer do."""
    model = _model("llama")
    last = len(adapter_for(model).layers(model)) - 1
    a, g, *_ = _trace(model, ids, torch.ones_like(ids), layer=last)
    T = ids.shape[1]
    assert torch.count_nonzero(g[:, :T - CONT - 1]) == 0 and torch.count_nonzero(g[:, -1]) == 0
    assert all(torch.count_nonzero(g[:, t]) > 0 for t in range(T - CONT - 1, T - 1))


def test_per_example_scores_of_a_padded_batch_equal_each_alone():
    model = _model("llama")
    gen = torch.Generator().manual_seed(5)
    first, second = torch.randint(1, tiny.VOCAB, (1, 10), generator=gen), torch.randint(1, tiny.VOCAB, (1, 7), generator=gen)
    batch = torch.zeros(2, 10, dtype=torch.long)
    batch[0], batch[1, :7] = first[0], second[0]
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0], mask[1, :7] = 1, 1
    a, g, trace, _, _ = _trace(model, batch, mask)
    for b, one in enumerate((first, second)):
        a1, g1, t1, _, _ = _trace(model, one, torch.ones_like(one))
        for criterion in CRITERIA.values():
            assert torch.allclose(criterion.heads(a, g, mask.bool())[b], criterion.heads(a1, g1, t1.mask)[0],
                                  rtol=1e-4, atol=1e-6), criterion.name
            assert torch.allclose(criterion.neurons(trace)[b], criterion.neurons(t1)[0], rtol=1e-4, atol=1e-6), \
                criterion.name


def test_registry_lists_names_and_refuses_duplicates():
    with pytest.raises(PrunekitError, match="unknown criterion 'nope'; registered: fisher, grad_norm, l2_norm"):
        get("nope")
    with pytest.raises(PrunekitError, match="already registered"):
        register(Criterion("snip", CRITERIA["snip"].heads, CRITERIA["snip"].neurons))
