"""The README's strategy example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from prunekit.api import prune
from prunekit.module import PrunableLM

README = Path(__file__).parents[1] / "README.md"


def _example_strategy():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    source = next(b for b in blocks if "class ActNorm(PruningStrategy)" in b)
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    return namespace["ActNorm"]


def test_readme_strategy_example(tiny_llama):
    ActNorm = _example_strategy()
    module = PrunableLM(str(tiny_llama))
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))

    class Data:
        def predict_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(windows), batch_size=2)

    strategy = ActNorm(sparsity=0.25, mode="all-at-once")
    prune(strategy, module, Data())
    q = module.model.model.layers[0].self_attn.q_proj.weight
    zero_cols = (q == 0).all(0)
    assert zero_cols.sum().item() == int(q.shape[1] * 0.25)  # whole low-norm input columns pruned
    assert (q == 0).float().mean().item() == pytest.approx(0.25)
