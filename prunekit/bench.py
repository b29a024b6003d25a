"""Speed benchmark: dense vs pruned in one process, interleaved repetitions, medians.

For each model: prefill tokens/s (one forward over ``batch × prompt_len`` tokens, no cache), decode tokens/s
(greedy generation with the KV cache), latency per generated token, parameter count and weight memory.

Decoding runs along one path for every model (``--decode``, ``prunekit.decode``), so the comparison is fair:
``generate`` (default: transformers' ``generate`` with its dynamic cache; decode time = generate time − prefill
time of the same prompt), ``static`` (a preallocated KV cache and a lean greedy loop; decode time = the one-token
steps after the prefill) or ``compiled`` (the same loop with the one-token step compiled by ``torch.compile``:
the path that turns most of a cut's ideal speed-up into speed at batch 1; compile seconds are reported apart,
``compile_s``, never in tokens/s). Several paths may be measured side by side (``--decode [generate,compiled]``);
each path's speed-up is against the baseline on that same path. Models with a runtime (GRIFFIN, ShadowLLM,
DejaVu) take ``generate`` only. Process CPU time per token is recorded too (``cpu_ms_per_token``,
``cpu_vs_ideal``): with one thread it is steadier than wall time when other processes share the cores.

Peak memory (``peak_rss_mb``) is measured apart, in a fresh process per model and batch size that loads the model
and runs the same generation: the peak resident set of that process (Python, torch, weights, activations, KV
cache). One shared process cannot say which model used how much, since freed memory stays with the allocator.

The ideal speed-up is the ratio of multiply-accumulates per token spent in weight matrices (decoder projections +
LM head), which is what pruning can remove; the measured/ideal ratio (issue target: ≥ 0.9 at 50% structured) says
how much of it the hardware turns into speed. Zeros do not count as removed: only physically smaller matrices
make a model faster.
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
def measure(model, batch: int, prompt_len: int, new_tokens: int, seed: int = 0,
            decode: str = "generate") -> dict[str, float]:
    """One repetition: prefill and decode figures of ``model`` along the ``decode`` path (``DECODE_MODES``)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    cpu = time.process_time()
    prefill = _time(lambda: model(input_ids=ids, use_cache=False))
    prefill_cpu = time.process_time() - cpu
    if decode == "generate":
        cpu = time.process_time()
        generate = _time(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                                                pad_token_id=0))
        cpu = time.process_time() - cpu - prefill_cpu
        seconds, tokens = max(generate - prefill, 1e-9), new_tokens
    else:  # the fast paths time their one-token steps themselves (new_tokens - 1 of them follow the prefill)
        from prunekit.decode import decoder_for

        decoder = decoder_for(model, decode)
        decoder.generate(ids, new_tokens)
        seconds, tokens, cpu = max(decoder.last["decode_s"], 1e-9), decoder.last["steps"], decoder.last["decode_cpu_s"]
    row = {"prefill_tok_s": batch * prompt_len / prefill, "decode_tok_s": batch * tokens / seconds,
           "latency_ms_per_token": 1000 * seconds / tokens, "cpu_ms_per_token": 1000 * max(cpu, 0.0) / tokens}
    from prunekit.realize.runtime import runtime_of

    gathered = getattr(runtime_of(model), "last_gather", None)  # a runtime that gathers weights per sequence
    if gathered:  # the one-time gather is part of the decode time above; also show decoding without it
        row["gather_ms"] = 1000 * gathered["seconds"]
        row["gather_mb"] = gathered["mb"]
        row["decode_tok_s_excl_gather"] = batch * tokens / max(seconds - gathered["seconds"], 1e-9)
    return row


def check_decode(models: dict[str, torch.nn.Module], decodes) -> None:
    """Refuse, before any measurement, a decode path that some model cannot take (the comparison needs the same
    path for all of them)."""
    from prunekit.decode import unsupported
    from prunekit.errors import PrunekitError

    for mode in decodes:
        for name, model in models.items():
            why = unsupported(model, mode)
            if why:
                raise PrunekitError(f"--decode {mode} cannot decode {name}: {why} (every model is decoded along the "
                                    "same path; pass --decode generate, which every model supports)")


def bench(models: dict[str, torch.nn.Module], batch_sizes=(1, 4), prompt_len: int = 128, new_tokens: int = 32,
          repeats: int = 3, progress: bool = True, decodes=("generate",)) -> list[dict]:
    """Median figures per (model, decode path, batch size), measured in interleaved order; the first model is the
    baseline of each path. A fast path is warmed up once per batch size before the measurements (for ``compiled``
    that call compiles; its seconds are ``compile_s``)."""
    from tqdm.auto import tqdm

    decodes = tuple(decodes)
    check_decode(models, decodes)
    if new_tokens < 2 and any(d != "generate" for d in decodes):
        raise ValueError("new_tokens must be at least 2: the fast paths time the steps after the first token")
    from prunekit.decode import decoder_for

    compile_s: dict[tuple[str, str, int], float] = {}
    for name, m in models.items():
        m.eval()
        measure(m, 1, 8, 2)  # warm-up
        for d in decodes:
            for b in batch_sizes if d != "generate" else ():
                measure(m, b, prompt_len, new_tokens, decode=d)  # allocates the cache (and compiles) at this shape
                seconds = decoder_for(m, d).compile_s.get((b, prompt_len + new_tokens - 1, False))
                if seconds is not None:
                    compile_s[(name, d, b)] = seconds
    samples: dict[tuple[str, str, int], list[dict]] = {}
    steps = [(r, b, d, name) for r in range(repeats) for b in batch_sizes for d in decodes for name in models]
    for r, b, d, name in tqdm(steps, desc="bench", disable=not progress):
        samples.setdefault((name, d, b), []).append(measure(models[name], b, prompt_len, new_tokens, seed=r, decode=d))
    base_name = next(iter(models))
    base_macs = matmul_macs_per_token(models[base_name])
    rows = []
    for (name, d, b), runs in samples.items():
        model = models[name]
        row = {"model": name, "decode": d, "batch": b, "params": sum(p.numel() for p in model.parameters()),
               "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
               "ideal_speedup": base_macs / matmul_macs_per_token(model)}
        if (name, d, b) in compile_s:
            row["compile_s"] = compile_s[(name, d, b)]
        for key in runs[0]:
            row[key] = statistics.median(run[key] for run in runs if key in run)
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["model"] == base_name and r["batch"] == row["batch"]
                    and r["decode"] == row["decode"])
        row["prefill_speedup"] = row["prefill_tok_s"] / base["prefill_tok_s"]
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["decode_vs_ideal"] = row["decode_speedup"] / row["ideal_speedup"]
        # the same from process CPU time: steadier than wall time when other processes share the cores (with one
        # thread it is the work done; with several it counts their spinning too)
        row["cpu_speedup"] = base["cpu_ms_per_token"] / max(row["cpu_ms_per_token"], 1e-9)
        row["cpu_vs_ideal"] = row["cpu_speedup"] / row["ideal_speedup"]
    return rows


def peak_rss_mb(location: str, batch: int, prompt_len: int, new_tokens: int, decode: str = "generate") -> float:
    """Peak resident memory (MB) of a fresh process that loads ``location`` and generates as ``measure`` does
    (along the ``decode`` path)."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\nfrom prunekit.bench import measure\nfrom prunekit.memory import peak_rss_mb\n"
            "from prunekit.models import load_model\n"
            "m = load_model(sys.argv[1])\nmeasure(m, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), "
            "decode=sys.argv[5])\nprint(json.dumps(peak_rss_mb()))")
    done = subprocess.run([sys.executable, "-c", code, location, str(batch), str(prompt_len), str(new_tokens), decode],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory run for {location} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def format_rows(rows: list[dict]) -> str:
    """Markdown table; a ``gather ms / MB`` column (per-sequence weight gathering of a dynamic runtime, once per
    generate call) appears when a model has one, a ``compile s`` column when a path compiled."""
    gather = any("gather_ms" in r for r in rows)
    compiled = any("compile_s" in r for r in rows)
    lines = ["| model | decode | batch | params | prefill tok/s | decode tok/s | ms/token | decode speed-up | ideal "
             "| gain vs ideal | peak MB |" + (" compile s |" if compiled else "")
             + (" gather ms / MB |" if gather else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if compiled else "")
             + ("---|" if gather else "")]
    for r in rows:
        ratio = f"{r['decode_vs_ideal']:.2f}"
        peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "–"
        extra = ""
        if compiled:
            extra += f" {r['compile_s']:.0f} |" if "compile_s" in r else " – |"
        if gather:
            extra += f" {r['gather_ms']:.1f} / {r['gather_mb']:.1f} |" if "gather_ms" in r else " – |"
        lines.append(f"| {r['model']} | {r.get('decode', 'generate')} | {r['batch']} | {r['params'] / 1e6:.1f}M | "
                     f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['latency_ms_per_token']:.1f} | "
                     f"{r['decode_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {ratio} | {peak} |{extra}")
    return "\n".join(lines)


def main(model: str = "smollm2-135m", pruned: list[str] | None = None, batch_sizes: list[int] | None = None,
         prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3, peak_memory: bool = True,
         decode: list[str] | None = None, output: str | None = None) -> list[dict]:
    """Benchmark a dense model against pruned folders.

    Args:
        model: the baseline (zoo name or folder).
        pruned: folders written by ``prunekit prune`` (physically cut models are the ones that get faster).
        batch_sizes: decode batch sizes (default 1 and 4).
        prompt_len: prompt tokens (prefill).
        new_tokens: generated tokens per sequence (decode).
        repeats: interleaved repetitions; medians are reported.
        peak_memory: also measure each model's peak resident memory in a fresh process per batch size (along the
            static path if measured, else generate; a compilation's own memory is not counted).
        decode: decode paths, each measured for every model (default [generate]): ``generate`` (transformers'
            generate), ``static`` (preallocated KV cache, lean greedy loop), ``compiled`` (the same, one-token step
            compiled by torch.compile; compile seconds reported apart). See ``prunekit.decode``.
        output: optional JSON file for the rows.
    """
    import json

    from prunekit.models import load_model

    locations = {Path(model).name: model, **{Path(folder).name: folder for folder in pruned or []}}
    models = {name: load_model(location) for name, location in locations.items()}
    decodes = tuple(decode or ("generate",))
    rows = bench(models, tuple(batch_sizes or (1, 4)), prompt_len, new_tokens, repeats, decodes=decodes)
    if peak_memory:
        del models
        path = next((d for d in ("static", "generate") if d in decodes), "static")  # compiling costs memory
        peaks = {}
        for row in rows:
            key = (row["model"], row["batch"])
            if key not in peaks:
                peaks[key] = peak_rss_mb(locations[row["model"]], row["batch"], prompt_len, new_tokens, path)
            row["peak_rss_mb"] = peaks[key]
    print(f"\nthreads: {torch.get_num_threads()}; prompt {prompt_len} tokens; {new_tokens} new tokens; "
          f"median of {repeats} interleaved repetitions")
    print(format_rows(rows))
    if output:
        Path(output).write_text(json.dumps(rows, indent=2))
    return rows
