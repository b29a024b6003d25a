"""The second real model, Gemma-3-270M (one KV head for four query heads, head_dim 256, sliding + full attention,
GeGLU, tied 262k vocabulary): structured pruning by query heads keeps the shared K/V head, meets the ratio and
reloads exactly. Every other method runs on it in ``benchmarks/suite.py --model gemma3-270m``."""

from __future__ import annotations

import pytest
import torch

from prunekit.api import default_trainer, prune
from prunekit.data import CalibrationDataModule
from prunekit.evaluate import linear_totals, perplexity
from prunekit.module import PrunableLM
from prunekit.realize import load_pruned
from prunekit.realize.cuts import save_cut
from prunekit.strategies.flap import FLAP
from prunekit.surgery import attention_heads

pytestmark = pytest.mark.real
MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def dm():
    return CalibrationDataModule(MODEL, num_samples=4, seq_len=128, eval_samples=4)


def test_flap_by_query_heads_keeps_the_shared_kv_head_and_reloads_exactly(dm, tmp_path):
    module = PrunableLM(MODEL)
    dense_linear = linear_totals(module.model)["linear"]
    dense_ppl = perplexity(default_trainer(), module.model, dm)
    prune(FLAP(sparsity=0.3, head_unit="query"), module, dm)
    model = module.model
    heads = [attention_heads(model, i) for i in range(len(model.model.layers))]
    removed = 1 - linear_totals(model)["linear"] / dense_linear
    ppl = perplexity(default_trainer(), model, dm)
    print(f"\nGemma-3-270M flap 30% (query heads): removed {removed:.3f}, heads/layer {heads}, "
          f"perplexity {ppl:.2f} (dense {dense_ppl:.2f})")
    assert all(kv == 1 for _, kv in heads), "the shared K/V head must stay"
    assert sum(4 - q for q, _ in heads) > 0, "FLAP removed no query head"
    assert 0.29 < removed <= 0.305
    assert dense_ppl < ppl < 4 * dense_ppl
    save_cut(model, tmp_path / "cut", dm.tokenizer)
    ids = dm.evaluation_windows()[:1, :48]
    with torch.no_grad():
        expected = model(ids).logits
        del module, model
        got = load_pruned(str(tmp_path / "cut"))(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
