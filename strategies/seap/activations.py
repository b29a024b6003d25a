"""Activation profiles: the dimension-wise ℓ2 norm of hidden states, per decoder layer, per task.

The SEAP paper (Liang et al., 2025, Figure 3; IAAR-Shanghai/SEAP ``src/activations.py``) shows that prompts of
one task light up the same hidden dimensions, and different tasks different ones: for each layer it plots the
per-dimension activation statistic of a task's prompts over a random sample of dimensions, standardised
(z-score) across those dimensions, for two subsets of the same task side by side. prunekit computes:

- **profile** of a set of sequences at a *site* (the input of a projection): for layer ``l`` and hidden
  dimension ``d``, ``‖X_{l,d}‖₂ / √N`` over all N tokens (the root mean square, so subsets of different sizes
  compare). Sites: ``attn_in`` (normalised input of q/k/v), ``mlp_in`` (of gate/up), ``attn_mid`` (input of
  o_proj: the heads' concatenated outputs), ``mlp_mid`` (input of down_proj: the intermediate activations).
  Statistics accumulate in float64 through the same observers and multi-process reduction as the pruning
  strategies (``prunekit.observe``, ``prunekit.stats.ChannelSumSq``), during a Lightning ``predict`` pass.
- **two random halves** per task: the task's calibration examples (never scored), rendered by lm-eval with
  their gold answers and fed one per forward pass; a seeded random choice of ``num_samples`` split into
  halves A and B. (The reference's plotting code fills both of its subsets with the same statistics; here
  they are disjoint examples, so their agreement is a real measurement.)
- **similarity** of halves: the profiles' logarithms, minus their mean over every (task, half), flattened
  over layers and dimensions; cosine similarity between every A and every B. A diagonal that beats the rest
  (``same_task`` > ``other_tasks``; ``retrieval`` = fraction of tasks whose B half is nearest its own A half)
  says activations are task-specific, which is what SEAP's task-specific pruning relies on. The log and the
  centring keep the few massive-activation dimensions every input shares from dominating the cosine.

Differences from the reference figure: it plots the raw mean of x² ("l2" field); we plot its square root (the
ℓ2 norm the paper's text names). Both are z-scored per layer over the sampled dimensions, so only the
contrast differs.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from prunekit.arch import LinearRef, adapter_for
from prunekit.errors import PrunekitError
from prunekit.stats import ChannelSumSq

SITES = {  # site -> roles whose input it is, first present wins (Llama-style names, then fused/GPT-style ones)
    "attn_in": ("q", "qkv"),
    "attn_mid": ("o",),
    "mlp_in": ("gate", "up", "fc1"),
    "mlp_mid": ("down", "fc2"),
}


def site_refs(model: torch.nn.Module, site: str) -> list[LinearRef]:
    """One projection per decoder layer whose input is ``site``, in layer order."""
    if site not in SITES:
        raise PrunekitError(f"unknown activation site {site!r}; choose from {', '.join(SITES)}")
    by_layer: dict[int, LinearRef] = {}
    for role in SITES[site]:
        for ref in adapter_for(model).linears(model):
            if ref.role == role and ref.layer not in by_layer:
                by_layer[ref.layer] = ref
    refs = [by_layer[i] for i in sorted(by_layer)]
    widths = {r.in_features for r in refs}
    if not refs or len(widths) != 1 or 0 in widths:
        raise PrunekitError(f"site {site!r} has per-layer widths {sorted(widths)}; a profile needs one non-zero "
                            "width in every layer (structurally pruned models: use attn_in or mlp_in)")
    return refs


def profile(trainer: pl.Trainer, pl_module: pl.LightningModule, loader, sites: list[str],
            description: str = "profiling") -> dict[str, torch.Tensor]:
    """One Lightning ``predict`` pass over ``loader`` with an observer per layer and site (statistics reduced
    across processes); returns ``{site: (layers, dims) RMS}``: each dimension's root mean square over all
    tokens."""
    from prunekit.observe import Observer, ObserverSet
    from prunekit.pipeline import ObservePass, comm

    model = pl_module.model
    by_site = {site: [Observer(ref.name, {"act": ChannelSumSq}, features=ref.in_features) for ref in site_refs(model, site)]
               for site in sites}
    observers = ObserverSet([o for group in by_site.values() for o in group])
    observers.build(model, None)
    observers.attach()
    try:
        trainer.predict(ObservePass(model, observers, description=description), dataloaders=loader,
                        return_predictions=False)
    finally:
        observers.detach()
    observers.reduce(comm(trainer))
    out = {}
    for site, group in by_site.items():
        rows = []
        for o in group:
            stat = o.stats["act"]
            if stat.count == 0:
                raise PrunekitError("the profile pass saw no tokens; give it at least one sequence")
            rows.append((stat.sumsq / stat.count).sqrt())
        out[site] = torch.stack(rows)
    return out


def halves(sequences: list[Any]) -> tuple[list[Any], list[Any]]:
    """Split already randomly ordered sequences into two disjoint halves (A gets the odd one out)."""
    if len(sequences) < 2:
        raise PrunekitError(f"two halves need at least 2 examples, got {len(sequences)}; raise num_samples")
    cut = math.ceil(len(sequences) / 2)
    return sequences[:cut], sequences[cut:]


def similarity(profiles: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Cosine similarity of centred log-profiles between halves (see the module docstring).

    ``profiles``: ``{task: {"A": (layers, dims), "B": (layers, dims)}}`` for one site. Returns the (tasks × tasks)
    matrix (rows: half A, columns: half B), ``same_task`` (mean diagonal), ``other_tasks`` (mean off-diagonal,
    ``retrieval`` and the per-task diagonal; all ``None`` for fewer than two tasks.
    """
    tasks = list(profiles)
    if len(tasks) < 2:  # centring over one task's two halves makes them opposite by construction
        return {"tasks": tasks, "matrix": None, "same_task": None, "other_tasks": None, "retrieval": None,
                "per_task": {}}
    logs = {(t, h): profiles[t][h].double().clamp_min(1e-12).log().flatten() for t in tasks for h in ("A", "B")}
    centre = torch.stack(list(logs.values())).mean(0)
    dev = {k: v - centre for k, v in logs.items()}
    a = torch.stack([dev[(t, "A")] for t in tasks])
    b = torch.stack([dev[(t, "B")] for t in tasks])
    matrix = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    n = len(tasks)
    diagonal = matrix.diagonal()
    off = matrix[~torch.eye(n, dtype=torch.bool)]
    return {"tasks": tasks, "matrix": matrix.tolist(), "same_task": float(diagonal.mean()),
            "other_tasks": float(off.mean()),
            "retrieval": float((matrix.argmax(0) == torch.arange(n)).double().mean()),
            "per_task": dict(zip(tasks, diagonal.tolist()))}


@torch.no_grad()
def prompt_states(model: torch.nn.Module, sequences: list[torch.Tensor], layers: list[int]) -> torch.Tensor:
    """(prompts, len(layers), hidden): each prompt's hidden state entering each listed decoder layer (the
    residual stream) at its last token, scaled to unit norm.

    The last token is what a causal LM has read the whole prompt into. Averaging over tokens instead is
    dominated by the first token's massive activations (on SmolLM2 the silhouette of the task labels is then
    ≈ 0 at every layer; last-token states reach 0.12–0.16 in the upper layers on 20 prompts per task)."""
    rows = []
    for ids in sequences:
        states = model(input_ids=ids.reshape(1, -1), output_hidden_states=True, use_cache=False).hidden_states
        last = torch.stack([states[layer][0, -1].float() for layer in layers])
        rows.append(last / last.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.stack(rows)


def projection_layers(num_layers: int, count: int = 6) -> list[int]:
    """``count`` layers spread evenly from the first to the last decoder layer."""
    if count >= num_layers:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})


def project(states: torch.Tensor, labels: list[int], seed: int = 0) -> tuple[list, list[float]]:
    """Per layer, a 2-D t-SNE of the prompts (scikit-learn, seeded) and the silhouette score of the task labels
    in the original space (cosine; higher = prompts of one task closer to each other than to other tasks')."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    n = states.shape[0]
    if len(set(labels)) < 2 or n < 4:
        raise PrunekitError("a projection needs at least two tasks and four prompts")
    points, silhouettes = [], []
    for j in range(states.shape[1]):
        x = states[:, j].double()
        if torch.unique(x, dim=0).shape[0] < n:  # prompts ending in the same token share their layer-0 state:
            g = torch.Generator().manual_seed(seed)  # t-SNE needs distinct points (seeded, 1e-6 of the spread)
            x = x + 1e-6 * x.std().clamp_min(1e-12) * torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = x.numpy()
        # Barnes-Hut for many prompts; the exact gradient for a few hundred (cheap there, and scikit-learn's
        # Barnes-Hut tree crashed the interpreter on some 14-prompt inputs)
        tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), random_state=seed, init="pca",
                    method="exact" if n <= 500 else "barnes_hut")
        points.append(tsne.fit_transform(x).tolist())
        silhouettes.append(float(silhouette_score(x, labels, metric="cosine")))
    return points, silhouettes
