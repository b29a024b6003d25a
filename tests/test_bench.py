"""prunekit bench: figures for dense and pruned models, ideal speed-up from multiply-accumulates."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from prunekit.bench import matmul_macs_per_token
from prunekit.cli import main
from prunekit.realize.cuts import save_cut as save_pruned
from prunekit.surgery import cut_attention_heads, cut_mlp_channels


@pytest.mark.slow
def test_bench_dense_vs_cut(tiny_llama, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    dense_macs = matmul_macs_per_token(model)
    for layer in range(tiny.LAYERS):
        cut_mlp_channels(model, layer, range(tiny.FFN // 2))
        cut_attention_heads(model, layer, [0, 1])  # one of the two KV groups
    save_pruned(model, tmp_path / "cut", tiny.tokenizer())
    out = tmp_path / "bench.json"
    ballast = torch.ones(250_000_000)  # 1 GB in this process: the fresh processes' peaks must not include it
    assert main(["bench", "--model", str(tiny_llama), "--pruned", f"[{tmp_path / 'cut'}]", "--batch_sizes", "[1, 2]",
                 "--prompt_len", "16", "--new_tokens", "4", "--repeats", "2", "--decode", "[static, generate]",
                 "--output", str(out)]) == 0
    assert "decode speed-up" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert {(r["model"], r["decode"], r["batch"]) for r in rows} == {
        (m, d, b) for m in ("llama", "cut") for d in ("static", "generate") for b in (1, 2)}
    cut = next(r for r in rows if r["model"] == "cut" and r["batch"] == 1)
    assert cut["ideal_speedup"] == pytest.approx(dense_macs / matmul_macs_per_token(model))
    assert cut["ideal_speedup"] > 1.3
    del ballast
    for r in rows:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["latency_ms_per_token"] > 0
        assert 50 < r["peak_rss_mb"] < 1000  # a fresh process: interpreter + torch + a tiny model
        if r["model"] == "llama":
            assert r["ideal_speedup"] == 1 and r["decode_speedup"] == 1
