"""Prefix sharing (``prunekit.fastlm.PrefixSharingLM``) against lm-eval's own ``HFLM``: the same (log-likelihood,
is-greedy) per request on every family, identical task metrics, lm-eval's path where it must be taken; the
zero-shot results cache (``prunekit.evalcache``) and the CLI switches."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM

import tiny
from prunekit.fastlm import PrefixSharingLM
from prunekit.zeroshot import evaluate_tasks

TOLERANCE = 1e-4  # relative, on sums of log-probabilities (float32; other matmul shapes round differently)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE * max(1.0, abs(b))


def _greedy(model, context: list[int], steps: int) -> list[int]:
    ids = torch.tensor([context])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(context):].tolist()


def _requests(model, max_length: int) -> tuple[list, int]:
    """lm-eval's token-level requests: contexts shared by 1-5 continuations of 1-20 tokens (lengths spread so
    that batches mix prefixes and rows of different lengths), one-token continuations sharing a context (as
    BoolQ's), a repeated request, a one-token context (as an empty one becomes), greedy continuations (so that
    is_greedy is True somewhere), and requests lm-eval left-truncates (longer than max_length + 1). Returns the
    requests and how many are too long."""
    g = torch.Generator().manual_seed(0)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=g))

    def tokens(n: int) -> list[int]:
        return torch.randint(1, tiny.VOCAB, (n,), generator=g).tolist()

    reqs = []
    for doc in range(10):
        ctx = tokens(randint(2, 50))
        for choice in range(randint(1, 6)):
            reqs.append(((f"doc{doc}", f"choice{choice}"), ctx, tokens(randint(1, 21))))
    shared = reqs[0][1]
    reqs += [(("yes/no", " yes"), shared, [5]), (("yes/no", " no"), shared, [7]), reqs[3],
             (("", "empty context"), [0], tokens(6))]
    for doc in range(2):
        ctx = tokens(12 + 5 * doc)
        greedy = _greedy(model, ctx, 6)
        reqs += [((f"greedy{doc}", "a"), ctx, greedy), ((f"greedy{doc}", "b"), ctx, greedy[:3]),
                 ((f"greedy{doc}", "c"), ctx, greedy[:2] + [(greedy[2] + 1) % tiny.VOCAB])]
    long_ctx = tokens(max_length - 3)
    reqs += [(("long", "a"), long_ctx, tokens(8)), (("long", "b"), long_ctx, tokens(3))]
    return reqs, 1  # long "b" fits: max_length - 3 + 3 <= max_length + 1


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_request_equals_hflm(family, tiny_models):
    """Per request, (log-likelihood, is_greedy) as lm-eval's HFLM gives them; small budgets so that prefixes and
    rows are cut into several batches; gemma3's 32-token sliding window caps the shared prefix."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    reqs, too_long = _requests(model, max_length=96)
    plain = HFLM(pretrained=model, tokenizer=tiny.tokenizer(), batch_size=4, max_length=96)
    fast = PrefixSharingLM(pretrained=model, tokenizer=tiny.tokenizer(), batch_size=4, max_length=96,
                           max_tokens=96, max_rows=6, max_kv=160)
    expected = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = fast._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert fast._unsupported is None
    for req, (ll, greedy), (ll_ref, greedy_ref) in zip(reqs, got, expected, strict=True):
        assert _close(ll, ll_ref), (req[0], ll, ll_ref)
        assert greedy == greedy_ref, req[0]
    assert sum(g for _, g in expected) >= 4  # the greedy continuations
    assert fast.stats["plain_requests"] == too_long
    assert fast.stats["prefix_tokens"] > 0 and fast.stats["forwards"] >= 4
    if family == "gemma3_text":
        assert fast._sliding == 32


def test_task_metrics_identical_to_hflm(tiny_llama):
    """Through lm-eval end to end (multiple choice with one- and many-token continuations, partial evaluation,
    MMLU's one-token letters, a generation task): every metric identical, every response within tolerance."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tasks = ["arc_easy", "hellaswag", "piqa", "winogrande", "boolq", "copa", "mmlu_anatomy", "gsm8k"]
    runs = {sharing: evaluate_tasks(model, tiny.tokenizer(), tasks, limit=4, batch_size=4, max_gen_toks=4,
                                    prefix_sharing=sharing, log_samples=True) for sharing in (True, False)}
    fast, plain = runs[True], runs[False]
    assert fast["tasks"] == plain["tasks"] and fast["average"] == plain["average"]
    assert fast["config"]["scoring"]["lm"] == "PrefixSharingLM" and plain["config"]["scoring"]["lm"] == "HFLM"
    fallback = fast["config"]["scoring"]["plain_fallback"]  # BoolQ passages past the tiny model's 256 positions:
    assert 0 < fallback < 10  # lm-eval left-truncates them, so they take its path
    count = 0
    for task, docs in plain["raw"]["samples"].items():
        for doc, doc_fast in zip(docs, fast["raw"]["samples"][task], strict=True):
            assert doc["doc_id"] == doc_fast["doc_id"] and doc["arguments"] == doc_fast["arguments"]
            for (ref,), (got,) in zip(doc["resps"], doc_fast["resps"], strict=True):
                if isinstance(ref, str):  # gsm8k: generated text, lm-eval's own path
                    assert got == ref
                    continue
                assert _close(got[0], ref[0]) and got[1] == ref[1], (task, doc["doc_id"])
                count += 1
    assert count == fast["config"]["scoring"]["requests"]["loglikelihood"]["requests"] > 50


def test_rolling_log_likelihood_takes_lm_eval_path(tiny_llama):
    from lm_eval.api.instance import Instance

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    text = "The quick brown fox jumps over the lazy dog. " * 20
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text[:n],), idx=0)
            for n in (50, 400, 900)]  # several 64-token windows each
    kwargs = dict(pretrained=model, tokenizer=tiny.tokenizer(), batch_size=2, max_length=64)
    fast, plain = PrefixSharingLM(**kwargs), HFLM(**kwargs)
    assert fast.loglikelihood_rolling(reqs, disable_tqdm=True) == plain.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert fast.stats["forwards"] == 0


def test_a_model_with_a_runtime_takes_lm_eval_path(tiny_llama):
    """GRIFFIN's decisions depend on the whole prompt: lm-eval's path (one request at a time), whatever the switch."""
    from prunekit.plans import RuntimePolicy
    from prunekit.realize.runtime import RuntimePolicyRealizer
    from prunekit.strategies.griffin.runtime import GriffinRuntime

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    RuntimePolicyRealizer().apply(model, RuntimePolicy(runtime=GriffinRuntime(density=0.5)))
    summary = evaluate_tasks(model, tiny.tokenizer(), ["copa"], limit=2, prefix_sharing=True, cache=True)
    assert summary["config"]["scoring"]["lm"] == "RuntimeLM" and "cached" not in summary


class _NoPositions(torch.nn.Module):
    """A causal LM that drops ``attention_mask`` and ``position_ids`` (as a careless wrapper would)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config
        self.generation_config = model.generation_config
        self.device, self.dtype = model.device, model.dtype

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        return self.inner(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache,
                          logits_to_keep=logits_to_keep)

    def tie_weights(self):
        pass


def test_a_model_that_disagrees_falls_back_to_lm_eval_path(tiny_llama, caplog):
    model = _NoPositions(AutoModelForCausalLM.from_pretrained(tiny_llama).eval())
    reqs, _ = _requests(model.inner, max_length=96)
    kwargs = dict(pretrained=model.inner, tokenizer=tiny.tokenizer(), batch_size=4, max_length=96)
    expected = HFLM(**kwargs)._loglikelihood_tokens(reqs, disable_tqdm=True)
    fast = PrefixSharingLM(**kwargs, max_tokens=96, max_rows=6, max_kv=160)
    fast._model = model  # HFLM would not take the wrapper itself as `pretrained`
    with caplog.at_level(logging.WARNING, logger="prunekit.fastlm"):
        got = fast._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert "prefix sharing is off" in caplog.text and fast._unsupported
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, expected, strict=True):  # all by lm-eval's path
        assert _close(ll, ll_ref) and greedy == greedy_ref
    assert fast.stats["max_check_diff"] > 1e-3


def test_tasks_cache_reuses_a_result_and_keys_on_weights_and_options(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNEKIT_EVAL_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    first = evaluate_tasks(model, tiny.tokenizer(), ["copa"], limit=2, cache=True)
    (stored,) = (tmp_path / "cache").glob("*.json")
    again = evaluate_tasks(model, tiny.tokenizer(), ["copa"], limit=2, cache=True)
    assert again["cached"] == str(stored) and "reused from" in capsys.readouterr().err
    assert again["tasks"] == first["tasks"]
    assert again["raw"]["results"] == json.loads(json.dumps(first["raw"]["results"]))
    evaluate_tasks(model, tiny.tokenizer(), ["copa"], limit=3, cache=True)  # another option: another entry
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3  # other weights: another entry
    assert "cached" not in evaluate_tasks(model, tiny.tokenizer(), ["copa"], limit=2, cache=True)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3
    monkeypatch.setenv("PRUNEKIT_EVAL_CACHE", "off")
    assert "cached" not in evaluate_tasks(model, tiny.tokenizer(), ["copa"], limit=2, cache=True)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3


def test_eval_cli_switches(tiny_llama, tmp_path, monkeypatch, capsys):
    """``--prefix_sharing false`` runs lm-eval's HFLM; ``--tasks_cache true`` reuses the first run's results."""
    from prunekit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNEKIT_EVAL_CACHE", str(tmp_path / "cache"))
    common = ["eval", "--model", str(tiny_llama), "--tasks", "[copa]", "--limit", "3"]
    assert main([*common, "--prefix_sharing", "false", "--output_dir", str(tmp_path / "plain")]) == 0
    assert main([*common, "--tasks_cache", "true", "--output_dir", str(tmp_path / "fast")]) == 0
    assert "log-likelihood requests in" in capsys.readouterr().out
    assert main([*common, "--tasks_cache", "true", "--output_dir", str(tmp_path / "again")]) == 0
    assert "lm-eval results reused from" in capsys.readouterr().out
    plain, fast, again = (json.loads((tmp_path / d / "metrics.json").read_text())["tasks"]
                          for d in ("plain", "fast", "again"))
    assert plain["config"]["scoring"]["lm"] == "HFLM" and fast["config"]["scoring"]["lm"] == "PrefixSharingLM"
    assert plain["tasks"] == fast["tasks"] == again["tasks"] and again["cached"]
    assert (tmp_path / "again" / "lm_eval_results.json").is_file()


@pytest.mark.real
def test_smollm2_metrics_identical_with_prefix_sharing():
    """Real SmolLM2-135M: ARC-Easy and HellaSwag (multi-token endings), the same metrics to the last digit."""
    from prunekit.models import load_model, load_tokenizer

    model, tokenizer = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    runs = {sharing: evaluate_tasks(model, tokenizer, ["arc_easy", "hellaswag"], limit=8, prefix_sharing=sharing,
                                    log_samples=True) for sharing in (True, False)}
    assert runs[True]["tasks"] == runs[False]["tasks"]
    diffs = [abs(a[0][0] - b[0][0]) for task, docs in runs[False]["raw"]["samples"].items()
             for d, e in zip(docs, runs[True]["raw"]["samples"][task], strict=True)
             for b, a in zip(d["resps"], e["resps"], strict=True)]
    seconds = {s: r["config"]["scoring"]["requests"]["loglikelihood"]["seconds"] for s, r in runs.items()}
    print(f"\n{len(diffs)} requests: max |Δ log-likelihood| {max(diffs):.2e}; "
          f"{seconds[False]:.1f} s lm-eval, {seconds[True]:.1f} s shared contexts")
    assert max(diffs) < 1e-3


@pytest.mark.slow
def test_zeroshot_benchmark_script(tiny_llama, tmp_path):
    """benchmarks/zeroshot.py end to end on the tiny model: both scorers per task and in one call, identical metrics,
    its table, JSON and plot."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "zeroshot.py"), "--model", str(tiny_llama),
                        "--tasks", "copa", "arc_easy", "--limit", "3", "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "zeroshot.json").read_text())
    assert [row["task"] for row in result["rows"]] == ["copa", "arc_easy"]
    for row in [*result["rows"], result["combined"]]:
        assert row["identical"] and row["greedy_differs"] == 0 and row["max_abs_diff"] < 1e-3
        assert row["requests"] > 0 and row["req_s_plain"] > 0 and row["req_s_fast"] > 0
    assert "| arc_easy | 12 |" in (out / "zeroshot.md").read_text()
    assert (out / "zeroshot.png").read_bytes()[:4] == b"\x89PNG"
