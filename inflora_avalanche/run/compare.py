"""``inflora-avalanche compare``: run several methods through the one runner on the same stream, backbone, budget
and seeds, then tabulate A_last, A_avg, forgetting and costs.

Each method runs as ``inflora-avalanche run`` into ``OUT/<method>/`` (its own results, logs, checkpoint and resume),
by default in a fresh process so that its peak memory and time are its own. ``OUT/comparison.md``,
``OUT/comparison.json`` and ``OUT/curves.png`` hold the table. Stream, backbone and budget settings come from the
preset and flags; each method's hyper-parameters from its own preset (``presets/methods/<method>.json``), so a flag
such as ``--lr`` applies to every method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..methods import EXPORT, get_method, methods_with, setting_owners
from ..results import average_forgetting, mean_std
from . import config as C
from .interrupts import NOTHING_WRITTEN, WRITING, interrupts_not_lost
from . import presets as P
from .preflight import check_resume_checkpoint
from .options import (PROG, Parser, add_config_flag, add_field_flags, check_launch, config_file_values, fail,
                      first_pass, help_defaults, overrides_from)

METRICS = ("A_last", "A_avg", "forgetting", "trainable_params", "train_time_s", "peak_memory_mb")
METRIC_HEADERS = {
    "A_last": "A_last (%)",
    "A_avg": "A_avg (%)",
    "forgetting": "Forgetting (%)",
    "trainable_params": "Trainable params",
    "train_time_s": "Train time (s)",
    "peak_memory_mb": "Peak memory (MiB)",
}
DEFAULT_PRESET = "synthetic_smoke"


# --------------------------------------------------------------------------------------------------- table
def run_metrics(result: dict[str, Any]) -> dict[str, Optional[float]]:
    """A_last, A_avg, forgetting and the costs of one seed's result (``results.json``'s ``seeds`` entry).

    A joint run is evaluated once, after all data: it has an A_last but no A_avg or forgetting."""
    joint = bool(result.get("joint", False))
    return {
        "A_last": float(result["A_last"]),
        "A_avg": None if joint else float(result["A_avg"]),
        "forgetting": None if joint else average_forgetting(result["accuracy_matrix"]),
        "trainable_params": float(max(result.get("trainable_params") or [0])),
        "train_time_s": float(sum(result.get("train_time_s") or [0.0])),
        "peak_memory_mb": float(result.get("peak_memory_mb", 0.0)),
    }


def aggregate_rows(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in the given order): mean and std of every metric over its seeds, the mean A_t curve,
    or the reason when it could not run. ``runs``: ``{"method", "label", "status", "reason", "results"}``."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"method": run["method"], "label": run["label"], "status": run["status"],
                               "reason": run.get("reason"), "seeds": []}
        seeds = (run.get("results") or {}).get("seeds") or []
        if run["status"] == "ok" and seeds:
            per_seed = [run_metrics(r) for r in seeds]
            row["seeds"] = [r["seed"] for r in seeds]
            for metric in METRICS:
                values = [m[metric] for m in per_seed if m[metric] is not None]
                row[metric] = mean_std(values) if values else None
            curves = [r["A_t"] for r in seeds]
            row["A_t"] = [mean_std([c[t] for c in curves])["mean"] for t in range(len(curves[0]))]
            row["memory_kind"] = seeds[0].get("memory_kind")
        rows.append(row)
    return rows


def _cell(stat: Optional[dict], metric: str, show_std: bool) -> str:
    if stat is None:
        return "—"
    if metric == "trainable_params":
        return f"{stat['mean']:,.0f}"
    digits = 0 if metric in ("train_time_s", "peak_memory_mb") else 2
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if show_std and stat["std"] is not None else "")


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table in markdown; methods that could not run say why instead of disappearing."""
    header = ["Method", "Seeds"] + [METRIC_HEADERS[m] for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            reason = (row["reason"] or "").replace("|", "/").replace("\n", " ")
            lines.append(f"| {row['label']} | — | {row['status']}: {reason} |" + " |" * (len(METRICS) - 1))
            continue
        show_std = len(row["seeds"]) > 1
        cells = [_cell(row[m], m, show_std and m != "trainable_params") for m in METRICS]
        lines.append(f"| {row['label']} | {','.join(str(s) for s in row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """A_t after each experience for every method (joint training: a dashed line at its final accuracy)."""
    from ..results import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10.0, 5.0))
    ax.set_prop_cycle(color=plt.get_cmap("tab10").colors)
    num_steps = max((len(r["A_t"]) for r in rows if r["status"] == "ok"), default=1)
    for row in rows:
        if row["status"] != "ok":
            continue
        curve = row["A_t"]
        if len(curve) == 1 and num_steps > 1:
            ax.axhline(curve[0], linestyle="--", color="black", label=f"{row['label']} (final)")
        else:
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=row["label"])
    ax.set_xlabel("experiences learned (t)")
    ax.set_ylabel("A_t: accuracy on all seen classes (%)")
    ax.set_xticks(range(1, num_steps + 1))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    if any(row["status"] == "ok" for row in rows):  # no legend (and no matplotlib warning) for an empty plot
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- running
def compare_parser(defaults: dict) -> Parser:
    parser = Parser(prog=f"{PROG} compare", description=__doc__.split("\n\n")[0],
                    usage="%(prog)s --out DIR [--methods NAME ...] [--preset NAME|FILE] [--KEY VALUE ...]")
    parser.add_argument("--methods", nargs="+", default=list(P.list_method_presets()), metavar="METHOD",
                        help=f"methods to run, in table order (default: all: {' '.join(P.list_method_presets())})")
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help=f"preset giving the stream, backbone and budget (default: {DEFAULT_PRESET})")
    add_config_flag(parser)
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                        help="run every method in a fresh process (default: on)")
    add_field_flags(parser, defaults, skip=("method",))
    return parser


def method_configs(argv: Sequence[str]) -> tuple[Any, dict[str, dict]]:
    """Parse ``compare``'s arguments; one validated config per method, each writing into ``OUT/<method>``."""
    first = first_pass(argv, DEFAULT_PRESET)
    file_values = config_file_values(first)
    if "method" in file_values:
        raise C.ConfigError(f"config file {first.config} names a method ({file_values['method']}), but compare runs "
                            "the methods of --methods: drop method from the file")
    preset = first.preset or file_values.get("preset") or DEFAULT_PRESET
    args = compare_parser(help_defaults(preset, None, file_values)).parse_args(list(argv))
    overrides = overrides_from(args)
    out = overrides.get("out") or file_values.get("out")
    if not out:
        raise C.ConfigError("compare needs --out: the folder for every method's run and the table")
    unknown = [m for m in args.methods if m not in P.list_method_presets()]
    if unknown or not args.methods:
        raise C.ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(P.list_method_presets())}")
    if len(set(args.methods)) != len(args.methods):
        raise C.ConfigError(f"--methods names a method twice: {args.methods}")
    if "demo" in overrides or file_values.get("demo"):
        raise C.ConfigError("compare runs a preset's stream (default synthetic_smoke, offline); --demo is for run")
    out = Path(out).expanduser()
    export_value = overrides.get("export") or file_values.get("export")
    export = Path(export_value).expanduser() if export_value else None
    if export is not None and export.exists() and not export.is_dir():
        raise C.ConfigError(f"--export {export} is a file; give a folder (each method's exports go to "
                            f"{export}/<method>/)")
    if export is not None and not any(get_method(m).has(EXPORT) for m in args.methods):
        raise C.ConfigError(f"--export applies to {', '.join(methods_with(EXPORT))}, none of which is in --methods: "
                            "drop --export or add one of them")
    check_some_method_reads(overrides, args.methods)
    configs = {}
    for method in args.methods:
        method_overrides = {**overrides, "out": str(out / method)}
        if export is not None:
            # one folder per method: the same seed<N>/after_exp<t>/ names of two methods must not replace each other
            method_overrides["export"] = str(export / method) if get_method(method).has(EXPORT) else None
        configs[method] = P.layered_config(preset, method, method_overrides, file_values)
    return args, configs


def check_some_method_reads(overrides: dict, methods: Sequence[str]) -> None:
    """A method's own setting on the command line that no method of ``methods`` reads would do nothing: refused in
    one line, as ``run`` refuses it (each method still takes only the settings it reads)."""
    foreign: dict[str, list] = {}
    for key in sorted(set(overrides) & set(C.FIELD_BY_NAME)):
        owners = setting_owners(key)
        if owners is not None and not set(owners) & set(methods):
            foreign.setdefault(", ".join(owners), []).append(C.FIELD_BY_NAME[key].flag)
    if len(foreign) == 1:
        (owners, flags), = foreign.items()
        raise C.ConfigError(f"{', '.join(flags)} appl{'ies' if len(flags) == 1 else 'y'} to {owners}, none of which "
                            f"is in --methods: drop {'it' if len(flags) == 1 else 'them'} or add one of them")
    if foreign:
        each = "; ".join(f"{', '.join(flags)}: {owners}" for owners, flags in foreign.items())
        raise C.ConfigError(f"these settings apply to no method of --methods ({each}): drop them or add a method "
                            "that reads them")


def _run_isolated(config: dict, out: Path) -> tuple[int, str]:
    """``inflora-avalanche run`` on ``config`` (written as a preset file) in a fresh process; (exit code, last
    error line).

    The child runs in its own process group, so that a Ctrl-C at the terminal reaches only this process, which
    passes it on once (two deliveries could interrupt the child while it takes back what it wrote) and waits for it:
    what the child kept is then on disk for this process's one line."""
    import signal

    method = config["method"]
    preset_file = out / "configs" / f"{method}.json"
    preset_file.parent.mkdir(parents=True, exist_ok=True)
    # With its "preset" kept: otherwise the run records the file's name (the method) as its preset, and a later
    # `compare --resume --no-isolate` is refused as a run of another preset.
    preset_file.write_text(json.dumps(config, indent=1))
    command = [sys.executable, "-m", "inflora_avalanche", "run", "--preset", str(preset_file)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, process_group=0)
    try:
        _, err = proc.communicate()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.communicate()  # the child takes back what it wrote before its first checkpoint, or keeps the checkpoint
        raise
    sys.stderr.write(err)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    return proc.returncode, (errors or lines or [""])[-1]


def _run_here(config: dict) -> tuple[int, str]:
    from .loop import run_experiment
    from .parallel import one_line, user_errors

    try:
        run_experiment(config)
    except user_errors() as err:
        return 2, one_line(err)
    except Exception as err:  # one failing method must not lose the others' results
        return 1, f"{type(err).__name__}: {one_line(err)}"
    return 0, ""


def compare_main(argv: Sequence[str]) -> int:
    """``compare``: the exit code (2 for user errors, 1 when a method crashed or none ran, 130 on Ctrl-C)."""
    try:
        with interrupts_not_lost(exit_if_nothing_written=True):
            return _compare(argv)
    except KeyboardInterrupt as stop:  # Ctrl-C at any point: one line, no traceback
        note = getattr(stop, "inflora_note", None) or NOTHING_WRITTEN
        sys.stderr.write(f"interrupted {note}\n")
        sys.stderr.flush()
        return 130


def _has_entries(folder: Path) -> bool:
    from .output import LOCK_NAME

    return folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir())


def check_output(out: Path, configs: dict[str, dict]) -> None:
    """Before anything runs: ``out`` is writable and no other comparison writes into it, holds no comparison or
    method run unless ``--resume``/``--overwrite``, and every method's run and export folder passes the runner's
    own checks (so that no method is refused after others have run)."""
    from .output import OutputLock, _check_folder, check_export_dir, prepare_output_dir

    first = next(iter(configs.values()))
    _check_folder(out, "--out")
    OutputLock(out).check_free()
    for name in ("comparison.md", "comparison.json"):
        if (out / name).exists() and not (first["overwrite"] or first["resume"]):
            raise C.ConfigError(f"{out} already holds a comparison ({name}); choose another --out, pass --resume to "
                                "finish it or --overwrite to run it anew")
    if not (first["overwrite"] or first["resume"]):
        taken = [m for m, c in configs.items() if _has_entries(Path(c["out"]))]
        if taken:
            raise C.ConfigError(f"{out} already holds runs of {', '.join(taken)}; choose another --out, pass --resume "
                                "to finish them or --overwrite to run them anew")
    for config in configs.values():
        prepare_output_dir(config)
        check_export_dir(config)


def check_data(config: dict) -> None:
    """Before any method runs: the device exists and the stream every method reads builds, with readable images
    (one line, exit 2). Otherwise each method would fail the same way and the table be written as all n/a."""
    from . import build as B
    from .parallel import one_line, user_errors

    try:
        B.check_environment(config)
        _, info = B.build_stream(config, None)
        B.check_stream(config, info)
    except user_errors() as err:
        fail(one_line(err))


def _compare(argv: Sequence[str]) -> int:
    try:
        args, configs = method_configs(argv)
        finished = set()
        for method, config in configs.items():
            check_launch(config)
            # before any method runs: a --resume that one of them would refuse must not rewrite the table; a
            # finished method keeps its results as they are (not run again)
            if check_resume_checkpoint(config, Path(config["out"]).expanduser(), suggest_config=False,
                                       finished_ok=True):
                finished.add(method)
        first = next(iter(configs.values()))
        out = Path(first["out"]).parent
        if finished == set(configs) and (out / "comparison.json").is_file():
            raise C.ConfigError(f"the comparison in {out} is finished (every method of --methods has its results): "
                                f"its table is {out / 'comparison.md'}; nothing to resume")
        check_output(out, configs)
    except C.ConfigError as err:
        fail(str(err))
    check_data(first)
    from .output import OutputLock, make_folders, missing_folders, release_output

    missing = missing_folders(out)  # --out and its parents that this comparison makes
    before = {p.name for p in out.iterdir()} if out.is_dir() else set()
    lock = OutputLock(out)
    runs: list[dict] = []
    current: Optional[str] = None
    discard = False
    WRITING.set()
    try:
        make_folders(missing)
        lock.acquire()
        if lock.stale_note:
            print(lock.stale_note, flush=True)
        for method, config in configs.items():
            label = P.method_label(method)
            print(f"== {label} ({method}) -> {config['out']}", flush=True)
            current = method
            if method in finished:
                print("   finished before: its results are kept as they are", flush=True)
                code, reason = 0, ""
            else:
                code, reason = _run_isolated(config, out) if args.isolate else _run_here(config)
            current = None
            results_path = Path(config["out"]) / "results.json"
            results = json.loads(results_path.read_text()) if code == 0 and results_path.is_file() else None
            status = "ok" if results else ("n/a" if code == 2 else "error")
            if status != "ok":
                print(f"   {status}: {reason}", flush=True)
            runs.append({"method": method, "label": label, "status": status, "reason": reason or None,
                         "results": results})
        rows = aggregate_rows(runs)
        write_comparison(out, rows, runs, first, argv, isolated=args.isolate)
    except C.ConfigError as err:  # the lock was taken by a comparison that started at the same moment
        discard = True
        fail(str(err))
    except KeyboardInterrupt as stop:
        kept = [m for m, c in configs.items() if _has_entries(Path(c["out"]))]
        discard = not kept and not first["resume"]
        stop.inflora_note = _interrupt_note(  # type: ignore[attr-defined]  (read by compare_main)
            out, configs, runs, current, kept, out in missing)
        raise
    finally:
        release_output(out, lock, before, missing, discard)
        WRITING.clear()
    # not applicable (e.g. b5 on a shallow backbone) is a result of the table; a crash or nothing run is a failure
    failed = [r["method"] for r in runs if r["status"] == "error"]
    if failed or not any(r["status"] == "ok" for r in runs):
        problems = "; ".join(f"{r['method']} {r['status']}: {r['reason']}" for r in runs if r["status"] != "ok")
        sys.stderr.write(f"error: not every method ran ({problems}); the table says which\n")
        return 1
    return 0


def _interrupt_note(out: Path, configs: dict, runs: list, current: Optional[str], kept: list, made_out: bool) -> str:
    """What an interrupted comparison kept, for its one line (after "interrupted "): read from the method folders,
    where each interrupted run has taken back what it wrote or kept its checkpoint."""
    from .resume import CHECKPOINT_NAME

    where = f"during {current}" if current else ("before the first method" if not runs else "between methods")
    if not kept:
        return (f"{where}, before any method had finished an experience: nothing to resume, so "
                + (f"{out} was removed again" if made_out else f"what the comparison had added to {out} was removed"))
    finished = [r["method"] for r in runs if r["status"] == "ok"]
    parts = []
    if finished:
        parts.append(f"the results of {', '.join(finished)}")
    if current and current in kept:
        parts.append(f"{current}'s checkpoint after its last finished experience"
                     if (Path(configs[current]["out"]) / CHECKPOINT_NAME).exists() else f"{current}'s logs")
    others = [m for m in kept if m not in finished and m != current]
    if others:
        parts.append(f"the runs of {', '.join(others)}")
    return (f"{where}; kept in {out}: {'; '.join(parts)}; pass --resume with the same --out to finish the comparison "
            "(finished methods are not trained again)")


def machine_description(config: dict) -> str:
    import torch

    device = config["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    threads = config["cpu_threads"] or torch.get_num_threads()
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, {threads} torch "
            f"thread(s) per run, torch {torch.__version__}")


def write_comparison(out: Path, rows: list, runs: list, config: dict, argv: Sequence[str], isolated: bool = True
                     ) -> None:
    from .output import write_json

    command = f"{PROG} compare " + " ".join(shlex.quote(a) for a in argv)
    table = to_markdown(rows)
    shared = {k: config[k] for k in C.FIELD_BY_NAME if k not in C.METHOD_KEYS and k not in ("out", "method")}
    stream = (f"{config['benchmark']} ({config['data_root'] or 'no data folder'}), {config['n_experiences']} "
              f"experiences, {config['resolution']} px; backbone {config['backbone']}"
              + (f" ({config['weights']})" if config["weights"] else ""))
    memory_kind = next((r.get("memory_kind") for r in rows if r.get("memory_kind")), "")
    write_json(out / "comparison.json", {
        "command": command, "machine": machine_description(config), "stream": stream, "settings": shared,
        "rows": rows, "runs": [{k: v for k, v in r.items() if k != "results"} for r in runs],
    })
    (out / "comparison.md").write_text(
        f"# Method comparison\n\nCommand: `{command}`\n\nMachine: {machine_description(config)}\n\nStream: {stream}; "
        f"{config['epochs']} epoch(s), batch {config['batch_size']}, learning rates x{config['lr_scale']:g}, "
        f"precision {config['precision']}; seeds {', '.join(map(str, config['seeds']))}. Mean ± sample std over "
        f"seeds. Peak memory: {memory_kind}"
        + ("" if isolated else " (--no-isolate: all methods in one process, so a method's peak is hidden by the "
                                "memory its predecessors left; compare peaks only from isolated runs)")
        + f". Trainable params: tensors updated in one experience. Each method's own results are in its "
        f"folder.\n\n{table}")
    plot_curves(rows, out / "curves.png", title=stream)
    print(table)
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'curves.png'}")
