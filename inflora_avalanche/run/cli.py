"""The command line: ``inflora-avalanche run | compare | presets`` (also ``python -m inflora_avalanche``).

Every flag comes from the config schema (:data:`config.FIELDS`): ``--<key-with-dashes>``, with the value the chosen
preset gives it as the default shown by ``--help``. Parsing, ``--help`` and every configuration error happen here,
before torch, timm or Avalanche are imported.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from .. import streams as S
from . import config as C
from . import presets as P
from .interrupts import NOTHING_WRITTEN, interrupts_not_lost
from .options import (PROG, Parser, ScriptHelpFormatter, add_config_flag, add_field_flags,  # noqa: F401
                      check_launch, config_file_values, fail, first_pass, help_defaults, overrides_from)

DEFAULT_PRESET = "cifar100_inflora"  # of `run`; an experiment script's is its stream's (streams.Script)


def default_preset(benchmark: Optional[str]) -> str:
    """The preset a run starts from: the experiment script's (``benchmark``: the stream it is the default of)."""
    stream = S.script_stream(benchmark)
    return stream.script.default_preset if stream is not None else DEFAULT_PRESET


# --------------------------------------------------------------------------------------------------- run
def run_parser(benchmark: Optional[str], defaults: dict, prog: str) -> Parser:
    preset = default_preset(benchmark)
    parser = Parser(
        prog=prog,
        usage="%(prog)s [--preset NAME|FILE] [--config FILE] [--method NAME] [--KEY VALUE ...] [--set KEY=VALUE ...]",
        description=(
            "Train one method on a class-incremental stream, experience by experience, for every seed; evaluate on "
            "all seen classes after each; write results.json, summary.txt and plots to --out. A preset (shipped name "
            "or .json/.yaml file) and a --config file set the defaults shown below; any flag overrides them. The last "
            "section lists the "
            "settings of the chosen method (--method, else the preset's); `--method NAME --help` shows another's."),
    )
    parser.add_argument("--preset", default=preset,
                        help=f"preset name or .json/.yaml file (default: {preset}; list them with `{PROG} presets`)")
    add_config_flag(parser)
    parser.add_argument("--list-presets", action="store_true", help="print the presets and methods, then exit")
    add_field_flags(parser, defaults, method=defaults.get("method"))
    return parser


def config_from_argv(argv: Sequence[str], benchmark: Optional[str] = None, prog: str = f"{PROG} run") -> dict:
    """Parse ``argv`` into a validated config (no heavy import); ``--help`` prints and exits."""
    return parse_run(argv, benchmark, prog)[0]


def parse_run(argv: Sequence[str], benchmark: Optional[str] = None, prog: str = f"{PROG} run") -> tuple[dict, str]:
    """:func:`config_from_argv`, and the preset to name in the run's written ``config.yaml`` (a shipped preset's
    name, or the absolute path of a preset file)."""
    script_stream = S.script_stream(benchmark)
    first = first_pass(argv, default_preset(benchmark))
    file_values = config_file_values(first)
    file_preset = file_values.get("preset")
    # `demo: true` in a file is the --demo switch only without another preset (a copy of the demo preset has it too)
    demo = first.demo or (file_values.get("demo") is True and file_preset in (None, P.DEMO_PRESET))
    preset = first.preset or file_preset or default_preset(benchmark)
    if demo:
        preset = P.DEMO_PRESET
    preset = P.resolve_preset_name(preset, script_stream.script.preset_prefix if script_stream else "")
    defaults = help_defaults(preset, first.method, file_values)
    if first.method:
        defaults["method"] = first.method  # the section --help shows, also for a preset it cannot read
    parser = run_parser(benchmark, defaults, prog)
    args = parser.parse_args(list(argv))
    if args.list_presets:
        print_presets()
        raise SystemExit(0)
    overrides = overrides_from(args)
    given = P.given_keys(preset, first.method, overrides, file_values)
    if demo:
        def from_where(key: str) -> str:
            return f"{key} from {given.files[key]}" if key in given.files else C.FIELD_BY_NAME[key].flag

        conflicts = [flag for flag, named in (("--preset", first.preset),
                                              (f"preset from {first.config}", file_preset not in (None, P.DEMO_PRESET)),
                                              (from_where("data_root"), "data_root" in given),
                                              (from_where("benchmark"), "benchmark" in given)) if named]
        if conflicts:
            raise C.ConfigError(f"--demo runs its own offline preset ({P.DEMO_PRESET}); drop {', '.join(conflicts)}")
    config = P.layered_config(preset, first.method, overrides, file_values)
    C.check_method_settings(config, given)
    if script_stream is not None:
        accepted = {script_stream.name, *script_stream.script.also_accepts}
        if config["benchmark"] not in accepted:
            script = S.script_of(config["benchmark"])
            raise C.ConfigError(f"preset {config['preset']!r} is a {config['benchmark']} preset; run it with "
                                f"experiments/{script.file if script else 'run_imagenet_r.py'} or `{PROG} run`")
    source = preset if P.is_shipped_preset(preset) else str(P.preset_path(preset).resolve())
    return config, source


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
        config, preset_source = parse_run(argv, benchmark, prog)
        check_launch(config)
        from .preflight import check_before_heavy_imports

        check_before_heavy_imports(config)
    except C.ConfigError as err:
        fail(str(err))
    from .loop import run_experiment
    from .metrics import NonFiniteLossError
    from .parallel import init_distributed, one_line, user_errors

    errors = user_errors()
    group = False
    try:
        group = init_distributed(config)
        run_experiment(config, preset_source=preset_source)
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
    try:
        return _main(argv)
    except BrokenPipeError:
        # whoever read our output has gone (`inflora-avalanche presets | head`): end quietly, as a Unix tool does;
        # stdout goes to devnull so that the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Optional[Sequence[str]]) -> int:
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
