"""The one training loop of every method: seeds x experiences, evaluation on all seen test experiences after each,
checkpoints for resume, exports, results files.

    config = layered_config("cifar100_inflora", overrides={"epochs": 1})
    results = run_experiment(config)          # writes results.json, summary.txt, plots into config["out"]
"""

from __future__ import annotations

import copy
import gc
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .. import distributed as ddp
from ..io import atomic_write_text
from ..checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..methods import DIAGNOSTICS, JOINT, get_method
from ..backbone import WeightsUnavailableError
from ..results import aggregate, format_summary, joint_result, seed_result
from ..streams import StreamInfo
from . import build as B
from .config import check_one_class_experiences, validate_config
from .metrics import (FiniteLossGuard, NonFiniteLossError, UpdatedParameterCounter, experience_accuracies,
                      metric_value, peak_memory_mb, reset_peak_memory)
from .output import (OutputLock, check_export_dir, export_experience, make_folders, missing_folders,
                     prepare_output_dir, release_output, write_json, write_results)
from .parallel import on_all, on_main, user_errors
from .preflight import check_resume_checkpoint
from ..strategy_state import load_strategy_state, strategy_state
from .settings_file import config_file_text
from .resume import CHECKPOINT_NAME, STREAM_KEYS, backbone_fingerprint, check_resume, with_schema_defaults

DEMO_BANNER = (
    "DEMO: scikit-learn's 8x8 digits (10 classes) on a tiny random-init ViT, on the CPU. It runs the "
    "same code as the benchmarks to check the installation; its numbers are NOT the benchmark's."
)
ExperienceCallback = Callable[[int, Any, dict], None]
#: Set while a run may have something in its output folder to take back on an interrupt (read by the command line:
#: before that, a Ctrl-C can end the process at once).
WRITING = threading.Event()


def _fixed_order(experience: Any, seed: int, t: int) -> Any:
    """A copy of ``experience`` whose training data is permuted once (seeded by ``seed`` and ``t``); loaded without
    shuffling it gives the same global batches in one process and under ``torchrun`` (DistributedSampler shards)."""
    generator = torch.Generator().manual_seed(1_000_003 * seed + t)
    order = torch.randperm(len(experience.dataset), generator=generator).tolist()
    experience = copy.copy(experience)
    experience.dataset = experience.dataset.subset(order)
    return experience


def standard_plugins(config: dict, seed_dir: Optional[Path]) -> list:
    """Plugins every run gets from its config: the subspace diagnostics (methods that have them, unless switched
    off)."""
    if not config["diagnostics"] or not get_method(config["method"]).has(DIAGNOSTICS):
        return []
    from ..diagnostics import SubspaceDiagnosticsPlugin

    out = seed_dir / "diagnostics" if seed_dir is not None and ddp.is_main_process() else None
    return [SubspaceDiagnosticsPlugin(out_dir=out, overwrite=bool(config["resume"] or config["overwrite"]))]


def run_seed(
    config: dict,
    seed: int,
    bench: Any,
    info: StreamInfo,
    seed_dir: Optional[Path] = None,
    extra_plugins: Iterable[Any] = (),
    on_experience_end: Optional[ExperienceCallback] = None,
    log: Callable[[str], None] = print,
    resume: Optional[dict] = None,
) -> dict:
    """Train ``config["method"]`` on ``bench``'s experiences with one seed; after each, evaluate on every seen test
    experience (a joint method trains on all of them at once and is evaluated once).

    Returns :func:`results.seed_result`'s dict (also written to ``seed_dir/metrics.json`` after every experience).
    ``on_experience_end(t, strategy, partial_result)`` runs after experience ``t`` (e.g. to save a checkpoint).
    ``resume``: a checkpoint's seed state (``{"result", "strategy", "rng", "fingerprint"}``) to continue from; the
    experiences it holds are skipped.
    """
    method = get_method(config["method"])
    joint = method.has(JOINT)
    device = B.resolve_device(config)
    gc.collect()
    memory_baseline = reset_peak_memory(device)
    B.set_seed(seed)
    model = method.make_model(config, info)
    fingerprint = backbone_fingerprint(model)
    if resume is not None and resume["fingerprint"] != fingerprint:
        raise CheckpointError("the backbone weights differ from those the checkpoint was trained on; resume with the "
                              "same --weights / backbone, or start a new --out")
    evaluator, loggers = B.build_evaluator(config, seed_dir if ddp.is_main_process() else None,
                                           resume=resume is not None)
    guard = FiniteLossGuard(seed=seed)
    counter = UpdatedParameterCounter()
    strategy = method.make_strategy(config, model, info, evaluator, [*extra_plugins, guard, counter], device, seed)
    strategy.backbone_fingerprint = fingerprint
    loader = B.loader_kwargs(config, device)
    fixed_order = config["train_shuffle"] == "fixed"
    train_loader = {**loader, "shuffle": config["train_shuffle"] == "true"}
    test_sizes = [len(exp.dataset) for exp in bench.test_stream]
    T = len(bench.train_stream)
    steps = [bench.train_stream] if joint else list(bench.train_stream)
    matrix: list[list[Optional[float]]] = []
    ta_matrix: list[list[Optional[float]]] = []
    extra: dict[str, list] = {"train_time_s": [], "eval_time_s": [], "avalanche_stream_accuracy": [],
                              "avalanche_stream_forgetting": [], "trainable_params": []}
    result: dict = {}
    done = 0
    previous_runtime = 0.0
    if resume is not None:
        result = resume["result"]
        done = int(result["experiences_done"])
        matrix = [list(row) for row in result["accuracy_matrix"]]
        ta_matrix = [list(row) for row in result["task_aware_matrix"]]
        extra = {key: list(result.get(key, [])) for key in extra}
        previous_runtime = float(result.get("runtime_s", 0.0))
        load_strategy_state(strategy, resume["strategy"])
        set_rng_state(resume["rng"])
        log(f"[seed {seed}] resuming after experience {done}/{len(steps)}")
    started = time.perf_counter()
    try:
        for t, experience in enumerate(steps):
            if t < done:
                continue
            if fixed_order and not joint:
                experience = _fixed_order(experience, seed, t)
            t0 = time.perf_counter()
            strategy.train(experience, **train_loader)
            t1 = time.perf_counter()
            seen = T if joint else t + 1
            metrics = strategy.eval(bench.test_stream[:seen], **loader)
            t2 = time.perf_counter()
            acc, task_aware = experience_accuracies(metrics)
            missing = [j for j in range(seen) if j not in acc or j not in task_aware]
            if missing:
                raise RuntimeError(f"evaluation produced no accuracy for test experiences {missing}")
            pad = [None] * (T - seen if joint else T - t - 1)
            matrix.append([100.0 * acc[j] for j in range(seen)] + pad)
            ta_matrix.append([100.0 * task_aware[j] for j in range(seen)] + pad)
            extra["train_time_s"].append(t1 - t0)
            extra["eval_time_s"].append(t2 - t1)
            extra["avalanche_stream_accuracy"].append(100.0 * metric_value(metrics, "Top1_Acc_Stream/eval_phase/test_stream"))
            extra["avalanche_stream_forgetting"].append(100.0 * metric_value(metrics, "StreamForgetting/eval_phase/test_stream"))
            extra["trainable_params"].append(counter.per_experience[-1] if counter.per_experience else 0)
            peak, memory_kind = peak_memory_mb(device)
            summary = joint_result if joint else seed_result
            result = summary(matrix, test_sizes, ta_matrix, seed=seed, experiences_done=t + 1,
                             runtime_s=previous_runtime + time.perf_counter() - started, **extra,
                             peak_memory_mb=max(0.0, peak - memory_baseline), memory_kind=memory_kind)
            if seed_dir is not None and ddp.is_main_process():
                write_json(seed_dir / "metrics.json", result)
            log(f"[seed {seed}] " + ("joint training on all experiences" if joint else
                                     f"experience {t + 1}/{T}") +
                f": A_t {result['A_t'][-1]:.2f}%  task-aware {result['task_aware_A_t'][-1]:.2f}%  "
                f"(train {t1 - t0:.1f} s, eval {t2 - t1:.1f} s)")
            if on_experience_end is not None:
                on_experience_end(t, strategy, result)
    finally:
        for logger in loggers:
            close = getattr(logger, "close", None)
            if callable(close):
                close()
            stream = getattr(logger, "file", None)
            if stream is not None and stream not in (sys.stdout, sys.stderr):
                stream.close()
    return result


def settings_by_experience(changes: list[dict], config: dict, seed_index: int, experiences: int) -> dict:
    """``{key: [the value experience 1, 2, ... of seed number seed_index trained with]}`` for every setting a resume
    with ``--resume-with-changes`` changed; ``changes``: the checkpoint's record, oldest first, each
    ``{"seed_index", "experiences_done", "changed": {key: [before, after]}}``."""
    values: dict[str, list] = {}
    for key in sorted({k for change in changes for k in change["changed"]}):
        column = []
        for t in range(experiences):
            # the first change made after this experience was trained holds the value it was trained with
            later = [c for c in changes if key in c["changed"]
                     and (seed_index, t) < (c["seed_index"], c["experiences_done"])]
            column.append(later[0]["changed"][key][0] if later else config[key])
        values[key] = column
    return values


def assemble_results(config: dict, info: StreamInfo, seed_results: list[dict], runtime_s: float,
                     changes: Optional[list] = None) -> dict:
    """The content of ``results.json``. ``changes``: the settings changed on resume (``settings_changes``); then
    every seed's entry says which values each experience was trained with (``settings_by_experience``), since
    ``config`` holds only the latest."""
    from .presets import method_label

    if changes:
        seed_results = [{**result, "settings_by_experience": settings_by_experience(
            changes, config, index, len(result["accuracy_matrix"]))} for index, result in enumerate(seed_results)]
    extra = {"settings_changes": changes} if changes else {}
    return {
        "preset": config.get("preset"),
        "method": config["method"],
        "method_label": method_label(config["method"]),
        "demo": bool(config["demo"]),
        "config": config,
        "benchmark": info.to_dict(),
        "published": config["published"],
        "seeds": seed_results,
        "aggregate": aggregate(seed_results),
        "runtime_s": runtime_s,
        "device": B.resolve_device(config),
        "torch_threads": torch.get_num_threads(),
        "world_size": ddp.world_size(),
        **extra,
    }


def _prepare(config: dict) -> tuple[str, bool]:
    """Everything checked before anything is written: output and export folders, weights, model structure."""
    out = prepare_output_dir(config)
    B.check_environment(config)
    if config["pretrained"] and not config["weights"]:
        problem = B.pretrained_weights_problem(config["backbone"])
        if problem:
            raise WeightsUnavailableError(problem)
    B.check_model(config)
    check_export_dir(config)
    check_resume_checkpoint(config, out)  # also from Python: a finished run is refused, not rewritten
    return str(out), (out / CHECKPOINT_NAME).is_file()


def run_experiment(
    config: dict,
    extra_plugins: Callable[[int], Iterable[Any]] = lambda seed: (),
    on_experience_end: Optional[Callable[[int, int, Any, dict], None]] = None,
    log: Callable[[str], None] = print,
    preset_source: Optional[str] = None,
) -> dict:
    """Run every seed of ``config`` and write the results; returns the content of ``results.json``.

    ``extra_plugins(seed)`` gives additional plugins for a seed's strategy; ``on_experience_end(seed, t, strategy,
    partial)`` runs after each experience. After every experience the run's state goes to ``<out>/checkpoint.safetensors``
    (atomically); with ``resume`` the run continues from it. Under ``torch.distributed`` only rank 0 logs and writes.
    ``preset_source``: the preset its written ``config.yaml`` names (default: ``config["preset"]``).
    """
    validate_config(config)
    main_process = ddp.is_main_process()
    if not main_process:
        log = lambda *_: None  # noqa: E731
    out_str, has_checkpoint = on_main(lambda: _prepare(config))
    out_dir = Path(out_str)
    if config["demo"]:
        log(DEMO_BANNER)
    if config["cpu_threads"]:
        torch.set_num_threads(config["cpu_threads"])
    B.set_determinism(config)
    lock = OutputLock(out_dir)
    # Known before anything is made, so that an interrupt at any point can take back exactly what this run made.
    missing = missing_folders(out_dir) if main_process else []  # --out and its parents that this run makes
    before = {p.name for p in out_dir.iterdir()} if main_process and out_dir.is_dir() else set()

    def take_lock() -> None:
        make_folders(missing)
        lock.acquire()

    discard = False
    if main_process:
        WRITING.set()
    try:
        on_main(take_lock)
        if lock.stale_note:
            log(lock.stale_note)
        bench, info = on_all(lambda: B.build_stream(config, out_dir if main_process else None))
        on_main(lambda: B.check_stream(config, info))
        check_one_class_experiences(config, info.num_classes)  # the method's rule, once the class count is known
        return _run_seeds({**config, "out": str(out_dir)}, bench, info, out_dir, has_checkpoint, extra_plugins,
                          on_experience_end, log, preset_source or config.get("preset"))
    except BaseException as err:
        # Stopped by the user or by a user error before the first checkpoint: nothing can be resumed, so what the
        # run wrote is taken back (the split manifest, config.json, logs of a partial experience) and --out is as
        # before; the same command then runs again without --overwrite. A crash or a non-finite loss keeps its logs.
        checkpoint = out_dir / CHECKPOINT_NAME
        discard = main_process and isinstance(err, (KeyboardInterrupt, *user_errors())) and not checkpoint.exists()
        if isinstance(err, KeyboardInterrupt):
            made = any(folder.exists() for folder in missing)
            err.inflora_note = (  # type: ignore[attr-defined]  (read by the command line)
                f"after the last finished experience; pass --resume with the same --out to continue from {checkpoint}"
                if checkpoint.exists() else
                f"before the first experience finished: nothing to resume, so {out_dir} was removed again"
                if made and out_dir in missing else
                f"before the first experience finished: nothing to resume, so what it had added to {out_dir} was "
                "removed" if lock.held else
                "before anything was written")
        raise
    finally:
        if main_process:
            release_output(out_dir, lock, before, missing, discard)
            WRITING.clear()


def _run_seeds(config: dict, bench: Any, info: StreamInfo, out_dir: Path, has_checkpoint: bool,
               extra_plugins: Callable[[int], Iterable[Any]], on_experience_end: Optional[Callable],
               log: Callable[[str], None], preset_source: Optional[str] = None) -> dict:
    """Every seed of ``config`` in ``out_dir`` (locked), from the checkpoint on with ``resume``."""
    main_process = ddp.is_main_process()
    ckpt_path = out_dir / CHECKPOINT_NAME
    checkpoint: Optional[dict] = None
    if config["resume"] and has_checkpoint:
        checkpoint = on_all(lambda: load_checkpoint(ckpt_path))
        # a setting added to the schema after the checkpoint was written ran with its default then
        checkpoint["config"] = with_schema_defaults(checkpoint["config"])
        changed = on_all(lambda: check_resume(config, info, checkpoint, ckpt_path))
        log(f"resuming from {ckpt_path}: seed {checkpoint['seed']}, {checkpoint['experiences_done']} of "
            f"{info.n_experiences} experiences done")
        changes = list(checkpoint.get("settings_changes") or [])
        if changed:  # --resume-with-changes
            changes.append({"seed_index": checkpoint["seed_index"], "seed": checkpoint["seed"],
                            "experiences_done": checkpoint["experiences_done"],
                            "changed": {k: [a, b] for k, (a, b) in changed.items()}})
            log("resuming with changed settings (results.json records which experiences used which): "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    elif config["resume"]:
        log(f"--resume: no checkpoint in {out_dir}; starting from the first experience")
    if checkpoint is None:
        changes = []
    if main_process:
        if checkpoint is None and ckpt_path.exists():
            ckpt_path.unlink()  # --overwrite: a stale checkpoint must not be resumed later
        name = "config" if checkpoint is None else "config_resumed"
        write_json(out_dir / f"{name}.json", config)
        atomic_write_text(out_dir / f"{name}.yaml", config_file_text(config, preset_source or config["preset"]))
    log(f"{config['method']} on {info.name}: {info.num_classes} classes, {info.n_experiences} experiences, "
        f"{info.train_size} train / {info.test_size} test images; seeds {config['seeds']}; device "
        f"{B.resolve_device(config)}; {ddp.world_size()} process(es); results in {out_dir}")
    started = time.perf_counter()
    seed_results: list[dict] = list(checkpoint["completed"]) if checkpoint else []
    previous_runtime = float(checkpoint.get("runtime_s", 0.0)) if checkpoint else 0.0
    steps = 1 if get_method(config["method"]).has(JOINT) else info.n_experiences
    results: dict = {}
    for index, seed in enumerate(config["seeds"]):
        resume_state = None
        if checkpoint is not None and index < checkpoint["seed_index"]:
            continue  # finished before the checkpoint; its result is in seed_results
        if checkpoint is not None and index == checkpoint["seed_index"]:
            resume_state = checkpoint
            if checkpoint["experiences_done"] >= steps:
                seed_results.append(checkpoint["result"])
                results = assemble_results(config, info, seed_results, previous_runtime, changes)
                if main_process:
                    write_results(results, out_dir)
                continue
        seed_dir = out_dir / f"seed{seed}"

        def end_of_experience(t: int, strategy: Any, partial: dict, _seed: int = seed, _index: int = index) -> None:
            if main_process:
                save_checkpoint(ckpt_path, {
                    "config": config, "stream": {k: v for k, v in info.to_dict().items() if k in STREAM_KEYS},
                    "seed_index": _index, "seed": _seed, "experiences_done": t + 1, "completed": seed_results,
                    "result": partial, "strategy": strategy_state(strategy), "rng": rng_state(),
                    "fingerprint": strategy.backbone_fingerprint,
                    "runtime_s": previous_runtime + time.perf_counter() - started, "settings_changes": changes,
                })
            if main_process and config["export"]:
                export_experience(config, info, strategy, _seed, t)
            if on_experience_end is not None:
                on_experience_end(_seed, t, strategy, partial)

        try:
            plugins = [*standard_plugins(config, seed_dir), *extra_plugins(seed)]
            result = run_seed(config, seed, bench, info, seed_dir, plugins, end_of_experience, log,
                              resume=resume_state)
        except NonFiniteLossError as err:
            kept = (f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists()
                    else "no experience had finished, so there is no checkpoint")
            raise NonFiniteLossError(f"{err}; {kept}") from None
        seed_results.append(result)
        results = assemble_results(config, info, seed_results, previous_runtime + time.perf_counter() - started,
                                   changes)
        if main_process:
            write_results(results, out_dir)
    log("")
    log(format_summary(results).rstrip())
    log(f"\nresults: {out_dir / 'results.json'}, {out_dir / 'summary.txt'}, plots accuracy_curve.png and "
        "accuracy_matrix.png")
    if config["demo"]:
        log(DEMO_BANNER)
    return results
