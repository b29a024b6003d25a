"""What the benchmark scripts share: the installed ``prunekit`` command, one run per process, data options."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def prunekit() -> str:
    return str(Path(sys.executable).with_name("prunekit"))


class Progress:
    """A script's overall progress: step k of n, elapsed time and an ETA from the mean time of finished steps.

    Each step's own progress (Lightning's bar, lm-eval's and the bench's tqdm bars, with their ETAs) shows in
    the child process's output below the step line.
    """

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.time()

    def step(self, what: str) -> None:
        elapsed = time.time() - self.start
        eta = _clock(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        print(f"\n[{self.done + 1}/{self.total}] {what} (elapsed {_clock(elapsed)}, ETA {eta})", flush=True)
        self.done += 1


def _clock(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def run(args: list[str], out: Path, progress: Progress | None = None, reuse: bool = False) -> dict:
    """``prunekit <args> --output_dir out`` in its own process; its metrics.json.

    ``reuse``: a finished step (``out/metrics.json`` exists, written last and atomically by prunekit) is not
    run again, so an interrupted benchmark resumes where it stopped (use one work folder per configuration).
    """
    if progress is not None:
        progress.step(f"{args[0]} {out.name}")
    if reuse and (out / "metrics.json").exists():
        print(f"reusing {out} (finished earlier)", flush=True)
        return json.loads((out / "metrics.json").read_text())
    cmd = [prunekit(), *args, "--output_dir", str(out), "--trainer.logger", "false"]
    print("$", " ".join(cmd[1:]), flush=True)
    command(cmd[1:], cwd=out.parent)
    return json.loads((out / "metrics.json").read_text())


def command(args: list[str], cwd: Path | None = None) -> None:
    """``prunekit <args>`` in a fresh process (what the figures need: each run's own peak memory, no shared
    allocator), or in this one with ``PRUNEKIT_BENCH_IN_PROCESS=1`` (the scripts' smoke tests, where a process
    per step proves nothing and costs its start-up)."""
    if os.environ.get("PRUNEKIT_BENCH_IN_PROCESS") == "1":
        from prunekit.cli import main

        here = os.getcwd()
        os.chdir(cwd or here)
        try:
            code = main(list(args))
        finally:
            os.chdir(here)
        if code:
            raise SystemExit(f"prunekit {' '.join(args)} failed with exit code {code}")
        return
    subprocess.run([prunekit(), *args], check=True, cwd=cwd)


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--eval_samples", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--dense_cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the dense model's lm-eval results of an earlier run with the same weights, tasks and "
                        "options (prunekit.evalcache, in $PRUNEKIT_EVAL_CACHE or <prunekit cache>/zeroshot); "
                        "--no-dense_cache scores them again")
    return p


def dense_cache_flags(args: argparse.Namespace) -> list[str]:
    """``prunekit eval`` options of the dense model's evaluation: its lm-eval results cached unless
    ``--no-dense_cache`` (a pruned folder's evaluation is run once anyway)."""
    return ["--tasks_cache", "true" if getattr(args, "dense_cache", False) else "false"]


def data_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--data.num_samples", str(args.num_samples), "--data.seq_len", str(args.seq_len),
            "--data.eval_samples", str(args.eval_samples)]


def publish(out: Path, stem: str, result: dict, table, plot) -> None:
    """Write ``<stem>.json`` (``result``), ``<stem>.md`` (``table(result)``) and ``<stem>.png`` (``plot``) into
    ``out`` and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    text = table(result)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(text)
    plot(result, out / f"{stem}.png")
    print("\n" + text)


def task_table_head(meta: dict, first: str, head: list[str], tasks: bool = True) -> list[str]:
    """Caption and header lines of a task-accuracy table (``meta``: model, limit, perplexity, calibration);
    ``tasks=False``: a table without zero-shot columns (no lm-eval part in the caption)."""
    limit = f"first {meta['limit']:g} documents per task" if meta["limit"] else "all evaluation documents"
    scored = f"lm-eval acc, {limit}; " if tasks else ""
    return [f"{Path(meta['model']).name}: {first}; {scored}perplexity on {meta['perplexity']}; "
            f"calibration {meta['calibration']}; {meta['cpu_count']} CPU cores", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def acc_cells(row: dict, tasks: list[str]) -> list[str]:
    """Each task's accuracy (3 decimals, "-" if missing), then the average."""
    cells = [f"{row[f'acc/{t}']:.3f}" if row.get(f"acc/{t}") is not None else "-" for t in tasks]
    return cells + [f"{row['average_acc']:.3f}" if row.get("average_acc") is not None else "-"]
