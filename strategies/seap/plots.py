"""SEAP's plots: activation heatmaps and their similarity (Figure 3), the task projection (Figure 1) and layer
sensitivity (Figures 5-6)."""

from __future__ import annotations

from pathlib import Path

from prunekit.plots import _line_plot, _pyplot


def sampled_dimensions(width: int, count: int, seed: int = 0) -> list[int]:
    """``count`` distinct dimensions out of ``width``, seeded and sorted (all of them if ``count`` >= width)."""
    import torch

    if count >= width:
        return list(range(width))
    return sorted(torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def activation_heatmaps(profiles: dict[str, dict[str, "torch.Tensor"]], path: str | Path, dims: list[int],
                        title: str = "", tasks_per_row: int = 4) -> Path:
    """SEAP Figure 3 style: per task, its two halves side by side; layers × sampled dimensions, z-scored per layer.

    ``profiles``: ``{task: {"A": (layers, width), "B": (layers, width)}}``.
    """
    import math

    plt = _pyplot()
    tasks = list(profiles)
    n_layers = next(iter(profiles.values()))["A"].shape[0]
    per_row = min(len(tasks), tasks_per_row)
    rows = math.ceil(len(tasks) / per_row)
    fig, axes = plt.subplots(rows, 2 * per_row, squeeze=False, layout="constrained",
                             figsize=(2 * per_row * (0.05 * len(dims) + 0.7), rows * (0.12 * n_layers + 1.0)))
    step = max(1, n_layers // 8)
    image = None
    for ax in axes.flat:
        ax.set_axis_off()
    for k, task in enumerate(tasks):
        for h, half in enumerate(("A", "B")):
            ax = axes[k // per_row, 2 * (k % per_row) + h]
            ax.set_axis_on()
            values = profiles[task][half][:, dims].double()
            z = (values - values.mean(1, keepdim=True)) / values.std(1, unbiased=False, keepdim=True).clamp_min(1e-12)
            image = ax.imshow(z.numpy(), aspect="auto", cmap="coolwarm", vmin=-3, vmax=3, interpolation="nearest")
            ax.set_title(f"{task} {half}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks(range(0, n_layers, step) if h == 0 else [])
            ax.tick_params(labelsize=6)
            if k % per_row == 0 and h == 0:
                ax.set_ylabel("layer", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="z-score within layer")
    fig.suptitle(title or "activation profiles", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def similarity_matrix(sim: dict, path: str | Path, title: str = "") -> Path:
    """The (half A × half B) cosine-similarity matrix of ``prunekit.strategies.seap.activations.similarity``."""
    plt = _pyplot()
    tasks, matrix = sim["tasks"], sim["matrix"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(tasks), 0.8 + 0.7 * len(tasks)))
    image = ax.imshow(matrix, cmap="viridis", vmin=-1, vmax=1)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.3 else "black")
    ax.set_xticks(range(len(tasks)), [f"{t} B" for t in tasks], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(tasks)), [f"{t} A" for t in tasks], fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine (centred log profile)")
    ax.set_title(title or f"same task {sim['same_task']:.2f}, other tasks {sim['other_tasks']:.2f}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sensitivity(rows: list[dict], metric: str, path: str | Path, dense: float | None = None, title: str = "",
                log_scale: bool = False) -> Path:
    """Metric after pruning one layer at a time: x = layer, one line per ratio (``rows``: layer, ratio, value)."""
    series = {f"{ratio:.0%} of layer": sorted((r["layer"], r["value"]) for r in rows if r["ratio"] == ratio)
              for ratio in sorted({r["ratio"] for r in rows})}
    return _line_plot(series, path, (8, 3.6), "decoder layer pruned (all others dense)", metric, title, dense,
                      log_scale, markersize=3)


def task_projection(points: list, labels: list[int], tasks: list[str], layers: list[int], silhouettes: list[float],
                    path: str | Path, title: str = "") -> Path:
    """SEAP Figure 1 style: per layer, a 2-D projection of per-prompt hidden states coloured by task."""
    plt = _pyplot()
    cols = min(3, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.1 * rows), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("tab10")
    for ax in axes.flat:
        ax.set_axis_off()
    for k, (layer, pts, sil) in enumerate(zip(layers, points, silhouettes)):
        ax = axes[k // cols, k % cols]
        ax.set_axis_on()
        for t, task in enumerate(tasks):
            xy = [p for p, lab in zip(pts, labels) if lab == t]
            ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=8, alpha=0.7, color=cmap(t % 10), label=task)
        ax.set_title(f"layer {layer} (silhouette {sil:.2f})", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].legend(fontsize=6, markerscale=1.5, loc="best")
    fig.suptitle(title or "per-prompt hidden states by task (t-SNE)", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
