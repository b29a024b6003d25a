"""Speed benchmark: dense vs pruned in one process, interleaved repetitions, medians.

For each model: prefill tokens/s (one forward over ``batch × prompt_len`` tokens, no cache), decode tokens/s
(greedy generation with the KV cache; decode time = generate time − prefill time of the same prompt), latency
per generated token, parameter count and weight memory. Peak memory (``peak_rss_mb``) is measured apart, in a
fresh process per model and batch size that loads the model and runs the same generation: the peak resident
set of that process (Python, torch, weights, activations, KV cache). One shared process cannot say which
model used how much, since freed memory stays with the allocator. The ideal speed-up is the ratio of multiply-accumulates
per token spent in weight matrices (decoder projections + LM head), which is what pruning can remove; the
measured/ideal ratio (issue target: ≥ 0.9 at 50% structured) says how much of it the hardware turns into speed. Zeros do not count as removed: only
physically smaller matrices make a model faster.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from prunekit.arch import adapter_for


def matmul_macs_per_token(model: torch.nn.Module) -> int:
    """Weights multiplied once per generated token: decoder projections and the LM head (embeddings are lookups).
    An installed runtime that narrows generation (``decode_macs``) counts what it actually multiplies."""
    from prunekit.realize.runtime import runtime_of

    runtime = runtime_of(model)
    if runtime is not None and callable(getattr(runtime, "decode_macs", None)):
        macs = runtime.decode_macs(model)
    else:
        macs = sum(ref.weight.numel() for ref in adapter_for(model).linears(model))
    head = model.get_output_embeddings()
    return macs + (head.weight.numel() if head is not None else 0)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def measure(model, batch: int, prompt_len: int, new_tokens: int, seed: int = 0) -> dict[str, float]:
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    prefill = _time(lambda: model(input_ids=ids, use_cache=False))
    generate = _time(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                                            pad_token_id=0))
    decode = max(generate - prefill, 1e-9)
    row = {"prefill_tok_s": batch * prompt_len / prefill, "decode_tok_s": batch * new_tokens / decode,
           "latency_ms_per_token": 1000 * decode / new_tokens}
    from prunekit.realize.runtime import runtime_of

    gathered = getattr(runtime_of(model), "last_gather", None)  # a runtime that gathers weights per sequence
    if gathered:  # the one-time gather is part of the decode time above; also show decoding without it
        row["gather_ms"] = 1000 * gathered["seconds"]
        row["gather_mb"] = gathered["mb"]
        row["decode_tok_s_excl_gather"] = batch * new_tokens / max(decode - gathered["seconds"], 1e-9)
    return row


def bench(models: dict[str, torch.nn.Module], batch_sizes=(1, 4), prompt_len: int = 128, new_tokens: int = 32,
          repeats: int = 3, progress: bool = True) -> list[dict]:
    """Median figures per (model, batch size), measured in interleaved order; the first model is the baseline."""
    from tqdm.auto import tqdm

    for m in models.values():
        m.eval()
        measure(m, 1, 8, 2)  # warm-up
    samples: dict[tuple[str, int], list[dict]] = {}
    steps = [(r, b, name) for r in range(repeats) for b in batch_sizes for name in models]
    for r, b, name in tqdm(steps, desc="bench", disable=not progress):
        samples.setdefault((name, b), []).append(measure(models[name], b, prompt_len, new_tokens, seed=r))
    base_name = next(iter(models))
    base_macs = matmul_macs_per_token(models[base_name])
    rows = []
    for (name, b), runs in samples.items():
        model = models[name]
        row = {"model": name, "batch": b, "params": sum(p.numel() for p in model.parameters()),
               "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
               "ideal_speedup": base_macs / matmul_macs_per_token(model)}
        for key in runs[0]:
            row[key] = statistics.median(run[key] for run in runs if key in run)
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["model"] == base_name and r["batch"] == row["batch"])
        row["prefill_speedup"] = row["prefill_tok_s"] / base["prefill_tok_s"]
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["decode_vs_ideal"] = row["decode_speedup"] / row["ideal_speedup"]
    return rows


def peak_rss_mb(location: str, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Peak resident memory (MB) of a fresh process that loads ``location`` and generates as ``measure`` does."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\nfrom prunekit.bench import measure\nfrom prunekit.memory import peak_rss_mb\n"
            "from prunekit.models import load_model\n"
            "m = load_model(sys.argv[1])\nmeasure(m, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))\n"
            "print(json.dumps(peak_rss_mb()))")
    done = subprocess.run([sys.executable, "-c", code, location, str(batch), str(prompt_len), str(new_tokens)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory run for {location} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def format_rows(rows: list[dict]) -> str:
    """Markdown table; a ``gather ms / MB`` column (per-sequence weight gathering of a dynamic runtime, once per
    generate call) appears when a model has one."""
    gather = any("gather_ms" in r for r in rows)
    lines = ["| model | batch | params | prefill tok/s | decode tok/s | ms/token | decode speed-up | ideal | gain vs ideal "
             "| peak MB |" + (" gather ms / MB |" if gather else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gather else "")]
    for r in rows:
        ratio = f"{r['decode_vs_ideal']:.2f}"
        peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "–"
        extra = ""
        if gather:
            extra = f" {r['gather_ms']:.1f} / {r['gather_mb']:.1f} |" if "gather_ms" in r else " – |"
        lines.append(f"| {r['model']} | {r['batch']} | {r['params'] / 1e6:.1f}M | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {r['latency_ms_per_token']:.1f} | {r['decode_speedup']:.2f}x | "
                     f"{r['ideal_speedup']:.2f}x | {ratio} | {peak} |{extra}")
    return "\n".join(lines)


def main(model: str = "smollm2-135m", pruned: list[str] | None = None, batch_sizes: list[int] | None = None,
         prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3, peak_memory: bool = True,
         output: str | None = None) -> list[dict]:
    """Benchmark a dense model against pruned folders.

    Args:
        model: the baseline (zoo name or folder).
        pruned: folders written by ``prunekit prune`` (physically cut models are the ones that get faster).
        batch_sizes: decode batch sizes (default 1 and 4).
        prompt_len: prompt tokens (prefill).
        new_tokens: generated tokens per sequence (decode).
        repeats: interleaved repetitions; medians are reported.
        peak_memory: also measure each model's peak resident memory in a fresh process per batch size.
        output: optional JSON file for the rows.
    """
    import json

    from prunekit.models import load_model

    locations = {Path(model).name: model, **{Path(folder).name: folder for folder in pruned or []}}
    models = {name: load_model(location) for name, location in locations.items()}
    rows = bench(models, tuple(batch_sizes or (1, 4)), prompt_len, new_tokens, repeats)
    if peak_memory:
        del models
        for row in rows:
            row["peak_rss_mb"] = peak_rss_mb(locations[row["model"]], row["batch"], prompt_len, new_tokens)
    print(f"\nthreads: {torch.get_num_threads()}; prompt {prompt_len} tokens; {new_tokens} new tokens; "
          f"median of {repeats} interleaved repetitions")
    print(format_rows(rows))
    if output:
        Path(output).write_text(json.dumps(rows, indent=2))
    return rows
