"""Per-example criterion scores through prunekit's gradient pipeline: the observers a criterion needs, and the
(examples × heads) and (examples × neurons) tables per layer they record (ordered by example index, so one process
and several agree).

Heads are query heads (the o_proj input split by head; under grouped-query attention a KV group's score is the sum
of its query heads', left to the consumer of these tables). Neurons are MLP intermediate channels.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.arch import adapter_for
from prunekit.errors import PrunekitError
from prunekit.observe import Observer, per_head, site
from prunekit.stats import Records
from prunekit.strategies.shadowllm.criteria import Criterion

PRODUCERS = ("gate", "up", "fc1")


def _all_real(batch) -> torch.Tensor:
    return torch.ones(batch.input_ids.shape, dtype=torch.bool, device=batch.input_ids.device)


def observers(model: nn.Module, criterion: Criterion, layers: list[int] | None = None,
              per_source: bool = False) -> list[Observer]:
    """Observers recording ``criterion``'s per-example head and neuron scores of ``layers`` (default: all);
    ``per_source``: also per calibration source (task), as ``s@<source>``."""
    adapter = adapter_for(model)
    heads = adapter.attention_shape(model.config)[0]
    split = per_head(heads)
    grad = criterion.needs_grad
    out = []
    for i in layers if layers is not None else range(len(adapter.layers(model))):
        refs = {r.role: r for r in adapter.linears(model) if r.layer == i}
        width = next(refs[r] for r in ("down", "fc2") if r in refs).in_features

        def head_scores(x, g, batch, c=criterion):
            a = split(x, None, batch)
            return c.heads(a, split(g, None, batch) if g is not None else torch.zeros_like(a), _all_real(batch))

        context, _ = site(model, i, "attn_context")
        out.append(Observer(context, {"s": Records}, "input", grad=grad, features=heads,
                            key=f"{criterion.name}.heads.{i}", transform=head_scores, per_source=per_source))
        if criterion.neuron_site in ("pre", "mid"):
            module, where = site(model, i, "mlp_pre" if criterion.neuron_site == "pre" else "mlp_mid")

            def neuron_scores(t, g, batch, c=criterion):
                return c.neurons(t, g if g is not None else torch.zeros_like(t), _all_real(batch))

            out.append(Observer(module, {"s": Records}, where, grad=grad, features=width,
                                key=f"{criterion.name}.neurons.{i}", transform=neuron_scores,
                                per_source=per_source))
        else:
            for role in (r for r in PRODUCERS if r in refs):
                def weight_scores(w, g, batch, c=criterion):
                    if batch.size != 1:
                        raise PrunekitError(f"criterion {c.name!r} scores neurons from weight gradients, which are "
                                            f"per example only one example at a time; use --data.batch_size 1 "
                                            f"(got batches of {batch.size})")
                    return c.neurons(w, g).unsqueeze(0)

                out.append(Observer(refs[role].name, {"s": Records}, "weight", grad=True, features=width,
                                    key=f"{criterion.name}.neurons.{i}.{role}", transform=weight_scores,
                                    per_source=per_source))
    return out


def per_example(model: nn.Module, observed, criterion: Criterion, layers: list[int] | None = None,
                source: str | None = None) -> dict:
    """``{"index": (E,), "heads": {layer: (E, H)}, "neurons": {layer: (E, D)}}`` from what :func:`observers` recorded
    (``source``: only that calibration source's examples; needs ``per_source`` observers)."""
    adapter = adapter_for(model)
    stat = "s" if source is None else f"s@{source}"
    result: dict = {"heads": {}, "neurons": {}}
    for i in layers if layers is not None else range(len(adapter.layers(model))):
        records = observed[f"{criterion.name}.heads.{i}"][stat]
        result["index"] = records.index
        result["heads"][i] = records.values
        if criterion.neuron_site in ("pre", "mid"):
            result["neurons"][i] = observed[f"{criterion.name}.neurons.{i}"][stat].values
        else:
            roles = [r for r in PRODUCERS if f"{criterion.name}.neurons.{i}.{r}" in observed]
            result["neurons"][i] = criterion.combine([observed[f"{criterion.name}.neurons.{i}.{r}"][stat].values
                                                      for r in roles])
    return result


# ---------------------------------------------------------------------------------------------- predictor inputs
FEATURE_KEY = "feature.layer0"
LAYER_INPUT_KEY = "feature.input.{}"


def _last_token(x, g, batch):
    """Each example's last token (calibration batches of task examples hold one unpadded example each)."""
    return x[:, -1, :]


def feature_observers(model: nn.Module, layer_inputs: list[int] | None = None) -> list[Observer]:
    """Per example: ShadowLLM's feature — the last token's layer-0 attention context (o_proj's input) — and, for
    each layer in ``layer_inputs``, the hidden state entering that decoder layer at the last token (the input of
    a DejaVu-style per-layer predictor)."""
    adapter = adapter_for(model)
    context, where = site(model, 0, "attn_context")
    width = adapter.attention_shape(model.config)[0] * adapter.attention_shape(model.config)[2]
    out = [Observer(context, {"s": Records}, where, features=width, key=FEATURE_KEY, transform=_last_token)]
    stack = adapter.layers_path
    hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd
    for i in layer_inputs or []:
        out.append(Observer(f"{stack}.{i}", {"s": Records}, "input", features=hidden, key=LAYER_INPUT_KEY.format(i),
                            transform=_last_token))
    return out


def features(observed, layer_inputs: list[int] | None = None) -> dict:
    """``{"index": (E,), "layer0": (E, F), "inputs": {layer: (E, hidden)}}`` — raw (normalise before use)."""
    records = observed[FEATURE_KEY]["s"]
    return {"index": records.index, "layer0": records.values,
            "inputs": {i: observed[LAYER_INPUT_KEY.format(i)]["s"].values for i in layer_inputs or []}}
