"""The command line: ``inflora-avalanche run | compare | presets`` (also ``python -m inflora_avalanche``).

Every flag comes from the config schema (:data:`config.FIELDS`): ``--<key-with-dashes>``, with the value the chosen
preset gives it as the default shown by ``--help``. Parsing, ``--help`` and every configuration error happen here,
before torch, timm or Avalanche are imported.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any, NoReturn, Optional, Sequence

from . import config as C
from . import presets as P
from .interrupts import NOTHING_WRITTEN, interrupts_not_lost

PROG = "inflora-avalanche"
# The default preset of each experiment script, and which streams it accepts (its presets' "benchmark").
SCRIPT_DEFAULTS = {"split_cifar100": "cifar100_inflora", "imagenet_r": "imagenet_r_10", "domainnet": "domainnet_inflora"}
SCRIPT_ACCEPTS = {
    "split_cifar100": {"split_cifar100", "digits"},
    "imagenet_r": {"imagenet_r", "folder", "digits", "synthetic"},
    "domainnet": {"domainnet", "folder", "digits"},
}
SCRIPTS = {"split_cifar100": "run_split_cifar.py", "imagenet_r": "run_imagenet_r.py", "domainnet": "run_domainnet.py"}
SCRIPT_PREFIX = {"split_cifar100": "cifar100_", "domainnet": "domainnet_"}
GROUP_TITLES = {
    "run": "run",
    "stream": "data stream",
    "model": "model",
    "method": "method hyper-parameters (a preset's apply to its own method only)",
    "training": "training",
}


METAVARS = {"str": "TEXT", "path": "PATH", "int_or_ints": "N|[I,...]", "int_or_strs": "N|NAME", "json": "JSON"}


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr (written at once, so lines of several processes never interleave) and exit."""
    sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    raise SystemExit(code)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) that point at ``--help``, and no abbreviated flags (``--epoch``
    must not silently mean ``--epochs``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


class ScriptHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of the other scripts (benchmarks, diagnostics demo): each option's default once (lists as words),
    none for unset options and switches, and only the first long name of an option (older names stay accepted)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if len(longs) > 1:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if not s.startswith("--")] + longs[:1]
        return super()._format_action_invocation(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("(default" in text or default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or action.required or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _value_type(field: C.Field):
    def convert(text: str) -> Any:
        try:
            return to_json_value(field, text)
        except C.ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = field.kind
    return convert


def _show(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return "unset" if value is None else str(value)


def add_field_flags(parser: argparse.ArgumentParser, defaults: dict, skip: Sequence[str] = ()) -> None:
    """One flag per schema field, grouped, each with the default the preset gives it."""
    groups = {name: parser.add_argument_group(title) for name, title in GROUP_TITLES.items()}
    for field in C.FIELDS:
        if field.name in skip:
            continue
        value = defaults.get(field.name)
        help_text = field.help
        if value is not None or "default" not in field.help:
            help_text += f" (default: {_show(value)})"
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": help_text}
        if field.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.kind in ("ints", "floats", "strs"):
            kwargs.update(nargs="+", type={"ints": int, "floats": float, "strs": str}[field.kind],
                          metavar=field.kind[:-1].upper())
        elif field.kind == "choice":
            kwargs["choices"] = field.choices
        else:
            kwargs.update(type=_value_type(field), metavar=METAVARS.get(field.kind, field.kind.upper()))
        groups[field.group].add_argument(field.flag, *field.aliases, **kwargs)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any setting by its key, VALUE in JSON (e.g. --set milestones=[10] --set class_order=null)")


def _first_pass(argv: Sequence[str], default_preset: str) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--method", default=None)
    pre.add_argument("--demo", action=argparse.BooleanOptionalAction, default=False)
    known, _ = pre.parse_known_args(list(argv))
    return known


def _help_defaults(preset: str, method: Optional[str]) -> dict:
    """The settings a run of ``preset`` would have without flags (for ``--help``); schema defaults if unreadable."""
    try:
        return P.merge_layers(preset, method)
    except C.ConfigError:
        return dict(C.DEFAULTS)


def _overrides(args: argparse.Namespace) -> dict:
    values = {f.name: getattr(args, f.name) for f in C.FIELDS if hasattr(args, f.name)}
    explicit = parse_set(args.set)
    clash = sorted(set(values) & set(explicit))
    if clash:
        raise C.ConfigError(f"{clash[0]} is given both as {C.FIELD_BY_NAME[clash[0]].flag} and by --set; give it once")
    values.update(explicit)
    return values


# --------------------------------------------------------------------------------------------------- values
def to_json_value(field: C.Field, text: str) -> Any:
    """A command-line string as the field's value (lists from several words are handled by argparse)."""
    if text in ("null", "none", "None") and field.nullable:
        return None
    if field.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise C.ConfigError(f"{field.flag} expects an integer, got {text!r}") from None
    if field.kind == "float":
        try:
            return float(text)
        except ValueError:
            raise C.ConfigError(f"{field.flag} expects a number, got {text!r}") from None
    if field.kind in ("json", "int_or_ints", "int_or_strs"):
        try:
            return json.loads(text)
        except ValueError:
            if field.kind == "int_or_strs":
                return [text]
            raise C.ConfigError(f"{field.flag} expects JSON, got {text!r}") from None
    return text


def parse_set(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items (VALUE in JSON, or a bare string) as a dict."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise C.ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key = key.replace("-", "_")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


# --------------------------------------------------------------------------------------------------- run
def run_parser(benchmark: Optional[str], defaults: dict, prog: str) -> Parser:
    default_preset = SCRIPT_DEFAULTS.get(benchmark or "", "cifar100_inflora")
    parser = Parser(
        prog=prog,
        usage="%(prog)s [--preset NAME|FILE] [--method NAME] [--KEY VALUE ...] [--set KEY=VALUE ...]",
        description=(
            "Train one method on a class-incremental stream, experience by experience, for every seed; evaluate on "
            "all seen classes after each; write results.json, summary.txt and plots to --out. A preset (shipped name "
            "or .json file) sets the defaults shown below; any flag overrides it."),
    )
    parser.add_argument("--preset", default=default_preset,
                        help=f"preset name or .json file (default: {default_preset}; list them with "
                             f"`{PROG} presets`)")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and methods, then exit")
    add_field_flags(parser, defaults)
    return parser


def config_from_argv(argv: Sequence[str], benchmark: Optional[str] = None, prog: str = f"{PROG} run") -> dict:
    """Parse ``argv`` into a validated config (no heavy import); ``--help`` prints and exits."""
    first = _first_pass(argv, SCRIPT_DEFAULTS.get(benchmark or "", "cifar100_inflora"))
    preset = first.preset or SCRIPT_DEFAULTS.get(benchmark or "", "cifar100_inflora")
    if first.demo:
        preset = P.DEMO_PRESET
    preset = P.resolve_preset_name(preset, SCRIPT_PREFIX.get(benchmark or "", ""))
    parser = run_parser(benchmark, _help_defaults(preset, first.method), prog)
    args = parser.parse_args(list(argv))
    if args.list_presets:
        print_presets()
        raise SystemExit(0)
    overrides = _overrides(args)
    if first.demo:
        conflicts = [flag for flag, given in (("--preset", first.preset), ("--data-root", "data_root" in overrides),
                                              ("--benchmark", "benchmark" in overrides)) if given]
        if conflicts:
            raise C.ConfigError(f"--demo runs its own offline preset ({P.DEMO_PRESET}); drop {', '.join(conflicts)}")
    config = P.layered_config(preset, first.method, overrides)
    C.check_method_settings(config, set(overrides))
    accepted = SCRIPT_ACCEPTS.get(benchmark or "")
    if accepted is not None and config["benchmark"] not in accepted:
        script = SCRIPTS.get(config["benchmark"], "run_imagenet_r.py")
        raise C.ConfigError(f"preset {config['preset']!r} is a {config['benchmark']} preset; run it with "
                            f"experiments/{script} or `{PROG} run`")
    return config


def check_launch(config: dict) -> None:
    """Settings that depend on how the process was launched (torchrun) or on the method, still before heavy imports."""
    from ..methods import get_method

    method = get_method(config["method"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not method.inflora:
        raise C.ConfigError(f"{config['method']} runs in one process; torchrun applies to the InfLoRA methods")
    if config["batch_size"] % world:
        raise C.ConfigError(f"batch_size {config['batch_size']} is the global batch and must divide by the {world} "
                            "processes; change --batch-size or --nproc-per-node")
    if config["export"] and not method.inflora:
        raise C.ConfigError(f"--export writes InfLoRA's merged model; {config['method']} has none to export: drop "
                            "--export")


def run_main(argv: Optional[Sequence[str]] = None, benchmark: Optional[str] = None, prog: str = f"{PROG} run") -> int:
    """``run``: returns the exit code (2 for user errors, 3 when the training loss stops being finite, 130 on
    Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv, benchmark, prog)
    except SystemExit as done:  # fail(), --help and argparse errors
        return int(done.code or 0)


def _run(argv: list, benchmark: Optional[str], prog: str) -> int:
    try:
        with interrupts_not_lost(exit_if_nothing_written=True):
            return _run_checked(argv, benchmark, prog)
    except KeyboardInterrupt as stop:  # Ctrl-C at any point: one line, no traceback
        note = getattr(stop, "inflora_note", None) or NOTHING_WRITTEN
        sys.stderr.write(f"interrupted {note}\n")
        sys.stderr.flush()
        return 130


def _run_checked(argv: list, benchmark: Optional[str], prog: str) -> int:
    try:
        config = config_from_argv(argv, benchmark, prog)
        check_launch(config)
    except C.ConfigError as err:
        fail(str(err))
    from .loop import run_experiment
    from .metrics import NonFiniteLossError
    from .parallel import init_distributed, one_line, user_errors

    errors = user_errors()
    group = False
    try:
        group = init_distributed(config)
        run_experiment(config)
    except errors as err:
        fail(one_line(err))
    except NonFiniteLossError as err:
        fail(one_line(err), code=3)
    finally:
        if group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------------------------------- presets
def print_presets() -> None:
    print("presets (inflora-avalanche run --preset NAME):")
    for name in P.list_presets():
        try:
            preset = P.load_preset(name)
        except C.ConfigError as err:
            print(f"  {name:24s} (unreadable: {err})")
            continue
        print(f"  {name:24s} [{preset.get('method', C.DEFAULTS['method'])}] {preset.get('description', '')}")
    print("\nmethods (--method NAME; inflora-avalanche compare --methods NAME ...):")
    for name in P.list_method_presets():
        print(f"  {name:24s} {P.method_label(name)}")


# --------------------------------------------------------------------------------------------------- entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``inflora-avalanche`` / ``python -m inflora_avalanche``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": "train one method on one stream (every seed)",
                "compare": "run several methods on the same stream and tabulate them",
                "presets": "list the presets and methods"}
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {PROG} {{run,compare,presets}} ...\n\nInfLoRA (CVPR 2024) and baselines on Avalanche.\n")
        for name, text in commands.items():
            print(f"  {name:10s} {text}")
        print(f"\n`{PROG} COMMAND --help` lists that command's options with their defaults.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return run_main(rest)
    if command == "compare":
        from .compare import compare_main

        try:
            return compare_main(rest)
        except SystemExit as done:  # fail(), --help and argparse errors
            return int(done.code or 0)
    if command == "presets":
        print_presets()
        return 0
    fail(f"unknown command {command!r}; choose one of {', '.join(commands)}")
