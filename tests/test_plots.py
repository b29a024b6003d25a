"""Plots: files are written and show what they are given."""

from __future__ import annotations

import matplotlib.image

from prunekit.plots import layer_profile, metric_vs_ratio


def test_metric_vs_ratio_draws_one_line_per_method(tmp_path):
    rows = [{"method": m, "ratio": r, "acc": a} for m, pts in {"wanda": [(0.2, 0.6), (0.5, 0.5)],
                                                                "flap": [(0.2, 0.62), (0.5, None)]}.items()
            for r, a in pts]
    path = metric_vs_ratio(rows, "acc", tmp_path / "acc.png", title="t", dense=0.65)
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.std() > 0  # a real, non-blank picture


def test_layer_profile_structured_and_unstructured(tmp_path):
    structured = {"model": "m", "strategy": "flap", "pruned": {"structure": [{"mlp_channels": 64, "heads": 2}] * 3},
                  "dense_structure": [{"mlp_channels": 128, "heads": 4}] * 3}
    unstructured = {"model": "m", "strategy": "wanda", "pruned": {"per_layer_sparsity": {"0": 0.5, "1": 0.5}}}
    for name, result in (("s", structured), ("u", unstructured)):
        image = matplotlib.image.imread(layer_profile(result, tmp_path / f"{name}.png"))
        assert image.std() > 0
