"""Reliability: checkpoints and --resume (SIGKILL mid-run), determinism, refusing foreign checkpoints, one-line
errors with exit code 2 for every bad input, and stopping on a non-finite loss. See docs/reliability.md."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from avalanche.core import SupervisedPlugin

from conftest import start_at_once
from inflora_avalanche.run import build, cli, loop
from inflora_avalanche.run import config as C
from inflora_avalanche.run import presets as P
from inflora_avalanche.run.interrupts import interrupts_not_lost
from inflora_avalanche.run.resume import CHECKPOINT_NAME, check_resume
from inflora_avalanche.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "run_split_cifar.py"
DEMO_ARGS = ["--demo", "--no-progress", "--set", "epochs=2"]
TIMING_KEYS = ("train_time_s", "eval_time_s", "runtime_s", "peak_memory_mb")  # measured, not computed


def _metrics(results: dict) -> list[dict]:
    """Every seed's results without the wall-clock timings."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in results["seeds"]]


def _main(capsys, *argv, benchmark="split_cifar100"):
    threads = torch.get_num_threads()
    try:
        code = cli.run_main(list(argv), benchmark=benchmark)
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _one_line_error(code: int, err: str, *needles: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


class Stop(Exception):
    pass


def _stop_after(experiences: int):
    def callback(seed, t, strategy, partial):
        if t + 1 == experiences:
            raise Stop

    return callback


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """A demo run (1 epoch) stopped after its first experience: the folder holds a checkpoint and no results.json."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    config = P.layered_config(P.DEMO_PRESET, None, {"out": str(out), "epochs": 1, "progress": False})
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Stop):
            loop.run_experiment(config, on_experience_end=_stop_after(1), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return out


# --------------------------------------------------------------------------------------------------- resume
def test_sigkill_during_the_second_experience_then_resume_gives_the_same_metrics(tmp_path, capsys):
    """A subprocess is SIGKILLed once experience 1's checkpoint exists; ``--resume`` in a new subprocess finishes the
    run with exactly the metrics of an uninterrupted run (run in this process meanwhile)."""
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPT), *DEMO_ARGS, "--out", str(out)]
    stderr = open(tmp_path / "killed.err", "w")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    checkpoint = out / CHECKPOINT_NAME
    seen: dict = {}

    def kill_when_checkpointed() -> None:
        while proc.poll() is None:
            if checkpoint.exists():
                time.sleep(0.2)  # experience 2 is training now
                proc.send_signal(signal.SIGKILL)
                seen["killed"] = True
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_when_checkpointed)
    watcher.start()
    try:
        code, err = _main(capsys, *DEMO_ARGS, "--out", str(tmp_path / "uninterrupted"))
        assert code == 0, err
    finally:
        watcher.join(timeout=300)
        proc.wait(timeout=60)
        stderr.close()
    assert seen.get("killed") and proc.returncode == -signal.SIGKILL, (tmp_path / "killed.err").read_text()[-2000:]
    lock = out / ".inflora-run.lock"
    assert json.loads(lock.read_text())["pid"] == proc.pid  # the killed run could not release its lock
    state = load_checkpoint(checkpoint)
    assert state["experiences_done"] == 1 and state["seed"] == 0
    assert not (out / "results.json").exists()
    assert json.loads((out / "seed0" / "metrics.json").read_text())["experiences_done"] == 1
    log_before = (out / "seed0" / "log.txt").read_text()

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"a stale lock of a run that ended without releasing it (pid {proc.pid}) was taken over" in resumed.stdout
    assert "resuming after experience 1/5" in resumed.stdout and not lock.exists()
    expected = json.loads((tmp_path / "uninterrupted" / "results.json").read_text())
    got = json.loads((out / "results.json").read_text())
    assert _metrics(got) == _metrics(expected)  # to the last digit, Avalanche's forgetting metric included
    assert got["seeds"][0]["experiences_done"] == 5
    # nothing written before the crash was lost: the text log was appended to, the CSV logs went to a new folder
    assert (out / "seed0" / "log.txt").read_text().startswith(log_before)
    assert (out / "seed0" / "csv" / "eval_results.csv").is_file()
    assert (out / "seed0" / "csv_resume1" / "eval_results.csv").is_file()
    assert (out / "config.json").is_file() and (out / "config_resumed.json").is_file()


def test_same_seed_same_results_on_cpu(interrupted_run, tmp_path):
    """Determinism: a second run with the same seed and settings reproduces the first one's numbers exactly."""
    first = json.loads((interrupted_run / "seed0" / "metrics.json").read_text())
    config = P.layered_config(P.DEMO_PRESET, None, {"out": str(tmp_path / "again"), "epochs": 1, "progress": False})
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Stop):
            loop.run_experiment(config, on_experience_end=_stop_after(1), log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    again = json.loads((tmp_path / "again" / "seed0" / "metrics.json").read_text())
    for key in ("accuracy_matrix", "task_aware_matrix", "avalanche_stream_accuracy", "A_t"):
        assert again[key] == first[key], key
    a = load_checkpoint(interrupted_run / CHECKPOINT_NAME)["strategy"]["model"]
    b = load_checkpoint(tmp_path / "again" / CHECKPOINT_NAME)["strategy"]["model"]
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key


def test_checkpoint_holds_branches_heads_memory_and_rng(interrupted_run):
    state = load_checkpoint(interrupted_run / CHECKPOINT_NAME)
    model = state["strategy"]["model"]
    assert model["_extra_state"]["task_classes"] == [[0, 1]]
    assert model["heads.0.weight"].shape == (2, 64)
    assert model["backbone.blocks.0.attn.qkv.past_down"].shape == (8, 64)  # rank 8, one finished task
    assert not any(k.startswith("backbone.patch_embed") for k in model)  # the frozen backbone is not copied
    (subspace,) = [v for k, v in state["strategy"]["plugins"].items() if k.endswith("SubspaceUpdatePlugin")]
    basis = subspace["layers"]["blocks.0.attn.qkv"]["basis"]
    assert basis.dtype == torch.float64 and basis.shape[0] == 64 and basis.shape[1] > 0
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["result"]["experiences_done"] == 1 and state["completed"] == []
    # written atomically: no temporary file is left next to it
    assert [p.name for p in interrupted_run.iterdir() if "tmp" in p.name] == []


def test_checkpoint_format_round_trip_and_corruption(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "empty": torch.zeros(0, 4), "ints": {3: torch.ones(2), 7: 1.5},
             "tuple": (1, "x", None), "nested": [{"t": torch.tensor([True, False])}], "nan": float("nan")}
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert torch.equal(back["a"], state["a"]) and back["empty"].shape == (0, 4)
    assert set(back["ints"]) == {3, 7} and torch.equal(back["ints"][3], torch.ones(2)) and back["ints"][7] == 1.5
    assert back["tuple"] == (1, "x", None) and torch.equal(back["nested"][0]["t"], state["nested"][0]["t"])
    assert back["nan"] != back["nan"]
    path.write_bytes(path.read_bytes()[:50])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--preset", "{other}"], "preset='demo_digits' but this run has preset='other'"),
        (["--demo", "--set", "backbone=vit_small_patch16_224"], "backbone='vit_tiny_patch16_224'"),
        (["--demo", "--set", "rank=4"], "rank=8 but this run has rank=4"),
        (["--demo", "--set", "class_order=[1,0,2,3,4,5,6,7,8,9]"], "class_order=None"),
    ],
    ids=["preset", "backbone", "model", "stream"],
)
def test_resume_refuses_a_checkpoint_of_another_run(interrupted_run, tmp_path, capsys, argv, needle):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({k: v for k, v in P.load_preset(P.DEMO_PRESET).items() if k != "preset"}))
    argv = [a.replace("{other}", str(other)) for a in argv]
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    code, err = _main(capsys, *argv, "--set", "epochs=1", "--no-progress", "--out", str(run), "--resume")
    _one_line_error(code, err, needle, "--out")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*")) == before  # nothing touched


def test_resume_refuses_different_data(interrupted_run):
    """The stream's classes and sizes are checked too (e.g. a data folder whose content changed)."""
    config = P.layered_config(P.DEMO_PRESET, None, {"epochs": 1})
    state = load_checkpoint(interrupted_run / CHECKPOINT_NAME)
    _, info = build.build_stream(config)
    check_resume(config, info, state, interrupted_run)  # the same data: accepted
    info.train_size += 1
    with pytest.raises(CheckpointError, match="data stream differs .*train_size"):
        check_resume(config, info, state, interrupted_run)
    # other training settings (e.g. a lower learning rate after a divergence) only with --resume-with-changes
    with pytest.raises(CheckpointError, match="trained with other settings \\(--lr 0.01 there, 0.001 now\\)"):
        check_resume({**config, "lr": 0.001}, build.build_stream(config)[1], state, interrupted_run)
    assert check_resume({**config, "lr": 0.001, "resume_with_changes": True}, build.build_stream(config)[1], state,
                        interrupted_run) == {"lr": (0.01, 0.001)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A demo run (1 epoch, 2 experiences, seed 0) that finished: checkpoint and results.json."""
    out = tmp_path_factory.mktemp("finished") / "run"
    config = P.layered_config(P.DEMO_PRESET, None, {"out": str(out), "epochs": 1, "n_experiences": 2,
                                                     "progress": False})
    threads = torch.get_num_threads()
    try:
        loop.run_experiment(config, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return out


def _contents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def test_resume_of_a_finished_run_is_refused_and_rewrites_nothing(finished_run, tmp_path, capsys):
    """``--resume`` (and ``--resume-with-changes``, and ``-c <out>/config.yaml --resume``) on a run whose every seed
    and experience is done: one line saying where its results are; no file is rewritten or added (results.json
    kept its runtime and had no ``resume: true``; no config_resumed.*)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before, times = _contents(run), _tree(run)
    assert (run / CHECKPOINT_NAME).is_file() and (run / "results.json").is_file()
    demo = ["--demo", "--no-progress", "--set", "epochs=1", "--n-experiences", "2", "--out", str(run)]
    finished = (f"the run in {run} is finished (seeds [0], 2 of 2 experiences): its results are in "
                f"{run / 'results.json'}; nothing to resume")
    for argv in ([*demo, "--resume"], [*demo, "--resume-with-changes", "--lr", "0.001"],
                 ["-c", str(run / "config.yaml"), "--out", str(run), "--resume"]):  # its out: the fixture's
        code, err = _main(capsys, *argv)
        _one_line_error(code, err, finished)
        assert _contents(run) == before and _tree(run) == times, argv
    # from Python too
    config = P.layered_config(P.DEMO_PRESET, None, {"out": str(run), "epochs": 1, "n_experiences": 2,
                                                     "progress": False, "resume": True})
    with pytest.raises(C.ConfigError, match="is finished"):
        loop.run_experiment(config, log=lambda *_: None)
    assert _contents(run) == before and _tree(run) == times
    # a run stopped after its last checkpoint but before results.json was written is not finished: resume writes it
    (run / "results.json").unlink()
    code, err = _main(capsys, *demo, "--resume")
    assert code == 0, err
    assert json.loads((run / "results.json").read_text())["seeds"] == json.loads(before["results.json"])["seeds"]


def test_compare_resume_keeps_a_finished_method_and_refuses_a_finished_comparison(finished_run, tmp_path, capsys):
    """``compare --resume``: a method whose run is finished is not run again (its files unchanged); when every
    method is finished and the table is written, the comparison is refused as finished, nothing rewritten."""
    out = tmp_path / "cmp"
    shutil.copytree(finished_run, out / "inflora")
    before = _contents(out / "inflora")
    argv = ["compare", "--preset", P.DEMO_PRESET, "--methods", "inflora", "--epochs", "1", "--n-experiences", "2",
            "--no-progress", "--out", str(out), "--resume", "--no-isolate"]
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "finished before: its results are kept as they are" in captured.out
    assert _contents(out / "inflora") == before
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("inflora", "ok")]
    table = _contents(out)
    code = cli.main(argv)
    _one_line_error(code, capsys.readouterr().err.strip(), f"the comparison in {out} is finished", "nothing to resume")
    assert _contents(out) == table


def _tree(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.lstat().st_mtime_ns, p.lstat().st_size) for p in folder.rglob("*"))


def test_resume_with_changed_training_settings_is_refused_naming_them(interrupted_run, tmp_path, capsys):
    """Results must not claim settings earlier experiences never trained with: one line naming each changed setting
    with the checkpoint's and this run's value, and how to go on; nothing in the folder is touched."""
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    before = _tree(run)
    code, err = _main(capsys, "--demo", "--no-progress", "--set", "epochs=2", "--lr", "0.001", "--out", str(run),
                      "--resume")
    _one_line_error(code, err, "trained with other settings (--epochs 1 there, 2 now, --lr 0.01 there, 0.001 now)",
                    f"--config {run / 'config.yaml'} --resume", "another --out", "--resume-with-changes")
    assert _tree(run) == before


def test_resume_with_changes_records_the_settings_of_every_experience(interrupted_run, tmp_path, capsys):
    """``--resume-with-changes``: the later experiences train with the new settings; results.json keeps the config
    (the latest), lists the change and says per experience which values were used; experience 1 is not retrained."""
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    first = json.loads((run / "seed0" / "metrics.json").read_text())
    code, err = _main(capsys, "--demo", "--no-progress", "--set", "epochs=1", "--lr", "0.005", "--out", str(run),
                      "--resume-with-changes")
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["settings_changes"] == [{"seed_index": 0, "seed": 0, "experiences_done": 1,
                                            "changed": {"lr": [0.01, 0.005]}}]
    seed = results["seeds"][0]
    assert seed["settings_by_experience"] == {"lr": [0.01, 0.005, 0.005, 0.005, 0.005]}
    assert seed["accuracy_matrix"][0] == first["accuracy_matrix"][0]  # what was trained is kept as it was
    assert results["config"]["lr"] == 0.005 and json.loads((run / "config.json").read_text())["lr"] == 0.01
    assert "seed 0 from experience 2: lr 0.01 -> 0.005" in (run / "summary.txt").read_text()
    # the checkpoint keeps the record, so a later resume neither loses it nor accepts the old settings silently
    assert load_checkpoint(run / CHECKPOINT_NAME)["settings_changes"] == results["settings_changes"]
    code, err = _main(capsys, "--demo", "--no-progress", "--set", "epochs=1", "--out", str(run), "--resume")
    _one_line_error(code, err, f"the run in {run} is finished")  # nothing left to resume
    (run / "results.json").unlink()  # as if stopped before writing it: then a resume has something to do
    code, err = _main(capsys, "--demo", "--no-progress", "--set", "epochs=1", "--out", str(run), "--resume")
    _one_line_error(code, err, "--lr 0.005 there, 0.01 now", f"--config {run / 'config_resumed.yaml'} --resume")


def test_compare_resume_with_changed_settings_is_refused_before_any_method_runs(interrupted_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(interrupted_run, out / "inflora")
    before = _tree(out)
    code = cli.main(["compare", "--preset", P.DEMO_PRESET, "--methods", "inflora", "--epochs", "1", "--lr", "0.001",
                     "--no-progress", "--out", str(out), "--resume"])
    _one_line_error(code, capsys.readouterr().err.strip(), "--lr 0.01 there, 0.001 now", "--resume-with-changes")
    assert _tree(out) == before  # no comparison table, no method run


def test_settings_by_experience_follows_several_resumes():
    changes = [{"seed_index": 0, "experiences_done": 2, "changed": {"lr": [0.1, 0.01]}},
               {"seed_index": 1, "experiences_done": 1, "changed": {"lr": [0.01, 0.001], "epochs": [3, 4]}}]
    config = {"lr": 0.001, "epochs": 4}
    assert loop.settings_by_experience(changes, config, 0, 3) == {"epochs": [3, 3, 3], "lr": [0.1, 0.1, 0.01]}
    assert loop.settings_by_experience(changes, config, 1, 3) == {"epochs": [3, 4, 4], "lr": [0.01, 0.001, 0.001]}
    assert loop.settings_by_experience(changes, config, 2, 2) == {"epochs": [4, 4], "lr": [0.001, 0.001]}


def test_file_and_folder_checks_answer_before_torch_is_imported(interrupted_run, finished_run, tmp_path):
    """The output folder (holding results, a file), a missing data folder or weights file and a checkpoint trained
    with other settings are refused before torch is imported (that takes seconds): each in a fresh process that
    reports whether torch was loaded when the error came."""
    held = tmp_path / "held"
    held.mkdir()
    (held / "results.json").write_text("{}")
    (held / "seed0" / "after_exp1").mkdir(parents=True)
    (held / "seed0" / "after_exp1" / "model.safetensors").write_text("x")
    (tmp_path / "a_file").write_text("x")
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    demo = ["run", "--demo", "--no-progress"]
    cases = {
        "--out holds results": (demo + ["--out", str(held)], "already holds results"),
        "--out is a file": (demo + ["--out", str(tmp_path / "a_file")], "is a file"),
        "missing --data-root": (["run", "--preset", "imagenet_r_10", "--data-root", str(tmp_path / "nowhere"), "--out",
                                 str(tmp_path / "new")], "does not exist"),
        "missing --weights": (demo + ["--weights", str(tmp_path / "nowhere.safetensors")], "no such file"),
        "--resume with another lr": (demo + ["--lr", "0.001", "--set", "epochs=1", "--out", str(run), "--resume"],
                                     "trained with other settings"),
        "--export holds exports": (demo + ["--export", str(held), "--out", str(tmp_path / "new")],
                                   "already holds exported models"),
        "--resume of a finished run": (demo + ["--set", "epochs=1", "--n-experiences", "2", "--out",
                                               str(finished_run), "--resume"], "is finished"),
    }
    probe = ("import json, sys\nfrom inflora_avalanche.run.cli import main\nfound = []\n"
             "for argv in json.loads(sys.argv[1]):\n    found.append([main(argv), 'torch' in sys.modules])\n"
             "print('RESULT', json.dumps(found))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", probe, json.dumps([argv for argv, _ in cases.values()])],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    found = json.loads(proc.stdout.split("RESULT ", 1)[1])
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == len(cases), proc.stderr
    for (name, (_, needle)), (code, torch_loaded), line in zip(cases.items(), found, errors):
        assert code == 2 and line.startswith("error: ") and needle in line, (name, line)
        assert not torch_loaded, name
    assert not (tmp_path / "new").exists() and (held / "results.json").read_text() == "{}"


def test_resume_refuses_other_backbone_weights(interrupted_run, tmp_path, capsys):
    """Same settings but other weights (a checksum of the frozen backbone differs): refused, nothing touched."""
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    state = load_checkpoint(run / CHECKPOINT_NAME)
    state["fingerprint"] += 1e-3
    save_checkpoint(run / CHECKPOINT_NAME, state)
    before = (run / CHECKPOINT_NAME).read_bytes()
    code, err = _main(capsys, "--demo", "--no-progress", "--set", "epochs=1", "--out", str(run), "--resume")
    _one_line_error(code, err, "backbone weights differ from those the checkpoint was trained on")
    assert (run / CHECKPOINT_NAME).read_bytes() == before
    assert not (run / "seed0" / "csv_resume1").exists()  # refused before any logger opened its files


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    code, err = _main(capsys, "--demo", "--no-progress", "--out", str(out), "--resume")
    _one_line_error(code, err, "cannot read checkpoint", "--overwrite")
    assert (out / CHECKPOINT_NAME).read_bytes() == b"not a checkpoint"


# --------------------------------------------------------------------------------------------------- bad inputs
def _image_folder(root: Path, n_classes: int, per_class: int = 3) -> Path:
    from PIL import Image

    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * c, 20 * i, 0)).save(root / f"c{c}" / f"{i}.png")
    return root


def _tiny_folder_preset(tmp_path: Path) -> Path:
    preset = {"benchmark": "folder", "n_experiences": 2, "resolution": 8, "backbone": "vit_tiny_patch16_224",
              "pretrained": False, "backbone_kwargs": {"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 16,
                                                       "num_heads": 2},
              "rank": 2, "epochs": 1, "batch_size": 4, "device": "cpu", "num_workers": 0, "progress": False}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(preset))
    return path


def _bad_cases(tmp_path: Path) -> dict:
    """name -> (argv, benchmark, text the message must hold)."""
    tiny = str(_tiny_folder_preset(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    five = _image_folder(tmp_path / "five", 5)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "results.json").write_text("{}")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    from safetensors.torch import save_file
    import timm

    other_arch = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4,
                                   depth=2, embed_dim=32, num_heads=2)
    weights = tmp_path / "vit32.safetensors"
    save_file({k: v.contiguous() for k, v in other_arch.state_dict().items()}, str(weights))
    one_class = _image_folder(tmp_path / "one_class", 1)
    train_only = _image_folder(tmp_path / "train_only" / "train", 2).parent
    val_only = _image_folder(tmp_path / "val_only" / "val", 2).parent
    broken = _image_folder(tmp_path / "broken", 2)
    (broken / "c0" / "1.png").write_bytes(b"")
    (broken / "c1" / "2.png").write_bytes(b"not an image")
    manifest = tmp_path / "split.json"
    manifest.write_text("{}")
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"benchmark": "digits", "epochs": "3"}))
    demo = ["--demo", "--no-progress"]
    out = str(tmp_path / "out")
    folder = ["--preset", tiny, "--out", out]
    return {
        "unknown preset": (["--preset", "nope"], "split_cifar100", "unknown preset 'nope'; choose one of"),
        "missing data folder": (["--preset", tiny, "--data-root", str(tmp_path / "nowhere"), "--out", out], "imagenet_r",
                                "does not exist"),
        "empty data folder": (["--preset", tiny, "--data-root", str(empty), "--out", out], "imagenet_r", "no class subfolders"),
        "classes do not divide (folder)": (["--preset", tiny, "--data-root", str(five), "--out", out], "imagenet_r",
                                           "5 classes"),
        "classes do not divide (fixed)": (demo + ["--experiences", "3"], "split_cifar100",
                                          "cannot be split evenly into 3 experiences; choose --n-experiences among"),
        "rank >= width": (demo + ["--set", "rank=64"], "split_cifar100", "rank must be an integer in [1, 63]"),
        "lamb out of range": (demo + ["--set", "lamb=1.5"], "split_cifar100", "lamb must be in (0, 1]"),
        "lame below lamb": (demo + ["--set", "lame=0.5"], "split_cifar100", "lame (0.5) must be >= lamb"),
        "unwritable output folder": (demo + ["--out", "/proc/inflora-test/run"], "split_cifar100",
                                     "cannot write into /proc"),
        "output path under a file": (demo + ["--out", str(a_file / "run")], "split_cifar100", "is a file"),
        "existing output folder": (demo + ["--out", str(existing)], "split_cifar100",
                                   "pass --resume to continue that run or --overwrite"),
        "--resume with --overwrite": (demo + ["--out", str(existing), "--resume", "--overwrite"], "split_cifar100",
                                      "pass only one of them"),
        "--resume without --out": (demo + ["--resume"], "split_cifar100", "--resume needs --out"),
        "--resume on results without checkpoint": (demo + ["--out", str(existing), "--resume"], "split_cifar100",
                                                   "no checkpoint.safetensors to resume from"),
        "weights of another architecture": (demo + ["--weights", str(weights)], "split_cifar100",
                                            "does not fit timm model"),
        "global batch not divisible by processes": (demo + ["--batch-size", "63"], "split_cifar100",
                                                    "must divide by the 2 processes"),
        # second round (issue 14)
        "seed below 0": (demo + ["--seeds", "-1"], "split_cifar100", "seeds must be in 0 .. 2**32-1, got [-1]"),
        "seed above 2**32-1": (demo + ["--seeds", "0", str(2**32)], "split_cifar100", "seeds must be in 0 .. 2**32-1"),
        "device mps absent": (demo + ["--device", "mps"], "split_cifar100", "device mps requested"),
        "device cuda:5 absent": (demo + ["--device", "cuda:5"], "split_cifar100", "device cuda:5"),
        "unknown device": (demo + ["--device", "tpu"], "split_cifar100",
                           "device must be auto, cpu, cuda, cuda:N or mps"),
        "resolution against the preset's img_size": (demo + ["--resolution", "100"], "split_cifar100",
                                                     "--resolution 100 conflicts with backbone_kwargs img_size 16"),
        "text for an integer": (demo + ["--set", 'epochs="3"'], "split_cifar100",
                                "epochs (the command line) must be an integer, got '3'"),
        "text for an integer in a preset": (["--preset", str(typed), "--no-progress"], "split_cifar100",
                                            "epochs (preset typed.json) must be an integer, got '3'"),
        "zero epochs": (demo + ["--epochs", "0"], "split_cifar100", "epochs (the command line) must be >= 1, got 0"),
        "NaN learning rate": (demo + ["--lr", "nan"], "split_cifar100",
                              "lr (the command line) must be a finite number, got nan"),
        "infinite learning rate": (demo + ["--set", "lr=Infinity"], "split_cifar100",
                                   "must be a finite number, got inf"),
        "NaN weight decay": (demo + ["--set", "weight_decay=NaN"], "split_cifar100",
                             "weight_decay (the command line) must be a finite number, got nan"),
        "zero batch size": (demo + ["--batch-size", "0"], "split_cifar100",
                            "batch_size (the command line) must be >= 1, got 0"),
        "--split-manifest with --classes": (folder + ["--data-root", str(five), "--split-manifest", str(manifest),
                                                      "--classes", "2"], "imagenet_r",
                                            "--split-manifest and --classes were both given"),
        "--split-manifest with --split-seed": (folder + ["--data-root", str(five), "--split-manifest", str(manifest),
                                                         "--split-seed", "3"], "imagenet_r",
                                               "--split-manifest and --split-seed were both given"),
        "--weights with --pretrained": (demo + ["--weights", str(weights), "--pretrained"], "split_cifar100",
                                        "--weights and --pretrained were both given"),
        "--milestones without the step schedule": (demo + ["--milestones", "3"], "split_cifar100",
                                                   "--milestones apply to --lr-schedule step, not cosine"),
        "--momentum with adam": (demo + ["--momentum", "0.5"], "split_cifar100",
                                 "--momentum applies to --optimizer sgd, not adam"),
        "--betas with sgd": (demo + ["--optimizer", "sgd", "--betas", "0.9", "0.99"], "split_cifar100",
                             "--betas apply to --optimizer adam, not sgd"),
        "InfLoRA-only flag with a baseline": (demo + ["--method", "naive", "--rank", "4"], "split_cifar100",
                                              "--rank only applies to inflora, inflora_b5, inflora_ca, seq_lora, sd_lora, not naive"),
        "--demo with --preset": (demo + ["--preset", "cifar100_inflora"], "split_cifar100", "drop --preset"),
        "--demo with --data-root": (demo + ["--data-root", str(five)], "split_cifar100", "drop --data-root"),
        "--demo with --benchmark": (demo + ["--benchmark", "folder"], "split_cifar100", "drop --benchmark"),
        "one class, two experiences": (folder + ["--data-root", str(one_class)], "imagenet_r",
                                       "has 1 class; class-incremental learning needs at least two"),
        "one class, one experience": (folder + ["--data-root", str(one_class), "--n-experiences", "1"], "imagenet_r",
                                      "has 1 class; class-incremental learning needs at least two"),
        "train/ without val/": (folder + ["--data-root", str(train_only)], "imagenet_r", "has train/ but not val/"),
        "val/ without train/": (folder + ["--data-root", str(val_only)], "imagenet_r", "has val/ but not train/"),
        "unreadable image headers": (folder + ["--data-root", str(broken)], "imagenet_r",
                                     ("2 of the stream's 6 image files cannot be read", str(broken / "c0" / "1.png"),
                                      str(broken / "c1" / "2.png"))),
        "weights path is a folder": (demo + ["--weights", str(tmp_path)], "split_cifar100",
                                     "is a folder; give the file"),
    }


BAD_INPUTS = ["unknown preset", "missing data folder", "empty data folder", "classes do not divide (folder)",
              "classes do not divide (fixed)", "rank >= width", "lamb out of range", "lame below lamb",
              "unwritable output folder", "output path under a file", "existing output folder",
              "--resume with --overwrite", "--resume without --out", "--resume on results without checkpoint",
              "weights of another architecture", "global batch not divisible by processes",
              # second round (issue 14)
              "seed below 0", "seed above 2**32-1", "device mps absent", "device cuda:5 absent", "unknown device",
              "resolution against the preset's img_size", "text for an integer", "text for an integer in a preset",
              "zero epochs", "NaN learning rate", "infinite learning rate", "NaN weight decay", "zero batch size",
              "--split-manifest with --classes", "--split-manifest with --split-seed", "--weights with --pretrained",
              "--milestones without the step schedule", "--momentum with adam", "--betas with sgd",
              "InfLoRA-only flag with a baseline", "--demo with --preset", "--demo with --data-root",
              "--demo with --benchmark", "one class, two experiences", "one class, one experience",
              "train/ without val/", "val/ without train/", "unreadable image headers", "weights path is a folder"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_before_training(case, tmp_path, capsys, monkeypatch):
    argv, benchmark, needle = _bad_cases(tmp_path)[case]
    if case.startswith("global batch"):
        monkeypatch.setenv("WORLD_SIZE", "2")
    if case == "device mps absent" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a run without --out would write results/... here
    before = sorted(p.name for p in tmp_path.rglob("*"))
    started = time.perf_counter()
    code, err = _main(capsys, *argv, benchmark=benchmark)
    _one_line_error(code, err, *([needle] if isinstance(needle, str) else needle))
    assert time.perf_counter() - started < 60  # no training happened
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created, nothing removed
    if case == "existing output folder":
        assert (tmp_path / "existing" / "results.json").read_text() == "{}"


# third round (issue 20): runner settings and config files. name -> (argv of `inflora-avalanche`, text of the line)
def _third_round_cases(tmp_path: Path) -> dict:
    files = tmp_path / "files"
    files.mkdir()

    def file(name: str, text, binary: bool = False) -> str:
        path = files / name
        path.write_bytes(text) if binary else path.write_text(text)
        return str(path)

    (files / "folder.yaml").mkdir()
    five = _image_folder(tmp_path / "five", 5)
    given_split = _image_folder(tmp_path / "given" / "train", 2).parent
    _image_folder(given_split / "val", 2)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "to_a_file").symlink_to(tmp_path / "a_file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    manifest = file("split.json", "{}")
    run, demo = ["run", "--no-progress"], ["run", "--demo", "--no-progress"]
    out = ["--out", str(tmp_path / "out")]
    folder = ["run", "--preset", str(_tiny_folder_preset(tmp_path)), *out]
    return {
        "--config missing": (run + ["-c", str(files / "missing.yaml")], "config file", "missing.yaml: no such file"),
        "--config a folder": (run + ["--config", str(files / "folder.yaml")], "folder.yaml is a folder; give the file"),
        "--config malformed YAML": (run + ["-c", file("bad.yaml", "lr: [1, 2\n")],
                                    "bad.yaml is not valid YAML: expected ',' or ']'", "(line 2, column 1)"),
        "--config malformed JSON": (run + ["-c", file("bad.json", '{"lr": 0.1,}')], "bad.json is not valid JSON"),
        "--config a YAML list": (run + ["-c", file("list.yaml", "- lr: 0.1\n- epochs: 2\n")],
                                 "must hold a YAML mapping of settings (key: value), not a list"),
        "--config a single value": (run + ["-c", file("value.yml", "0.001\n")], "not a single value (0.001)"),
        "--config empty": (run + ["-c", file("empty.yaml", "# nothing yet\n")], "empty.yaml holds no settings"),
        "--config not UTF-8": (run + ["-c", file("latin.yaml", b"description: caf\xe9\n", binary=True)],
                               "latin.yaml is not a text file (not UTF-8)"),
        "--config another suffix": (run + ["-c", file("run.txt", "lr: 0.1\n")], "must be a .json, .yaml or .yml file"),
        "--config unknown key": (run + ["-c", file("typo.yaml", "epoch: 3\n")],
                                 "unknown setting(s) ['epoch'] in config file typo.yaml; did you mean 'epochs'?"),
        "--config wrong type": (run + ["-c", file("typed.yaml", "epochs: three\n")],
                                "epochs (config file typed.yaml) must be an integer, got 'three'"),
        "--config a list for a number": (run + ["-c", file("list_lr.yaml", "lr: [0.1]\n")],
                                         "lr (config file list_lr.yaml) must be a number, got [0.1]"),
        "--config key twice (YAML)": (run + ["-c", file("twice.yaml", "lr: 0.1\nepochs: 2\nlr: 0.2\n")],
                                      "key 'lr' is given twice, first on line 1 (line 3, column 1)"),
        "--config key twice (JSON)": (run + ["-c", file("twice.json", '{"lr": 0.1, "lr": 0.2}')],
                                      "key 'lr' is given twice"),
        "--config preset not a name": (run + ["-c", file("label.yaml", "preset: 3\n")],
                                       "preset (config file label.yaml) must be a preset name or file, got 3"),
        "--config unknown preset": (run + ["-c", file("nope.yaml", "preset: nope\n")],
                                    "nope.yaml: unknown preset 'nope'"),
        "--config and --preset disagree": (run + ["-c", file("other.yaml", "preset: cifar100_inflora\n"), "--preset",
                                                  "imagenet_r_10"], "--preset imagenet_r_10 and the preset of config "
                                           "file", "(cifar100_inflora) differ; give the preset once"),
        "--demo with a config file of another preset": (
            demo + ["-c", file("other2.yaml", "preset: cifar100_inflora\n")], "--demo runs its own offline preset",
            "drop preset from"),
        "--preset a missing .yaml, with --help": (run + ["--preset", str(files / "x.yaml"), "--help"],
                                                  "preset", "x.yaml: no such file"),
        "compare --config naming a method": (["compare", "-c", file("method.yaml", "method: naive\n"), *out],
                                             "names a method (naive), but compare runs the methods of --methods"),
        "--resume-with-changes with --overwrite": (demo + ["--resume-with-changes", "--overwrite", *out],
                                                   "--resume-with-changes continues the run in --out and --overwrite"),
        "--out a symbolic link to a file": (demo + ["--out", str(tmp_path / "to_a_file")], "to_a_file is a file"),
        "--out a dangling symbolic link": (demo + ["--out", str(tmp_path / "dangling" / "run")],
                                           "dangling is a symbolic link to", "which does not exist"),
        "--data-root a file": (folder + ["--data-root", str(tmp_path / "a_file")], "a_file is a file; give the folder"),
        "--data-root with a generated stream": (run + ["--preset", "synthetic_smoke", "--data-root", str(five), *out],
                                                "--data-root does nothing for the synthetic stream"),
        "--domains with CIFAR-100": (run + ["--domains", "real", *out], "--domains does nothing for the "
                                     "split_cifar100 stream (only domainnet reads it)"),
        "--test-fraction with CIFAR-100": (run + ["--test-fraction", "0.3", *out],
                                           "--test-fraction does nothing for the split_cifar100 stream"),
        "--split-manifest with CIFAR-100": (run + ["--split-manifest", manifest, *out],
                                            "--split-manifest does nothing for the split_cifar100 stream"),
        "--split-seed with train/ and val/ folders": (folder + ["--data-root", str(given_split), "--split-seed", "3"],
                                                      "--split-seed does nothing here", "has train/ and val/"),
        "--normalize with the digits": (demo + ["--normalize"], "--normalize does nothing for the digits stream"),
        "--download and --domains with the digits": (
            demo + ["--download", "--domains", "real"], "these settings do nothing for the digits stream: "
            "--download (read by split_cifar100); --domains (read by domainnet)"),
        "--mean without --normalize": (demo + ["--mean", "0.5", "0.5", "0.5"], "--mean only applies with --normalize"),
        "--gamma without the step schedule": (demo + ["--gamma", "0.5"], "--gamma applies to --lr-schedule step, not "
                                              "cosine"),
        "--head-lr with L2P": (demo + ["--method", "l2p", "--head-lr", "0.1"], "--head-lr is not read by l2p"),
        "--lamb with Sequential LoRA": (demo + ["--method", "seq_lora", "--lamb", "0.9"],
                                        "--lamb only applies to inflora, inflora_b5, inflora_ca, not seq_lora"),
    }


THIRD_ROUND = ["--config missing", "--config a folder", "--config malformed YAML", "--config malformed JSON",
               "--config a YAML list", "--config a single value", "--config empty", "--config not UTF-8",
               "--config another suffix", "--config unknown key", "--config wrong type",
               "--config a list for a number", "--config key twice (YAML)", "--config key twice (JSON)",
               "--config preset not a name", "--config unknown preset", "--config and --preset disagree",
               "--demo with a config file of another preset", "--preset a missing .yaml, with --help",
               "compare --config naming a method", "--resume-with-changes with --overwrite",
               "--out a symbolic link to a file", "--out a dangling symbolic link", "--data-root a file",
               "--data-root with a generated stream", "--domains with CIFAR-100", "--test-fraction with CIFAR-100",
               "--split-manifest with CIFAR-100", "--split-seed with train/ and val/ folders",
               "--normalize with the digits", "--download and --domains with the digits",
               "--mean without --normalize", "--gamma without the step schedule", "--head-lr with L2P",
               "--lamb with Sequential LoRA"]


@pytest.mark.parametrize("case", THIRD_ROUND)
def test_runner_settings_and_config_files_are_one_line_exit_2_before_anything(case, tmp_path, capsys, monkeypatch):
    argv, *needles = _third_round_cases(tmp_path)[case]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a run without --out would write results/... here
    before = _tree(tmp_path)
    threads = torch.get_num_threads()
    try:
        code = cli.main(argv)
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    _one_line_error(code, captured.err.strip(), *needles)
    assert captured.out == ""  # not even --help's text
    assert _tree(tmp_path) == before  # nothing created, changed or removed


def test_stream_settings_are_refused_only_when_they_ask_for_something():
    """A switch turned off or a value cleared to null asks the stream for nothing (scripts may pass --no-download
    everywhere); the preset's own values are never refused; the same settings are read where the stream reads them."""
    assert not cli.config_from_argv(["--demo", "--no-download", "--no-normalize", "--set", "domains=null"])["download"]
    assert cli.config_from_argv(["--preset", "imagenet_r_10", "--data-root", "x", "--no-download"], "imagenet_r")
    config = cli.config_from_argv(["--preset", "domainnet_inflora", "--data-root", "x", "--domains", "real",
                                   "--normalize", "--mean", "0.5", "0.5", "0.5"], "domainnet")
    assert (config["domains"], config["normalize"], config["mean"]) == (["real"], True, [0.5, 0.5, 0.5])
    with pytest.raises(C.ConfigError, match="--domains does nothing for the imagenet_r stream"):
        cli.config_from_argv(["--preset", "imagenet_r_10", "--data-root", "x", "--domains", "real"], "imagenet_r")


# --------------------------------------------------------------------------------------------------- divergence
class PoisonLoss(SupervisedPlugin):
    """Makes the loss NaN at one iteration of one experience (1-based)."""

    def __init__(self, experience: int, iteration: int) -> None:
        super().__init__()
        self.experience, self.iteration, self.seen = experience, iteration, 0

    def before_training_exp(self, strategy, **kwargs):
        self.seen = 0

    def before_backward(self, strategy, **kwargs):
        self.seen += 1
        if strategy.experience.current_experience + 1 == self.experience and self.seen == self.iteration:
            strategy.loss = strategy.loss * float("nan")


def test_non_finite_loss_stops_with_experience_and_iteration_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    poisoned = functools.partial(loop.run_experiment, extra_plugins=lambda seed: [PoisonLoss(2, 3)])
    monkeypatch.setattr(loop, "run_experiment", poisoned)
    code, err = _main(capsys, "--demo", "--no-progress", "--set", "epochs=1", "--out", str(out))
    _one_line_error(code, err, "not finite", "seed 0, experience 2/5, iteration 3 (epoch 1)",
                    f"the last good checkpoint is {out / CHECKPOINT_NAME}", exit_code=3)
    state = load_checkpoint(out / CHECKPOINT_NAME)
    assert state["experiences_done"] == 1
    assert not (out / "results.json").exists()


# --------------------------------------------------------------------------------------------------- weights files
DEMO_BACKBONE = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}  # the demo preset's


def _demo_backbone(**overrides):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**DEMO_BACKBONE, **overrides})


def _augreg_npz(model, path: Path) -> None:
    """A timm ViT's weights in the layout of Google's AugReg ``.npz`` files (JAX names and shapes), which timm's
    ``VisionTransformer.load_pretrained`` reads."""
    import numpy as np

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    arrays = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
              "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
              "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
              "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            arrays[mha + name + "/kernel"] = sd[b + "attn.qkv.weight"][j * d:(j + 1) * d].T.reshape(d, heads, -1)
            arrays[mha + name + "/bias"] = sd[b + "attn.qkv.bias"][j * d:(j + 1) * d].reshape(heads, -1)
        arrays[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(d, heads, -1).transpose(1, 2, 0)
        arrays[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for norm, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            arrays[p + norm + "/scale"], arrays[p + norm + "/bias"] = sd[b + name + ".weight"], sd[b + name + ".bias"]
        for r in range(2):
            arrays[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            arrays[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **arrays)


def _bad_weights(folder: Path, case: str) -> tuple[Path, str]:
    """A weights file that cannot be used, and what the message must say about it."""
    import random

    import numpy as np
    from safetensors.torch import save_file

    folder.mkdir()
    if case == "empty file":
        path = folder / "empty.safetensors"
        path.write_bytes(b"")
        return path, "is empty (0 bytes)"
    if case == "truncated safetensors":
        whole = folder / "whole.safetensors"
        save_file(_demo_backbone().state_dict(), str(whole))
        path = folder / "truncated.safetensors"
        path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        whole.unlink()
        return path, "is a damaged or truncated safetensors file"
    if case == "text file":
        path = folder / "vit.pth"
        path.write_text("<html>404 Not Found</html>\n")
        return path, "is a text file (it starts with '<html>404 Not Found</html>'), not a checkpoint"
    if case == "random bytes .pth":
        path = folder / "random.pth"
        path.write_bytes(b"\x00" + random.Random(0).randbytes(4095))
        return path, "is not a checkpoint: its 4096 bytes are neither safetensors"
    if case == "npz that is not a checkpoint":
        path = folder / "arrays.npz"
        np.savez(path, mean=np.zeros(3), std=np.ones(3))
        return path, "is a NumPy .npz of arrays ['mean', 'std'], neither a big_vision / AugReg ViT checkpoint nor"
    if case == "safetensors of another architecture":
        path = folder / "vit32.safetensors"
        save_file(_demo_backbone(embed_dim=32).state_dict(), str(path))
        return path, "does not fit timm model 'vit_tiny_patch16_224' (size mismatch for cls_token"
    if case == "state dict of another network":
        path = folder / "resnet.safetensors"
        save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.bias": torch.zeros(10)}, str(path))
        return path, "none of its tensor names is a parameter of the model, e.g. ['conv1.weight', 'fc.bias']"
    if case == "checkpoint without tensors":
        path = folder / "training.pth"
        torch.save({"epoch": 3, "net": _demo_backbone().state_dict()}, path)
        return path, "is a PyTorch checkpoint without tensors (its entries: ['epoch', 'net'])"
    if case == "TorchScript archive":
        import warnings

        path = folder / "scripted.pt"
        with warnings.catch_warnings():  # TorchScript is deprecated: users still have such files
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
        return path, "is a TorchScript archive (torch.jit.save); save the model's state_dict() instead"
    if case == "pickled whole model":
        path = folder / "model.pth"
        torch.save(_demo_backbone(), path)
        return path, "holds pickled Python objects besides tensors"
    if case == "a folder":
        (folder / "weights").mkdir()
        (folder / "weights" / "model.safetensors").write_bytes(b"")
        return folder / "weights", "is a folder"
    raise KeyError(case)


BAD_WEIGHTS = ["empty file", "truncated safetensors", "text file", "random bytes .pth", "npz that is not a checkpoint",
               "safetensors of another architecture", "state dict of another network", "checkpoint without tensors",
               "pickled whole model", "TorchScript archive", "a folder"]


@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_a_bad_weights_file_is_named_in_one_line_by_the_runner_and_the_library(case, tmp_path, capsys, monkeypatch):
    """``--weights BAD``: exit code 2, one line naming the file and what it is, nothing created; in Python,
    ``create_backbone(..., checkpoint_path=BAD)`` raises a ValueError with the same text."""
    from inflora_avalanche.backbone import create_backbone

    path, what = _bad_weights(tmp_path / "files", case)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = _main(capsys, "--demo", "--no-progress", "--weights", str(path), "--out", str(tmp_path / "out"))
    _one_line_error(code, err, str(path), what)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    with pytest.raises(ValueError) as info:
        create_backbone("vit_tiny_patch16_224", checkpoint_path=path, **DEMO_BACKBONE)
    assert str(path) in str(info.value) and what.split(";")[0] in str(info.value) and "\n" not in str(info.value)


def test_weights_files_are_recognised_by_their_content(tmp_path):
    """safetensors under another suffix, zip and legacy PyTorch files, an .npz with timm key names and an AugReg
    (big_vision) .npz all give the same weights."""
    import numpy as np
    from safetensors.torch import save_file

    from inflora_avalanche.backbone import create_backbone

    reference = _demo_backbone()
    state = reference.state_dict()
    save_file(state, str(tmp_path / "weights.bin"))
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "training.pth")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    np.savez(tmp_path / "timm_names.npz", **{k: v.numpy() for k, v in state.items()})
    _augreg_npz(reference, tmp_path / "augreg.npz")
    for name in ("weights.bin", "training.pth", "legacy.pt", "timm_names.npz", "augreg.npz"):
        loaded = create_backbone("vit_tiny_patch16_224", checkpoint_path=tmp_path / name, **DEMO_BACKBONE).state_dict()
        for key, value in state.items():
            assert torch.allclose(loaded[key], value, atol=1e-6), (name, key)
    with pytest.raises(ValueError, match=r"augreg\.npz does not fit timm model .*missing Transformer/encoderblock_2"):
        create_backbone("vit_tiny_patch16_224", checkpoint_path=tmp_path / "augreg.npz",
                        **{**DEMO_BACKBONE, "depth": 3})


# --------------------------------------------------------------------------------------------------- output lock
def test_a_live_run_holding_the_output_folder_refuses_a_second_one(tmp_path, capsys):
    from inflora_avalanche.run.output import LOCK_NAME, OutputLock

    out = tmp_path / "run"
    out.mkdir()
    lock = OutputLock(out).acquire()  # this process stands for a run that is writing into the folder
    try:
        code, err = _main(capsys, "--demo", "--no-progress", "--out", str(out))
        _one_line_error(code, err, f"another run (pid {os.getpid()} on", f"is writing into {out}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        lock.release()
    assert not any(out.iterdir())


def _take_lock(folder: str, start: float, results) -> None:
    from inflora_avalanche.run.output import OutputLock

    lock = OutputLock(Path(folder))
    while time.time() < start:
        pass
    try:
        lock.acquire()
        results.put("taken")
        time.sleep(0.3)  # hold it while the others try
    except C.ConfigError:
        results.put("refused")


def test_of_several_runs_finding_a_stale_lock_exactly_one_takes_it_over(tmp_path):
    """A lock file left by a killed run, found by four runs at the same moment: one takes it over, three are refused
    (the lock used to be deleted and re-created, and two or more runs then each believed they held it)."""
    import multiprocessing
    import socket

    from inflora_avalanche.run.output import LOCK_NAME

    context = multiprocessing.get_context("fork")
    for trial in range(3):
        folder = tmp_path / f"run{trial}"
        folder.mkdir()
        (folder / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                                    "started": "2026-01-01T00:00:00"}))
        results = context.Queue()
        start = time.time() + 0.3
        workers = [context.Process(target=_take_lock, args=(str(folder), start, results)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=30)
        outcomes = sorted(results.get(timeout=5) for _ in workers)
        assert outcomes == ["refused", "refused", "refused", "taken"], (trial, outcomes)


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_and_the_run_finishes(tmp_path, capsys):
    import socket

    from inflora_avalanche.run.output import LOCK_NAME

    out = tmp_path / "run"
    out.mkdir()
    pid = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "yesterday"}))
    threads = torch.get_num_threads()
    try:
        code = cli.run_main(["--demo", "--no-progress", "--set", "epochs=1", "--n-experiences", "2", "--out",
                             str(out)], "split_cifar100")
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"a stale lock of a run that ended without releasing it (pid {pid}) was taken over" in captured.out
    assert json.loads((out / "results.json").read_text())["seeds"][0]["experiences_done"] == 2
    assert not (out / LOCK_NAME).exists()


def test_two_runs_started_at_once_on_the_same_out(tmp_path):
    """Two runs on one --out, released at the same moment once both have imported everything: exactly one writes
    the folder, the other is refused in one line (exit code 2), and the first one's results are whole."""
    from inflora_avalanche.run.output import LOCK_NAME

    out = tmp_path / "run"
    command = ["run", "--demo", "--no-progress", "--set", "epochs=1", "--n-experiences", "2", "--out", str(out)]
    ended = start_at_once([command, command], tmp_path)
    errors = [err for _, err in ended]
    assert sorted(code for code, _ in ended) == [0, 2], errors
    refused = next(err for code, err in ended if code == 2).strip()
    _one_line_error(2, refused, "another run (pid", f"is writing into {out}")
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"][0]["experiences_done"] == 2 and len(results["seeds"][0]["A_t"]) == 2
    assert not (out / LOCK_NAME).exists()


# --------------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_start_up_is_one_line_exit_130_and_leaves_no_folder(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "inflora_avalanche", "run", "--demo", "--no-progress", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    sent = time.perf_counter()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert time.perf_counter() - sent < 5  # at once, not after the imports (or the run) have ended
    assert err.startswith("interrupted before") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


class Interrupt(SupervisedPlugin):
    """Ctrl-C (or another exception) during one training iteration of one experience (1-based)."""

    def __init__(self, experience: int, error: BaseException = KeyboardInterrupt()) -> None:
        super().__init__()
        self.experience, self.error = experience, error

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.experience.current_experience + 1 == self.experience:
            raise self.error


def _interrupted_run(capsys, monkeypatch, experience: int, *argv: str, error: BaseException = KeyboardInterrupt()):
    monkeypatch.setattr(loop, "run_experiment", functools.partial(
        loop.run_experiment, extra_plugins=lambda seed: [Interrupt(experience, error)]))
    threads = torch.get_num_threads()
    try:
        code = cli.run_main(list(argv), "split_cifar100")
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err


def test_ctrl_c_before_the_first_checkpoint_takes_back_what_the_run_wrote(tmp_path, capsys, monkeypatch):
    """Nothing can be resumed yet, so the folders the run made (--out and its missing parents) are removed and a
    folder that existed is left as it was: the same command then runs again as it is."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "new" / "parents" / "run"
    code, err = _interrupted_run(capsys, monkeypatch, 1, *DEMO_ARGS, "--out", str(out))
    assert code == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"interrupted before the first experience finished: nothing to resume, so {out} was "
                          "removed again"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    code, err = _interrupted_run(capsys, monkeypatch, 1, *DEMO_ARGS, "--out", str(kept), "--overwrite")
    assert code == 130 and f"what it had added to {kept} was removed" in err, err
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"


def test_a_user_error_met_during_the_first_experience_leaves_nothing(tmp_path, capsys, monkeypatch):
    """E.g. an image whose header reads but whose pixels do not decode: exit code 2, and as for Ctrl-C nothing is
    left, so the same command runs again once the file is replaced."""
    from inflora_avalanche.streams import ImageLoadError

    out = tmp_path / "run"
    code, err = _interrupted_run(capsys, monkeypatch, 1, *DEMO_ARGS, "--out", str(out),
                                 error=ImageLoadError("cannot read image x.jpg (OSError: image file is truncated)"))
    _one_line_error(code, err.strip(), "cannot read image x.jpg")
    assert not out.exists()


def test_ctrl_c_after_a_checkpoint_keeps_it_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, err = _interrupted_run(capsys, monkeypatch, 2, *DEMO_ARGS, "--out", str(out))
    assert code == 130 and err.count("\n") == 1, err
    assert "pass --resume with the same --out to continue" in err and str(out / CHECKPOINT_NAME) in err
    assert load_checkpoint(out / CHECKPOINT_NAME)["experiences_done"] == 1
    assert not (out / ".inflora-run.lock").exists()


def _interrupt_arrives(action) -> bool:
    """Whether a Ctrl-C made by ``action()`` reaches the code after it, under the runner's interrupt handling."""
    try:
        with interrupts_not_lost():
            try:
                action()
                deadline = time.time() + 5
                while time.time() < deadline:
                    time.sleep(0.01)
            except KeyboardInterrupt:
                return True
    finally:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    return False


@pytest.mark.parametrize("how", ["SIGINT", "KeyboardInterrupt raised"])
def test_a_ctrl_c_in_a_gc_callback_is_not_lost(how):
    """Python drops an exception raised in a garbage-collector callback (JAX, imported with Avalanche, runs one after
    every collection): a Ctrl-C landing there was lost and the run went on."""
    import gc

    state = {"armed": True}

    def callback(phase, info):
        if phase == "stop" and state["armed"]:
            state["armed"] = False
            if how == "SIGINT":
                signal.raise_signal(signal.SIGINT)  # Python runs the handler while the callback runs
                sum(range(1000))
            else:
                raise KeyboardInterrupt  # what Python's own handler does there

    gc.callbacks.append(callback)
    try:
        assert _interrupt_arrives(gc.collect)
    finally:
        gc.callbacks.remove(callback)
    assert not state["armed"]


def test_a_ctrl_c_during_an_import_is_not_swallowed(tmp_path, monkeypatch):
    """A library that guards an optional import with a bare except swallowed a Ctrl-C that landed in that import
    (under load, start-up then ended in odd numpy errors or simply went on); it is now delivered after the import."""
    (tmp_path / "ctrl_c_inner.py").write_text("import signal\nsignal.raise_signal(signal.SIGINT)\nsum(range(1000))\n"
                                              "COMPLETE = True\n")
    (tmp_path / "ctrl_c_outer.py").write_text("try:\n    import ctrl_c_inner\nexcept BaseException:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert _interrupt_arrives(lambda: __import__("ctrl_c_outer"))
        assert sys.modules["ctrl_c_inner"].COMPLETE  # the import itself ran to its end
    finally:
        for name in ("ctrl_c_outer", "ctrl_c_inner"):
            sys.modules.pop(name, None)


# --------------------------------------------------------------------------------------------------- nothing left
def test_a_failed_stream_check_leaves_no_folder_no_manifest_and_no_export(tmp_path, capsys, monkeypatch):
    """An unreadable image is found after the output folder was made and the split manifest written: both go again,
    also the folder's missing parents; an existing empty --out stays empty; no --export folder appears."""
    monkeypatch.chdir(tmp_path)
    data = _image_folder(tmp_path / "data", 2)
    (data / "c1" / "0.png").write_bytes(b"GIF89a broken")
    tiny = str(_tiny_folder_preset(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for out in (tmp_path / "a" / "b" / "run", empty):
        code, err = _main(capsys, "--preset", tiny, "--data-root", str(data), "--out", str(out),
                          "--export", str(tmp_path / "exports" / "x"), benchmark="imagenet_r")
        _one_line_error(code, err, "1 of the stream's 6 image files cannot be read", str(data / "c1" / "0.png"))
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------------------------------- one class
class LossRecorder(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.losses: dict[int, list[float]] = {}

    def after_backward(self, strategy, **kwargs):
        self.losses.setdefault(strategy.experience.current_experience, []).append(float(strategy.loss.detach()))


def test_one_class_per_experience_learns_through_classifier_alignment(tmp_path):
    """Digits in 10 experiences of one class: refused up front without classifier alignment (nothing could learn to
    tell the classes apart); with alignment on raw logits every class is learned from the stored statistics, far
    above chance (10 %)."""
    base = {"out": str(tmp_path / "run"), "n_experiences": 10, "epochs": 1, "progress": False, "diagnostics": False}
    for alignment in (None, {}):
        with pytest.raises(C.ConfigError, match="one class per experience.*logit_normalization"):
            P.layered_config(P.DEMO_PRESET, None, {**base, "classifier_alignment": alignment})
    config = P.layered_config(P.DEMO_PRESET, None, {
        **base, "classifier_alignment": {"logit_normalization": False, "epochs": 30, "seed": 0}})
    recorder = LossRecorder()
    threads = torch.get_num_threads()
    try:
        results = loop.run_experiment(config, extra_plugins=lambda seed: [recorder], log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    assert all(loss == 0 for t in range(10) for loss in recorder.losses[t])  # a lone class gives the loss nothing
    assert results["seeds"][0]["A_last"] > 30, results["seeds"][0]["A_last"]


def test_a_checkpoint_from_before_optional_betas_resumes_with_adams_default(tmp_path):
    """Runs saved before betas became optional recorded Adam's [0.9, 0.999]; a config that leaves them to Adam is the
    same training, not a changed setting. Other betas are a change."""
    from inflora_avalanche.run.resume import check_resume_settings

    config = P.layered_config(P.DEMO_PRESET, None, {"out": str(tmp_path / "run")})
    assert config["optimizer"] == "adam" and config["betas"] is None
    assert check_resume_settings({**config, "betas": [0.9, 0.999]}, config, tmp_path / "checkpoint.safetensors") == {}
    with pytest.raises(C.ConfigError, match="trained with other settings.*betas"):
        check_resume_settings({**config, "betas": [0.8, 0.999]}, config, tmp_path / "checkpoint.safetensors")
