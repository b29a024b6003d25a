"""The ``griffin`` strategy: GRIFFIN needs no calibration; it decides a runtime policy (its runtime installed in
the model, over whatever static pruning the model already carries).

Composition: GRIFFIN on a statically pruned model is ``prunekit prune --model <a folder prunekit wrote> --strategy
griffin``: the folder's cut widths (FLAP, SEAP-gen, Wanda-SP) or zeros (Wanda, SparseGPT) load first, GRIFFIN
chooses its experts among each layer's remaining neurons (k = int(density · that layer's width)), and the output
folder holds both — ``prunekit.load_pruned`` restores the cut model with GRIFFIN installed.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.plans import RuntimePolicy
from prunekit.strategy import PruningStrategy
from prunekit.strategies.griffin.runtime import GriffinRuntime


class Griffin(PruningStrategy):
    """GRIFFIN: per-sequence MLP experts chosen from the prompt's activations, used in generation; no data.

    Dong et al., 2024. See ``prunekit.strategies.griffin.runtime`` for the method and where it
    differs from the reference code.

    Args:
        density: fraction of MLP neurons kept in generation, in (0, 1] (reference default 0.5); one value or one
            per decoder layer.
        variant: ``topk`` (GRIFFIN), ``sample``, ``topk_sample``, ``random`` (the paper's ablations) or
            ``magnitude`` (its static baseline: the same top-k of ‖W_gate,j‖·‖W_up,j‖ for every sequence).
        mode: ``auto`` (generation sparse; perplexity windows split at half; lm-eval log-likelihood in class
            mode), ``gen``, ``class`` or ``prefix``.
        prefix: P for mode ``prefix`` (positions from P on use the experts chosen from the first P tokens).
        batch_rule: ``per_sequence`` (each sequence its own experts) or ``shared`` (the paper's batch rule).
        seed: seeds the sampling variants.
    """

    name = "griffin"

    def __init__(self, density: float | list[float] = 0.5,
                 variant: Literal["topk", "sample", "topk_sample", "random", "magnitude"] = "topk",
                 mode: Literal["auto", "gen", "class", "prefix"] = "auto", prefix: int | None = None,
                 batch_rule: Literal["per_sequence", "shared"] = "per_sequence", seed: int = 0) -> None:
        densities = density if isinstance(density, (list, tuple)) else [density]
        super().__init__(sparsity=0.0, modules=["mlp"])
        GriffinRuntime(density, variant, mode, prefix, batch_rule, seed)  # option errors now, before any model loads
        self.options = dict(density=list(density) if isinstance(density, (list, tuple)) else float(density),
                            variant=variant, mode=mode, prefix=prefix, batch_rule=batch_rule, seed=seed)
        self.density = density
        self.sparsity = 1 - sum(float(d) for d in densities) / len(densities)

    @property
    def pipeline(self) -> str:
        return "none"

    def check(self, model: nn.Module) -> None:
        from prunekit.arch import adapter_for

        layers = len(adapter_for(model).layers(model))
        if isinstance(self.density, (list, tuple)) and len(self.density) != layers:
            raise PrunekitError(f"{len(self.density)} per-layer densities given for a model with {layers} decoder "
                                "layers; give one value or one per layer")
        if getattr(model, "_prunekit_runtime", None) is not None:
            raise PrunekitError("the model already carries a runtime (a folder pruned with a dynamic method); "
                                "GRIFFIN goes on a dense or statically pruned model")
        probe = GriffinRuntime(**self.options)
        probe.install(model)  # every layer has an MLP the runtime can drive
        probe.remove(model)

    def decide(self, model: nn.Module, observed, layer, context) -> RuntimePolicy:
        return RuntimePolicy(runtime=GriffinRuntime(**self.options))

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, **{k: v for k, v in self.options.items() if v is not None}}

    def label(self) -> str:
        density = self.options["density"]
        what = f"density {density:g}" if isinstance(density, float) else "per-layer density"
        variant = "" if self.options["variant"] == "topk" else f", {self.options['variant']}"
        return f"griffin ({what}{variant})"
