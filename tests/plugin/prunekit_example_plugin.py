"""Third-party strategies written against prunekit's public API only (installed by tests/test_plugin.py exactly as a
user installs a plugin): a seeded random baseline, a gradient-criterion method with per-example records, and a
dynamic method that installs an input-dependent runtime."""

from __future__ import annotations

import zlib

import torch

from prunekit.arch import adapter_for
from prunekit.masks import lowest_global
from prunekit.observe import Observer, per_head, site
from prunekit.plans import LayerCut, RuntimePolicy, Runtime, UnitCut
from prunekit.stats import Records, Sum
from prunekit.strategy import PruningStrategy


class RandomPruning(PruningStrategy):
    """Random pruning: a seeded uniform score per weight (third-party plugin example)."""

    name = "random"
    statistics = {}

    def __init__(self, sparsity: float | None = None, modules: list[str] | None = None, seed: int = 0) -> None:
        super().__init__(sparsity=sparsity, modules=modules)
        self.seed = seed

    def prune_linear(self, ref, stats):
        gen = torch.Generator().manual_seed(self.seed + zlib.crc32(ref.name.encode()))
        return lowest_global(torch.rand(ref.weight.shape, generator=gen), self.sparsity)


def head_contribution(x: torch.Tensor, g: torch.Tensor, batch, heads: int) -> torch.Tensor:
    """Per example and query head: Σ_t |Σ_d a·g| over its tokens (a = head context, g = ∂L/∂a)."""
    a, grad = per_head(heads)(x, None, batch), per_head(heads)(g, None, batch)
    per_token = (a * grad).sum(-1).abs()  # (B, T, heads)
    return per_token.sum(1)


class GradientProbe(PruningStrategy):
    """Gradient probe: MLP channels by |W ⊙ ∂L/∂W| of down_proj; per-example head scores recorded (plugin example).

    Runs on the gradient pipeline (the loss is taken on each example's target tokens: the gold continuation of
    a task example). Observers: down_proj's weight with its gradient (Σ|W ⊙ G| per input channel, summed over
    batches) and the attention output projection's input with its gradient, per head and per example
    (a ``Records`` statistic). Decides a ``UnitCut``: ``sparsity`` of every layer's MLP channels.
    """

    name = "grad-probe"

    def __init__(self, sparsity: float = 0.25) -> None:
        super().__init__(sparsity=sparsity, mode="all-at-once", modules=["down"])

    @property
    def pipeline(self) -> str:
        return "gradient"

    def observers(self, model, layer):
        heads = adapter_for(model).attention_shape(model.config)[0]
        out = []
        for i in range(len(adapter_for(model).layers(model))):
            down, _ = site(model, i, "mlp_mid")
            context, _ = site(model, i, "attn_context")
            out.append(Observer(down, {"saliency": Sum}, where="weight", grad=True, key=f"saliency.{i}",
                                transform=lambda w, g, b: (w * g).abs().sum(0)))
            out.append(Observer(context, {"heads": Records}, where="input", grad=True, features=heads,
                                key=f"heads.{i}", transform=lambda x, g, b, h=heads: head_contribution(x, g, b, h)))
        return out

    def decide(self, model, observed, layer, context):
        cuts = {}
        for i in range(len(adapter_for(model).layers(model))):
            score = observed[f"saliency.{i}"]["saliency"].total
            count = int(self.sparsity * score.numel())
            cuts[i] = LayerCut([], torch.sort(score, stable=True)[1][:count].tolist())
        return UnitCut(cuts)

    def describe(self):
        return {"strategy": self.name, "sparsity": self.sparsity}


class TopKChannels(Runtime):
    """Keep, per token, the ``density`` fraction of MLP channels with the largest |z| (the down projection's
    input); the others are zeroed. Input-dependent, stateless between calls."""

    def __init__(self, density: float = 0.5) -> None:
        self.density = float(density)
        self._handles = []

    def _hook(self, module, args):
        z = args[0]
        k = max(1, int(self.density * z.shape[-1]))
        keep = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, z.abs().topk(k, dim=-1).indices, True)
        return (z * keep,) + tuple(args[1:])

    def install(self, model):
        for ref in adapter_for(model).linears(model):
            if ref.role in ("down", "fc2"):
                self._handles.append(ref.module.register_forward_pre_hook(self._hook))

    def remove(self, model):
        for h in self._handles:
            h.remove()
        self._handles = []

    def state(self):
        return {"density": self.density}


class TopKRuntime(PruningStrategy):
    """Top-k runtime: per-token top-k MLP channels installed in the model (dynamic-plan plugin example)."""

    name = "topk-runtime"

    def __init__(self, density: float = 0.5) -> None:
        super().__init__(sparsity=1 - density, modules=["mlp"])
        self.density = density

    def decide(self, model, observed, layer, context):
        return RuntimePolicy(runtime=TopKChannels(self.density))

    def describe(self):
        return {"strategy": self.name, "density": self.density}
