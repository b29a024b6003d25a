"""GRIFFIN's evaluation protocols (the paper's): split perplexity, expert-set overlap, generation agreement.

- :func:`split_perplexity`: each window's first ``prompt_len`` tokens are the prompt; the next ``scored``
  tokens are scored as if generated. ``how="prefix"`` runs one teacher-forced forward in the runtime's prefix mode;
  ``how="decode"`` prefills the prompt and feeds the rest token by token through the KV cache (what generation
  does). The two agree to float rounding; the benchmark checks it on real windows.
- :func:`expert_sets` / :func:`jaccard`: the experts each prompt selects, and how much two sets share.
- :func:`generation_agreement`: greedy continuations of the dense and pruned model, compared position by position
  (a fidelity figure, not a quality metric).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from prunekit.errors import PrunekitError
from prunekit.realize.runtime import runtime_of


@contextmanager
def runtime_mode(model, mode: str, prefix: int | None = None):
    """Run ``model``'s GRIFFIN runtime in ``mode`` (and ``prefix``) inside the block (no-op without a runtime)."""
    runtime = runtime_of(model)
    if runtime is None:
        yield
        return
    before = {"mode": runtime.mode, "prefix": runtime.prefix}
    runtime.configure(mode=mode, prefix=prefix)
    try:
        yield
    finally:
        runtime.configure(**before)


@torch.no_grad()
def split_nll(model, windows: torch.Tensor, prompt_len: int, scored: int | None = None,
              how: str = "prefix") -> tuple[float, int]:
    """Summed next-token NLL of tokens ``prompt_len … prompt_len + scored − 1`` of every window, and their count.

    The first scored token is predicted at the prompt's last position (the dense model's prediction, as the
    first generated token is); the others at generation positions.
    """
    total_len = windows.shape[1]
    scored = total_len - prompt_len if scored is None else scored
    if not 1 <= prompt_len < total_len or prompt_len + scored > total_len:
        raise PrunekitError(f"prompt_len {prompt_len} + scored {scored} must fit in windows of {total_len} tokens")
    windows = windows[:, :prompt_len + scored]
    nll, count = 0.0, 0
    for row in windows:
        ids = row.unsqueeze(0)
        if how == "prefix":  # only the scored positions' logits are computed (the LM head is a large share)
            with runtime_mode(model, "prefix", prefix_or_none(model, prompt_len)):
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=scored + 1).logits[0, :-1]
        elif how == "decode":
            with runtime_mode(model, "gen"):
                out = model(input_ids=ids[:, :prompt_len], use_cache=True)
                steps = [out.logits[0, -1]]
                cache = out.past_key_values
                for t in range(prompt_len, prompt_len + scored - 1):
                    out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                    steps.append(out.logits[0, -1])
                    cache = out.past_key_values
                logits = torch.stack(steps)
        else:
            raise PrunekitError(f"how must be 'prefix' or 'decode', got {how!r}")
        targets = row[prompt_len:prompt_len + scored]
        nll += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        count += targets.numel()
    return nll, count


def prefix_or_none(model, prompt_len: int) -> int | None:
    return prompt_len if runtime_of(model) is not None else None


def split_perplexity(model, windows: torch.Tensor, prompt_len: int, scored: int | None = None,
                     how: str = "prefix") -> float:
    """exp of the mean NLL of :func:`split_nll`."""
    nll, count = split_nll(model, windows, prompt_len, scored, how)
    return math.exp(nll / count)


@torch.no_grad()
def expert_sets(model, prompts: list[torch.Tensor]) -> list[dict[int, set[int]]]:
    """The experts (per layer, a set of neuron indices) that each prompt (1-D token ids) selects, one at a time."""
    runtime = runtime_of(model)
    if runtime is None or not hasattr(runtime, "experts_of"):
        raise PrunekitError("expert_sets needs a model with the GRIFFIN runtime installed")
    out = []
    with runtime_mode(model, "gen"):
        for ids in prompts:
            cache = model(input_ids=ids.unsqueeze(0), use_cache=True).past_key_values
            out.append({layer: set(rows[0].tolist()) for layer, rows in runtime.experts_of(cache).items()})
    return out


def jaccard(a: dict[int, set[int]], b: dict[int, set[int]]) -> float:
    """Mean over layers of |a ∩ b| / |a ∪ b|."""
    values = [len(a[i] & b[i]) / max(len(a[i] | b[i]), 1) for i in a]
    return sum(values) / len(values)


@torch.no_grad()
def generation_agreement(reference, model, prompts: list[torch.Tensor], new_tokens: int = 64,
                         pad_token_id: int = 0) -> dict[str, float]:
    """Greedy continuations of ``reference`` and ``model`` for each prompt: the fraction of positions with the same
    token, and the mean number of tokens generated before the first difference."""
    same, first = [], []
    for ids in prompts:
        ids = ids.unsqueeze(0)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
                      attention_mask=torch.ones_like(ids))
        a = reference.generate(ids, **kwargs)[0, ids.shape[1]:]
        b = model.generate(ids, **kwargs)[0, ids.shape[1]:]
        equal = (a == b)
        same.append(equal.float().mean().item())
        first.append(int(equal.long().cumprod(0).sum()))
    return {"token_agreement": sum(same) / len(same), "tokens_before_first_difference": sum(first) / len(first)}
