"""The README's strategy examples run as written, through the public API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from prunekit.api import prune
from prunekit.module import PrunableLM

README = Path(__file__).parents[1] / "README.md"


def _example(name: str, namespace: dict | None = None):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    source = next(b for b in blocks if f"class {name}(PruningStrategy)" in b)
    namespace = dict(namespace or {})
    exec(compile(source, "README.md", "exec"), namespace)
    return namespace[name], namespace


def test_readme_strategy_example(tiny_llama):
    ActNorm, _ = _example("ActNorm")
    module = PrunableLM(str(tiny_llama))
    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))

    class Data:
        def predict_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(windows), batch_size=2)

    prune(ActNorm(sparsity=0.25, mode="all-at-once"), module, Data())
    q = module.model.model.layers[0].self_attn.q_proj.weight
    zero_cols = (q == 0).all(0)
    assert zero_cols.sum().item() == int(q.shape[1] * 0.25)  # whole low-norm input columns pruned
    assert (q == 0).float().mean().item() == pytest.approx(0.25)


def test_readme_gradient_example(tiny_llama):
    """The gradient criterion with per-example records: on a task corpus its loss is on the gold answers, every
    example gets one record, and the decided cut removes the requested fraction of each layer's channels."""
    from prunekit.data import CalibrationDataModule

    _, namespace = _example("ActNorm")
    Saliency, _ = _example("Saliency", namespace)
    dm = CalibrationDataModule(str(tiny_llama), corpus="task", corpus_options={"tasks": ["copa"]},
                               packing="documents", num_samples=5, seq_len=64)
    module = PrunableLM(str(tiny_llama))
    out = prune(Saliency(sparsity=0.25), module, dm)
    observed = out.calibration.observed()
    records = observed["r0"]["r"]
    assert records.index.tolist() == list(range(5)) and records.values.shape == (5,) and (records.values > 0).all()
    assert [l.mlp.down_proj.in_features for l in module.model.model.layers] == [96] * 3
    import lightning.pytorch as pl

    from prunekit.errors import PrunekitError

    with pytest.raises(PrunekitError, match="needs a Trainer\\(inference_mode=False\\)"):  # Lightning's default
        prune(Saliency(sparsity=0.25), PrunableLM(str(tiny_llama)), dm, trainer=pl.Trainer(logger=False))
