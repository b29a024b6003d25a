"""What the benchmark scripts share: the installed ``prunekit`` command, one run per process, data options."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def prunekit() -> str:
    return str(Path(sys.executable).with_name("prunekit"))


def run(args: list[str], out: Path) -> dict:
    """``prunekit <args> --output_dir out`` in its own process; its metrics.json."""
    cmd = [prunekit(), *args, "--output_dir", str(out), "--trainer.logger", "false"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=out.parent)
    return json.loads((out / "metrics.json").read_text())


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num_samples", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--eval_samples", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p


def data_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--data.num_samples", str(args.num_samples), "--data.seq_len", str(args.seq_len),
            "--data.eval_samples", str(args.eval_samples)]
