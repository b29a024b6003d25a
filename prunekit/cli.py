"""``prunekit`` command line: dispatch (the parsers are in ``prunekit.parsers``, the jobs in ``prunekit.jobs`` and
in the packages that register commands).

Built-in commands: ``prune``, ``eval`` (LightningCLI parsers: every option from YAML with ``--config``,
dotted overrides such as ``--strategy.sparsity 0.6``, ``--print_config``), ``bench`` and ``strategies``.
Packages add commands through the entry-point group ``prunekit.commands`` (a :class:`Command`); SEAP's
``activations`` and ``sensitivity`` come that way. ``--strategy NAME`` names a registered pruning method —
not to be confused with ``--trainer.strategy``, Lightning's distributed engine (``ddp``).

Light commands (``prunekit --help``, ``prunekit strategies``) import neither torch nor Lightning. SIGINT and
SIGTERM stop any command promptly, leave no output or temporary folder behind and exit 130 / 143.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class Command:
    """A ``prunekit`` subcommand: ``parser`` (a LightningCLI subclass, as ``"module:Class"``) builds the run's
    objects from the arguments and ``run`` (``"module:function"``) does the job; without a parser, ``run`` gets
    the raw argument list."""

    name: str
    summary: str
    run: str
    parser: str | None = None
    examples: tuple[str, ...] = field(default_factory=tuple)


BUILTIN = (
    Command("prune", "calibrate, prune, evaluate and save a model", "prunekit.jobs:prune", "prunekit.parsers:PruneCLI",
            ("prunekit prune --config configs/METHOD.yaml            (one YAML per method in configs/)",
             "prunekit prune --strategy NAME --strategy.sparsity 0.6 --output_dir runs/pruned",
             "prunekit prune --strategy.help NAME                     (a method's options)")),
    Command("eval", "perplexity and lm-eval tasks of a model or pruned folder", "prunekit.jobs:evaluate",
            "prunekit.parsers:EvalCLI",
            ("prunekit eval --model runs/pruned",
             "prunekit eval --model runs/pruned --tasks [perplexity,piqa,arc_easy] --limit 200")),
    Command("bench", "prefill/decode tokens/s of a model vs pruned folders", "prunekit.cli:run_bench", None,
            ("prunekit bench --model smollm2-135m --pruned [runs/pruned]",)),
    Command("strategies", "list the registered pruning methods (--strategy NAME)", "prunekit.cli:run_strategies"),
)


def commands() -> dict[str, Command]:
    """Built-in commands, then those registered in the entry-point group ``prunekit.commands`` (a broken entry
    point is reported on stderr and skipped, so it cannot take the other commands down)."""
    found = {c.name: c for c in BUILTIN}
    for ep in entry_points(group="prunekit.commands"):
        if ep.name in found:
            continue
        try:
            command = ep.load()
        except Exception as e:  # noqa: BLE001 - a third-party package's import error
            print(f"prunekit: skipping command {ep.name!r} ({ep.value}): {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if type(command).__name__ != "Command" or not all(hasattr(command, a) for a in ("name", "run", "summary")):
            print(f"prunekit: skipping command {ep.name!r}: {ep.value} is not a prunekit.cli.Command", file=sys.stderr)
            continue
        found[ep.name] = command
    return found


def usage() -> str:
    table = commands()
    width = max(len(n) for n in table)
    lines = [f"usage: prunekit {{{','.join(table)}}} [options]", ""]
    lines += [f"  {c.name:<{width}}  {c.summary}" + (f"  (prunekit {c.name} --help)" if c.parser or c.name == "bench" else "")
              for c in table.values()]
    lines += ["", "examples:"] + [f"  {e}" for c in table.values() for e in c.examples]
    lines += ["", "--strategy NAME picks the pruning method; --trainer.strategy picks Lightning's distributed engine "
              "(e.g. ddp)."]
    return "\n".join(lines)


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------- light commands
def _class_doc(target: str) -> str:
    """First docstring line of ``module:Class`` read from its source, without importing it (fast, no torch)."""
    import ast
    import importlib.util

    module, _, name = target.partition(":")
    try:
        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else ""
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.name == name:
                doc = ast.get_docstring(node) or ""
                return doc.strip().splitlines()[0] if doc.strip() else ""
    except (ImportError, OSError, SyntaxError, ValueError):
        pass
    return ""


def run_strategies(args: list[str]) -> None:
    if args:
        raise PrunekitError(f"prunekit strategies takes no options, got {' '.join(args)}")
    from prunekit import registry

    strategies = registry.available()
    width = max((len(n) for n in strategies), default=4)
    for name, info in strategies.items():
        print(f"{name:<{width}}  {_class_doc(info.entry_point.value)}  [{info.distribution}]")


def run_bench(args: list[str]) -> None:
    from jsonargparse import CLI

    from prunekit.bench import main as bench_main

    CLI(bench_main, args=args, prog="prunekit bench")


# ---------------------------------------------------------------------------------------------- dispatch
class Interrupted(BaseException):
    """Raised by the SIGINT/SIGTERM handlers: unwinds every phase (cleaning up as it goes) to ``main``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_STOPPING: list[int] = []


def _on_signal(signum, frame) -> None:
    """The first SIGINT/SIGTERM unwinds the run (every phase cleans up as it goes); later ones are ignored, so
    they cannot interrupt the clean-up — whoever re-installs handlers meanwhile (Lightning does)."""
    if _STOPPING:
        return
    _STOPPING.append(signum)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def _error_cause(e: BaseException) -> str | None:
    """The user-facing message behind ``e``: a PrunekitError, a parser error, a Lightning misconfiguration."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, PrunekitError):
            return str(e)
        name = type(e).__name__
        module = type(e).__module__
        if name == "MisconfigurationException":
            return f"{e} (check the --trainer options)"
        if name == "ArgumentError" and module.startswith(("jsonargparse", "argparse")):
            return _parser_message(str(e))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _parser_message(text: str) -> str:
    """jsonargparse's error in one line: which option, what it got, what it needs — not the nested listing of
    every type and subclass it tried."""
    import re

    from prunekit import registry

    keys = re.findall(r'Parser key "([^"]+)"', text)
    given = re.findall(r"(?:Given|Got) value: (.*)", text)
    expected = [t for t in dict.fromkeys(re.findall(r"Expected a <class '([^']+)'>", text)) if t != "NoneType"]
    unknown = re.search(r"Option '([^']+)' is not accepted", text)
    if keys and unknown:  # an option the chosen class does not take, e.g. --strategy.modules of a method without it
        cls = re.search(r"class_path '([^']+)'", text)
        names = [n for n in registry.available() if cls and registry.class_path(n) == cls.group(1)]
        what = names[0] if names else (cls.group(1).rsplit(".", 1)[-1] if cls else keys[0])
        see = f"; its options: prunekit prune --{keys[0]}.help {what}" if names else ""
        return f"--{keys[0]}.{unknown.group(1)}: {what} has no option {unknown.group(1)!r}{see}"
    if keys and given and "NestedArg" not in given[0]:
        need = f"a {' or '.join(expected)}" if expected else "another value"
        hint = " (write a list as [a,b])" if "list" in expected else ""
        return f"--{'.'.join(keys)}: got {given[0]!r}, which is not {need}{hint}"
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[0] if lines else "invalid arguments"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    table = commands()
    if command not in table:
        print(f"prunekit: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    spec = table[command]
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _STOPPING.clear()
    for s in previous:
        signal.signal(s, _on_signal)
    try:
        if spec.parser is not None:
            from prunekit._quiet import quiet

            quiet()
            parser_cls = _load(spec.parser)
            cli = parser_cls(rest)
            _load(spec.run)(cli)
        else:
            _load(spec.run)(rest)
    except Interrupted as stop:
        from prunekit.export import WRITTEN

        name = signal.Signals(stop.signum).name
        done = f"{', '.join(map(str, WRITTEN))} was written in full before it" if WRITTEN else "nothing was written"
        print(f"prunekit {command}: stopped by {name}; {done}", file=sys.stderr)
        return 128 + stop.signum
    except SystemExit as e:  # --help, --print_config
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:  # noqa: BLE001 - bad input arrives wrapped by jsonargparse/Lightning
        cause = _error_cause(e)
        if cause is None:
            raise
        print(f"prunekit {command}: error: {cause}", file=sys.stderr)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":  # python -m prunekit.cli: the installed module, so plugins see the same classes
    from prunekit.cli import main as installed_main

    sys.exit(installed_main())
