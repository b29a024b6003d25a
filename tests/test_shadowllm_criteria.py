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
from prunekit.strategies.shadowllm.criteria import CRITERIA, Criterion, get, register

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


def _trace(model, ids, mask, layer=1, loss_mask=None):
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
    for b in range(B):
        if loss_mask is not None:  # the gradient pipeline's loss: mean CE over the example's target tokens
            target = loss_mask[b, 1:].bool()
            loss = loss + F.cross_entropy(logits[b, :-1], ids[b, 1:], reduction="none")[target].mean()
            continue
        n = int(lengths[b])  # next-token loss on the example's last CONT real tokens only
        loss = loss + F.cross_entropy(logits[b, n - CONT - 1:n - 1], ids[b, n - CONT:n], reduction="sum")
    loss.backward()
    for h in handles:
        h.remove()
    a = store["a"].detach().reshape(B, T, heads, -1)
    g = store["a"].grad.reshape(B, T, heads, -1)
    u = (store[u_role].detach().reshape(B, T, -1), store[u_role].grad.reshape(B, T, -1))
    z = (store["z"].detach().reshape(B, T, -1), store["z"].grad.reshape(B, T, -1))
    weights = {r: (ref.weight.detach().clone(), (ref.module.weight.grad.t() if ref.transposed else ref.module.weight.grad))
               for r, ref in producers.items()}
    trace = {"pre": u, "mid": z, "weights": weights, "mask": mask.bool()}
    return a, g, trace, {"ctx": m_ctx.grad.reshape(B, T, heads, -1), "u": m_u.grad, "z": m_z.grad}


def _neurons(criterion, trace):
    """A criterion's per-example neuron scores from a direct trace (weight criteria: one example)."""
    if criterion.neuron_site == "weights":
        return criterion.combine([criterion.neurons(w, g) for w, g in trace["weights"].values()]).unsqueeze(0)
    t, gt = trace[criterion.neuron_site]
    return criterion.neurons(t, gt, trace["mask"])


@pytest.fixture
def ids():
    return torch.randint(1, tiny.VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_criteria_equal_autograd(family, ids):
    model = _model(family)
    mask = torch.ones_like(ids)
    a, g, trace, mgrad = _trace(model, ids, mask)
    close = dict(rtol=1e-4, atol=1e-6)
    # heads
    assert torch.allclose(get("snip").heads(a, g, mask.bool()), mgrad["ctx"].sum((1, 3)).abs(), **close)
    assert torch.allclose(get("plainact").heads(a, g, mask.bool()), mgrad["ctx"].sum(3).abs().sum(1), **close)
    assert torch.allclose(get("fisher").heads(a, g, mask.bool()), mgrad["ctx"].pow(2).mean(1).sum(-1), **close)
    assert torch.allclose(get("l2_norm").heads(a, g, mask.bool()), a.pow(2).sum((1, 3)).sqrt(), **close)
    assert torch.allclose(get("grad_norm").heads(a, g, mask.bool()), g.pow(2).sum((1, 3)).sqrt(), **close)
    # neurons: the weight criteria from autograd's own weight gradients (one example), the others by unit masks
    w = trace["weights"]
    plain = sum((wt * gr).abs().sum(-1) for wt, gr in w.values())
    assert torch.allclose(_neurons(get("plainact"), trace)[0], plain, **close)
    assert torch.allclose(_neurons(get("grad_norm"), trace)[0], sum(gr.pow(2).sum(-1) for _, gr in w.values()).sqrt(), **close)
    assert torch.allclose(_neurons(get("snip"), trace), mgrad["z"].sum(1).abs(), **close)
    assert torch.allclose(_neurons(get("fisher"), trace), mgrad["u"].pow(2).mean(1), **close)
    assert torch.allclose(_neurons(get("l2_norm"), trace), trace["pre"][0].pow(2).sum(1).sqrt(), **close)
    width = trace["mid"][0].shape[-1]
    for criterion in CRITERIA.values():  # every score is a finite, non-negative number per unit
        assert criterion.heads(a, g, mask.bool()).shape == a.shape[:1] + a.shape[2:3]
        scores = _neurons(criterion, trace)
        assert scores.shape == (1, width) and bool((scores >= 0).all() and scores.isfinite().all())


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
    a, g, trace, _ = _trace(model, batch, mask)
    for b, one in enumerate((first, second)):
        a1, g1, t1, _ = _trace(model, one, torch.ones_like(one))
        for criterion in CRITERIA.values():
            assert torch.allclose(criterion.heads(a, g, mask.bool())[b], criterion.heads(a1, g1, t1["mask"])[0],
                                  rtol=1e-4, atol=1e-6), criterion.name
            if criterion.neuron_site != "weights":  # weight gradients are per batch: one example at a time
                assert torch.allclose(_neurons(criterion, trace)[b], _neurons(criterion, t1)[0], rtol=1e-4,
                                      atol=1e-6), criterion.name


def test_registry_lists_names_and_refuses_duplicates():
    with pytest.raises(PrunekitError, match="unknown criterion 'nope'; registered: fisher, grad_norm, l2_norm"):
        get("nope")
    with pytest.raises(PrunekitError, match="already registered"):
        register(Criterion("snip", CRITERIA["snip"].heads, "mid", CRITERIA["snip"].neurons))
    with pytest.raises(PrunekitError, match="neuron_site must be one of"):
        Criterion("odd", CRITERIA["snip"].heads, "nowhere", CRITERIA["snip"].neurons)


class _Probe:
    """A strategy that only records a criterion's per-example scores (the gradient pipeline feeds it)."""

    @staticmethod
    def make(name):
        from prunekit.plans import UnitCut
        from prunekit.strategies.shadowllm import traces
        from prunekit.strategy import PruningStrategy

        class Probe(PruningStrategy):
            def __init__(self):
                super().__init__(sparsity=0.0, mode="all-at-once")
                self.criterion, self.result = get(name), None

            @property
            def pipeline(self):
                return "gradient" if self.criterion.needs_grad else "all-at-once"

            def observers(self, model, layer):
                return traces.observers(model, self.criterion)

            def decide(self, model, observed, layer, context):
                self.result = traces.per_example(model, observed, self.criterion)
                return UnitCut({})

        return Probe()


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_pipeline_records_equal_direct_autograd(tiny_llama, name):
    """Through the gradient pipeline (task examples, loss on the gold continuation, one example per batch): every
    layer's per-example head and neuron scores equal the direct computation, in example order."""
    from prunekit.api import plan
    from prunekit.data import CalibrationDataModule
    from prunekit.models import load_model

    dm = CalibrationDataModule(str(tiny_llama), corpus="task", corpus_options={"tasks": ["copa"]},
                               packing="documents", num_samples=3, seq_len=64)
    probe = _Probe.make(name)
    plan(probe, str(tiny_llama), dm)
    result = probe.result
    assert result["index"].tolist() == [0, 1, 2]
    model = load_model(str(tiny_llama)).requires_grad_(True)
    criterion = get(name)
    for e, (ids, loss_mask) in enumerate(zip(dm.calibration_sequences(), dm.calibration_loss_masks())):
        for layer in range(len(adapter_for(model).layers(model))):
            a, g, trace, _ = _trace(model, ids[None], torch.ones_like(ids[None]), layer, loss_mask[None])
            torch.testing.assert_close(result["heads"][layer][e], criterion.heads(a, g, trace["mask"])[0].double(),
                                       rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(result["neurons"][layer][e], _neurons(criterion, trace)[0].double(),
                                       rtol=1e-4, atol=1e-7)


def test_weight_criteria_refuse_batches_of_several_examples(tiny_llama):
    from prunekit.api import plan
    from prunekit.data import CalibrationDataModule

    dm = CalibrationDataModule(str(tiny_llama), num_samples=2, seq_len=32, batch_size=2)
    with pytest.raises(PrunekitError, match="one example at a time; use --data.batch_size 1"):
        plan(_Probe.make("plainact"), str(tiny_llama), dm)
