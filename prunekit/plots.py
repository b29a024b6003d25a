"""Plots saved next to results (PNG) and logged as images: per-layer profiles, plan-set members, metric-vs-ratio curves."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_profile(result: dict, path: str | Path) -> Path:
    """Per decoder layer: sparsity of its projections (unstructured/N:M) or kept MLP channels and heads
    as fractions of the dense widths (structured), from a ``prunekit prune`` result."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    title = f"{Path(str(result.get('model', ''))).name}: {result.get('strategy', '')}"
    pruned = result.get("pruned", result)
    if pruned.get("structure"):
        layers = pruned["structure"]
        dense = result.get("dense_structure") or layers
        xs = list(range(len(layers)))
        mlp = [l["mlp_channels"] / max(d["mlp_channels"], 1) for l, d in zip(layers, dense)]
        heads = [l["heads"] / max(d["heads"], 1) for l, d in zip(layers, dense)]
        width = 0.4
        ax.bar([x - width / 2 for x in xs], mlp, width, label="MLP channels kept")
        ax.bar([x + width / 2 for x in xs], heads, width, label="attention heads kept")
        ax.set_ylabel("fraction of dense width")
    else:
        per_layer = {int(k): v for k, v in pruned["per_layer_sparsity"].items()}
        xs = sorted(per_layer)
        ax.bar(xs, [per_layer[x] for x in xs], label="zero weights")
        ax.set_ylabel("sparsity of projections")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("decoder layer")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_vs_ratio(rows: list[dict], metric: str, path: str | Path, title: str = "", log_scale: bool = False,
                    dense: float | None = None) -> Path:
    """One line per method: ``metric`` (e.g. perplexity, or a task's accuracy) against the pruning ratio.

    ``rows``: dicts with ``method``, ``ratio`` and ``metric``; rows missing the metric are skipped.
    """
    series = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["ratio"], r[metric]) for r in rows if r["method"] == method and r.get(metric) is not None)
        if points:
            series[method] = points
    return _line_plot(series, path, (6, 3.8), "pruning ratio", metric, title, dense, log_scale)


def _line_plot(series: dict[str, list[tuple[float, float]]], path: str | Path, size: tuple[float, float], xlabel: str,
               ylabel: str, title: str, dense: float | None, log_scale: bool, markersize: float = 6) -> Path:
    """One line per series of (x, y) points, an optional dashed dense reference, saved as PNG."""
    plt = _pyplot()
    many = len(series) > 6  # then the legend goes beside the axes, and colours/markers stay distinct past ten
    fig, ax = plt.subplots(figsize=(size[0] + 2.2, size[1]) if many else size)
    colors = plt.get_cmap("tab20" if len(series) > 10 else "tab10").colors
    markers = "osD^vPX*<>"
    for k, (label, points) in enumerate(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[k % len(markers)] if many else "o",
                markersize=markersize, label=label, color=colors[k % len(colors)])
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.3g})")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if many:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path








def members_profile(result: dict, path: str | Path) -> Path:
    """Per member of a plan set (e.g. one per task): fraction of MLP channels and of heads kept per layer."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    dense = result.get("dense_structure")
    for task, row in result["pruned"]["members"].items():
        layers = row["structure"]
        ref = dense or layers
        xs = list(range(len(layers)))
        top.plot(xs, [l["mlp_channels"] / max(d["mlp_channels"], 1) for l, d in zip(layers, ref)], marker=".", label=task)
        bottom.plot(xs, [l["heads"] / max(d["heads"], 1) for l, d in zip(layers, ref)], marker=".", label=task)
    top.set_ylabel("MLP channels kept")
    bottom.set_ylabel("heads kept")
    bottom.set_xlabel("decoder layer")
    for ax in (top, bottom):
        ax.set_ylim(0, 1.05)
    top.legend(fontsize=7, ncol=4)
    top.set_title(f"{Path(str(result.get('model', ''))).name}: {result.get('strategy', '')}: one plan per member", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
