"""The options of ``run`` and ``compare``, shared by both: one flag per setting of the schema, in sections (the common
settings, then the methods' own), one-line errors, the reading of ``--set``, and the launch checks (torchrun,
``--export``, ``--resume``) that ask the method for a capability. Torch-free: ``--help`` and every configuration
error come before any heavy import.

``run --help`` shows the common settings and the section of the chosen method (``--method``, else the preset's);
the other methods' flags are accepted but not listed (``--method NAME --help`` lists them), and refused in one line
by :func:`config.check_method_settings` when given to a method that does not read them. ``compare --help`` lists
every method's section, each naming the methods it serves.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any, Callable, NoReturn, Optional, Sequence

from ..methods import EXPORT, RESUME, TORCHRUN, REGISTRY, owners, setting_groups
from . import config as C
from . import presets as P

PROG = "inflora-avalanche"
GROUP_TITLES = {
    "run": "run",
    "stream": "data stream",
    "model": "model",
    "method": "optimisation (every method; a preset's values apply to its own method only)",
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


class ScriptUsageError(Exception):
    """Bad command-line input of another script (a benchmark): its ``main`` reports it in one line, exit status 2."""


class ScriptParser(argparse.ArgumentParser):
    """argparse for scripts that report their own errors: an argparse error raises :class:`ScriptUsageError`."""

    def error(self, message: str) -> NoReturn:
        raise ScriptUsageError(message)


def script_main(script: str, parse_args: Callable[[Any], Any], run: Callable[[Any], dict], argv: Any = None,
                user_errors: tuple = ()) -> int:
    """The ``main`` of a benchmark script: parse, run, write the report as JSON to ``--out`` when given. A usage
    error, or one of ``user_errors`` (missing data, an unknown model), is one line on stderr and exit status 2."""
    try:
        args = parse_args(argv)
        report = run(args)
    except (ScriptUsageError, *user_errors) as err:
        print(f"{script}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.out is not None:
        from ..io import atomic_write_json

        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


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


def _add_flag(group: Any, field: C.Field, value: Any, hidden: bool = False) -> None:
    help_text = field.help
    if value is not None or "default" not in field.help:
        help_text += f" (default: {_show(value)})"
    kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS,
                              "help": argparse.SUPPRESS if hidden else help_text}
    if field.kind == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif field.kind in ("ints", "floats", "strs"):
        # the items of a strs field with choices are checked once, by the config layer (one line naming the flag)
        kwargs.update(nargs="+", type={"ints": int, "floats": float, "strs": str}[field.kind],
                      metavar=field.metavar or field.kind[:-1].upper())
    elif field.kind == "choice":
        kwargs["choices"] = field.allowed()
    else:
        kwargs.update(type=_value_type(field), metavar=field.metavar or METAVARS.get(field.kind, field.kind.upper()))
    group.add_argument(field.flag, *field.aliases, **kwargs)


def add_field_flags(parser: argparse.ArgumentParser, defaults: dict, skip: Sequence[str] = (),
                    method: Optional[str] = None) -> None:
    """One flag per schema field, each with the default the preset gives it: the common settings by group, then the
    methods' own. With ``method`` (``run``) only that method's section is listed, the other methods' flags are
    accepted but hidden; without (``compare``, or an unknown method) every method's section is listed."""
    groups = {name: parser.add_argument_group(title) for name, title in GROUP_TITLES.items()}
    for field in C.COMMON_FIELDS:
        if field.name not in skip:
            _add_flag(groups[field.group], field, defaults.get(field.name))
    chosen = REGISTRY.get(method or "")
    if chosen is not None:
        section = parser.add_argument_group(
            f"settings of {chosen.name} (another method's: --method NAME --help)",
            f"{P.method_label(chosen.name)}; capabilities: {', '.join(sorted(chosen.capabilities)) or 'none'}"
            + ("" if any(True for _ in chosen.fields) else "; no settings of its own"))
        for field in chosen.fields:
            _add_flag(section, field, defaults.get(field.name))
    for group in setting_groups():
        if chosen is not None:
            for field in group.fields:
                if all(field is not own for own in chosen.fields):
                    _add_flag(parser, field, defaults.get(field.name), hidden=True)
            continue
        section = parser.add_argument_group(f"{group.title} settings (methods: {', '.join(owners(group))})")
        for field in group.fields:
            _add_flag(section, field, defaults.get(field.name))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any setting by its key, VALUE in JSON (e.g. --set milestones=[10] --set class_order=null)")


def first_pass(argv: Sequence[str], default_preset: str) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--config", "-c", default=None)
    pre.add_argument("--method", default=None)
    pre.add_argument("--demo", action=argparse.BooleanOptionalAction, default=False)
    known, _ = pre.parse_known_args(list(argv))
    return known


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", default=None,
                        help="a YAML or JSON file of settings (keys as the flags, with underscores; `preset:` picks "
                             "the preset they are laid over); flags given here override it. A run writes its own "
                             "as <out>/config.yaml")


def config_file_values(first: argparse.Namespace) -> dict:
    """The settings of ``--config FILE`` (``{}`` without), with ``--preset`` checked against the file's ``preset``."""
    if not first.config:
        return {}
    values = P.load_config_file(first.config)
    if "preset" in values:
        try:
            P.load_preset(values["preset"])
        except C.ConfigError as err:
            raise C.ConfigError(f"config file {first.config}: {err}") from None
    if first.preset and "preset" in values and values["preset"] != first.preset:
        raise C.ConfigError(f"--preset {first.preset} and the preset of config file {first.config} "
                            f"({values['preset']}) differ; give the preset once")
    return values


def help_defaults(preset: str, method: Optional[str], file_values: Optional[dict] = None) -> dict:
    """The settings a run of ``preset`` (and ``--config`` values) would have without flags, for ``--help``. A preset
    that cannot be read is an error, also with ``--help``; an unknown method shows the schema defaults (the error
    comes after parsing)."""
    P.load_preset(preset)
    try:
        return P.merge_layers(preset, method, file_values=file_values)
    except C.ConfigError:
        return dict(C.DEFAULTS)


def overrides_from(args: argparse.Namespace) -> dict:
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


def check_launch(config: dict) -> None:
    """Settings that depend on how the process was launched (torchrun) or on the method's capabilities, still before
    heavy imports; one line each, naming the methods that have the capability."""
    method = config["method"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        C.check_capability(method, TORCHRUN, "torchrun", "run it in one process")
    if config["batch_size"] % world:
        raise C.ConfigError(f"batch_size {config['batch_size']} is the global batch and must divide by the {world} "
                            "processes; change --batch-size or --nproc-per-node")
    if config["export"]:
        C.check_capability(method, EXPORT, "--export (the merged model as a timm folder)", "drop --export")
    if config["resume"]:
        C.check_capability(method, RESUME, "--resume", "drop --resume and start anew")
