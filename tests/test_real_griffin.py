"""GRIFFIN on the real SmolLM2-135M: the prompt's experts beat the paper's baselines on held-out text, teacher-forced
prefix scoring equals generation token by token, and a padded batch of real prompts decodes as each prompt alone."""

from __future__ import annotations

import pytest
import torch

from prunekit.data import CalibrationDataModule
from prunekit.models import load_model, load_tokenizer
from prunekit.plans import RuntimePolicy
from prunekit.realize import realizer_for
from prunekit.strategies.griffin import protocol
from prunekit.strategies.griffin.runtime import GriffinRuntime

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def windows():
    return CalibrationDataModule("smollm2-135m", seq_len=192, eval_samples=2).evaluation_windows()


def _install(model, **options) -> GriffinRuntime:
    runtime = GriffinRuntime(**{"density": 0.5, **options})
    plan = RuntimePolicy(runtime)
    realizer_for(plan).apply(model, plan)
    return runtime


def _uninstall(model) -> None:
    model.__dict__.pop("_prunekit_runtime").remove(model)


@torch.no_grad()
def test_griffin_beats_its_baselines_and_prefix_equals_decoding(smollm, windows):
    dense = protocol.split_perplexity(smollm, windows, 96)
    scores = {}
    for variant in ("topk", "magnitude", "random"):
        _install(smollm, variant=variant)
        try:
            scores[variant] = protocol.split_perplexity(smollm, windows, 96)
            if variant == "topk":
                prefix = protocol.split_nll(smollm, windows[:1], 96, how="prefix")
                decode = protocol.split_nll(smollm, windows[:1], 96, how="decode")
        finally:
            _uninstall(smollm)
    assert dense < scores["topk"] < scores["random"] / 10 and scores["topk"] < scores["magnitude"] / 10, (dense, scores)
    assert prefix[1] == decode[1] == 96 and prefix[0] == pytest.approx(decode[0], rel=1e-5)


@torch.no_grad()
def test_padded_batch_of_real_prompts_decodes_as_each_alone(smollm):
    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.padding_side = "left"
    prompts = ["The capital of France is", "In 1905, Albert Einstein published four papers that"]
    runtime = _install(smollm)
    try:
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        together = smollm.generate(**batch, **kwargs)[:, batch.input_ids.shape[1]:]
        cache = smollm(**batch, use_cache=True).past_key_values
        experts = runtime.experts_of(cache)
        for i, prompt in enumerate(prompts):
            one = tokenizer(prompt, return_tensors="pt")
            alone = smollm.generate(**one, **kwargs)[:, one.input_ids.shape[1]:]
            assert torch.equal(together[i], alone[0])
            own = runtime.experts_of(smollm(**one, use_cache=True).past_key_values)
            assert all(torch.equal(experts[layer][i], own[layer][0]) for layer in own)
        assert not torch.equal(experts[0][0], experts[0][1])  # different prompts, different experts
    finally:
        _uninstall(smollm)
