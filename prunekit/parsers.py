"""The LightningCLI parsers of ``prune`` and ``eval`` (and the base of registered commands' parsers).

Each builds ``PrunableLM`` (``--model``), ``CalibrationDataModule`` (``--data``), the Lightning ``Trainer``
(``--trainer``) and, for ``prune``, the pruning method (``--strategy``) from YAML files (``--config``, several
compose) and dotted overrides; ``--help`` shows prunekit's options first, ``--help-all`` every option.
Parsing errors are raised (``exit_on_error=False``) so ``prunekit.cli`` prints one clear line.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from prunekit import registry


def _trainer_defaults() -> dict:
    from prunekit.callbacks import SparsityLogger
    from prunekit.progress import Progress

    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs", "name": "prunekit"}},
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "inference_mode": False,
        "callbacks": [SparsityLogger(), Progress()],
    }


def rewrite_shorthands(args: list[str]) -> list[str]:
    """``--strategy NAME`` and ``--strategy.help NAME`` → the class path; ``--model X`` → ``--model.model X``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if key in ("--strategy", "--model", "--strategy.help"):
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
                i += 1
            if key != "--model" and value in registry.available():
                value = registry.class_path(value)
            elif key != "--model" and "." not in value and not value.startswith("{") and value:
                registry.get(value)  # raises: unknown pruning method, lists the available ones
            if key == "--model" and not value.endswith((".yaml", ".yml", ".json")) and not value.startswith("{"):
                key = "--model.model"
            out += [key, value]
        else:
            out.append(arg)
        i += 1
    return out


class BaseCLI(LightningCLI):
    """prunekit's LightningCLI: ``PrunableLM`` (``--model``) and ``CalibrationDataModule`` (``--data``), no
    subcommands, trainer defaults for CPU runs, errors raised instead of printed with the whole parser."""

    command = "prune"

    def __init__(self, args: list[str], **kwargs) -> None:
        from prunekit.data import CalibrationDataModule
        from prunekit.module import PrunableLM

        self._help_all = "--help-all" in args
        args = ["--help" if a == "--help-all" else a for a in args]
        super().__init__(
            PrunableLM, CalibrationDataModule, args=rewrite_shorthands(args), run=False,
            save_config_callback=None, trainer_defaults=_trainer_defaults(), seed_everything_default=0,
            auto_configure_optimizers=False, load_from_checkpoint_support=False,
            parser_kwargs={"exit_on_error": False, "prog": f"prunekit {self.command}",
                           "description": (type(self).__doc__ or "").strip()}, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        parser.add_argument("--output_dir", type=str | None, default=None, help="Folder for the results.")
        parser.add_argument("--overwrite", type=bool, default=False, help="Replace an existing output folder.")

    def parse_arguments(self, parser, args) -> None:
        if ("-h" in args or "--help" in args) and not self._help_all:
            print(curated_help(parser, self.command))
            raise SystemExit(0)
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        from prunekit.export import check_output_dir

        check_accelerator(self.config.trainer.get("accelerator"))
        if self.config.get("output_dir"):
            check_output_dir(self.config.output_dir, self.config.overwrite, source=self.config.model.model)


class PruneCLI(BaseCLI):
    """Calibrate a model, prune it with a strategy (a pruning method), evaluate it and save it."""

    command = "prune"

    def add_arguments_to_parser(self, parser) -> None:
        from prunekit.strategy import PruningStrategy

        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(PruningStrategy, "strategy", subclass_mode=True, required=True)
        parser.add_argument("--eval_dense", type=bool, default=True, help="Also evaluate the dense model first.")
        parser.add_argument("--save_model", type=bool, default=True, help="Save the pruned model (safetensors).")
        parser.add_argument("--save_statistics", type=bool, default=False,
                            help="Save what calibration observed to statistics.safetensors (with fingerprints of "
                                 "the model and data).")
        parser.add_argument("--statistics", type=str | None, default=None,
                            help="Prune from a statistics.safetensors saved by --save_statistics (same model and "
                                 "calibration data) instead of calibrating.")
        parser.add_argument("--force", type=bool, default=False,
                            help="Accept --statistics whose fingerprint does not match this model or data.")
        from prunekit.streaming import CalibrationOptions

        parser.add_class_arguments(CalibrationOptions, "calibration")
        parser.link_arguments("calibration.streaming", "model.streaming")

    def before_instantiate_classes(self) -> None:
        from prunekit import registry
        from prunekit.errors import PrunekitError

        c = self.config
        if c.strategy is None or c.strategy.class_path in ("prunekit.strategy.PruningStrategy", None):
            raise PrunekitError("no pruning method: name the pruning method first (--strategy NAME, or strategy: "
                                f"class_path in a --config file), then its options; methods: "
                                f"{', '.join(registry.available())}")
        if not c.get("output_dir"):
            what = c.strategy.init_args.get("pattern", "unstructured")
            if c.strategy.init_args.get("density") is not None:  # methods that state what they keep
                what = f"density{c.strategy.init_args['density']:g}" \
                    if isinstance(c.strategy.init_args["density"], (int, float)) else "per-layer"
            elif what == "unstructured":
                sparsity = c.strategy.init_args.get("sparsity")
                what = f"{0.5 if sparsity is None else sparsity:g}"
            name = c.strategy.class_path.rsplit(".", 1)[-1].lower()
            c.output_dir = f"runs/{Path(c.model.model).name}-{name}-{what.replace(':', 'of')}"
        super().before_instantiate_classes()


class EvalCLI(BaseCLI):
    """Perplexity and lm-eval zero-shot tasks of a model or of a folder prunekit wrote (any plan kind)."""

    command = "eval"

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--tasks", type=list[str], default=["perplexity"],
                            help="perplexity, lm-eval tasks (piqa, arc_easy, …, mmlu, gsm8k) or task groups; see "
                                 "README 'Zero-shot tasks'.")
        parser.add_argument("--limit", type=int | float | None, default=None,
                            help="First N evaluation documents per task (a fraction if below 1).")
        parser.add_argument("--num_fewshot", type=int | None, default=None,
                            help="Few-shot examples (default: each task's own, 0 except gsm8k's 5).")
        parser.add_argument("--batch_size", type=int, default=8, help="lm-eval batch size.")
        parser.add_argument("--max_gen_toks", type=int | None, default=None,
                            help="Generated tokens per answer for generation tasks (lm-eval default 256).")
        parser.add_argument("--prefix_sharing", type=bool, default=True,
                            help="Score the choices of a multiple-choice request on one run of their shared context "
                                 "(prunekit.fastlm: the same metrics as lm-eval's HFLM, faster); false runs lm-eval's "
                                 "HFLM as is.")
        parser.add_argument("--tasks_cache", type=bool, default=False,
                            help="Reuse the lm-eval results of an earlier run with the same weights, tokenizer, tasks "
                                 "and options (prunekit.evalcache; stored in $PRUNEKIT_EVAL_CACHE, else "
                                 "<prunekit cache>/zeroshot).")
        parser.add_argument("--runtime", type=dict | None, default=None,
                            help="Options for a dynamic method's runtime saved in the folder, e.g. "
                                 "--runtime '{mode: class}'.")

    def before_instantiate_classes(self) -> None:
        from prunekit.tasks import expand

        expand(self.config.tasks)  # an unknown task fails before the model is loaded
        super().before_instantiate_classes()


def check_accelerator(accelerator) -> None:
    """An accelerator that was asked for but is not on this machine: say so plainly, before any work."""
    import torch

    from prunekit.errors import PrunekitError

    name = str(accelerator).lower() if isinstance(accelerator, str) else None
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise PrunekitError(f"--trainer.accelerator {accelerator} was requested, but this machine has no GPU that "
                            "torch can use (torch.cuda.is_available() is False: no device, or a CPU-only torch "
                            "build); run with --trainer.accelerator cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PrunekitError("--trainer.accelerator mps was requested, but Apple's MPS is not available here; run "
                            "with --trainer.accelerator cpu")


def curated_help(parser, command: str) -> str:
    """prunekit's options first (job, method, model, data), a pointer to Lightning's; not the 500-line dump."""
    groups: dict[str, list] = {"job": [], "model": [], "data": [], "calibration": []}
    for action in parser._actions:
        dest = getattr(action, "dest", "")
        if not dest or dest in ("help", "config", "print_config", "seed_everything") or not action.option_strings:
            continue
        head = dest.split(".")[0]
        if "." not in dest and head not in ("trainer", "model", "data", "strategy"):
            groups["job"].append(action)
        elif head in ("model", "data", "calibration") and dest.count(".") == 1 and dest not in ("data.tokenizer",
                                                                                                 "model.streaming"):
            groups[head].append(action)

    def line(action) -> str:
        flag = action.option_strings[-1]
        text = " ".join((action.help or "").split())
        default = action.default
        if default is not None and not isinstance(default, (dict, list)) and "default" not in text.lower():
            text += f" (default: {default})"
        return f"  {flag:<28} {text}"

    out = [f"usage: prunekit {command} [--config FILE.yaml ...] [options]", "", parser.description or "", ""]
    if any(getattr(a, "dest", "") == "strategy" for a in parser._actions):
        out += ["pruning method (--strategy; Lightning's distributed engine is --trainer.strategy):",
                f"  {'--strategy NAME':<28} one of: {', '.join(registry.available())}",
                f"  {'--strategy.help NAME':<28} the method's options and defaults",
                f"  {'--strategy.OPTION VALUE':<28} set one, e.g. --strategy.sparsity 0.6", ""]
    titles = {"job": f"{command} options:", "model": "model (--model.*; --model NAME is short for --model.model):",
              "data": "calibration and evaluation data (--data.*):",
              "calibration": "memory of a run (--calibration.*; README 'Models larger than memory'):"}
    for key, actions in groups.items():
        if actions:
            out += [titles[key], *(line(a) for a in actions), ""]
    out += ["Lightning Trainer (--trainer.*): accelerator (cpu), devices (1), strategy (Lightning's distributed engine,",
            "  e.g. ddp), num_nodes, logger (CSV under logs/; configs/wandb.yaml for W&B), callbacks, ...",
            "",
            "other: --config FILE (YAML; several compose, later ones win), --print_config (the resolved config),",
            "       --help-all (every option, Lightning's included)"]
    return "\n".join(out)
