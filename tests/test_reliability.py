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

from inflora_avalanche.run import build, cli, loop
from inflora_avalanche.run import config as C
from inflora_avalanche.run import presets as P
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
    state = load_checkpoint(checkpoint)
    assert state["experiences_done"] == 1 and state["seed"] == 0
    assert not (out / "results.json").exists()
    assert json.loads((out / "seed0" / "metrics.json").read_text())["experiences_done"] == 1
    log_before = (out / "seed0" / "log.txt").read_text()

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after experience 1/5" in resumed.stdout
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
    # other settings may change (e.g. a lower learning rate after a divergence); they are reported
    assert check_resume({**config, "lr": 0.001}, build.build_stream(config)[1], state, interrupted_run) == {
        "lr": (0.01, 0.001)}


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
    demo = ["--demo", "--no-progress"]
    out = str(tmp_path / "out")
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
    }


BAD_INPUTS = ["unknown preset", "missing data folder", "empty data folder", "classes do not divide (folder)",
              "classes do not divide (fixed)", "rank >= width", "lamb out of range", "lame below lamb",
              "unwritable output folder", "output path under a file", "existing output folder",
              "--resume with --overwrite", "--resume without --out", "--resume on results without checkpoint",
              "weights of another architecture", "global batch not divisible by processes"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_before_training(case, tmp_path, capsys, monkeypatch):
    argv, benchmark, needle = _bad_cases(tmp_path)[case]
    if case.startswith("global batch"):
        monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a run without --out would write results/... here
    before = sorted(p.name for p in tmp_path.rglob("*"))
    started = time.perf_counter()
    code, err = _main(capsys, *argv, benchmark=benchmark)
    _one_line_error(code, err, needle)
    assert time.perf_counter() - started < 60  # no training happened
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created, nothing removed
    if case == "existing output folder":
        assert (tmp_path / "existing" / "results.json").read_text() == "{}"


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
