"""The benchmark scripts in their CI-sized CPU configuration, their handling of bad input, and their flag names
(the runner's names for the settings they share with it, the old names kept as aliases)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = ROOT / "benchmarks" / "throughput.py"
DATALOADER = ROOT / "benchmarks" / "dataloader.py"
AGREEMENT = ROOT / "benchmarks" / "precision_agreement.py"
DIAGNOSTICS_DEMO = ROOT / "experiments" / "diagnostics_demo.py"
TARGET_MODULES = ROOT / "benchmarks" / "target_modules.py"
STEP_TIME = ROOT / "benchmarks" / "step_time_vs_tasks.py"
FOLDER_SCAN = ROOT / "benchmarks" / "folder_scan.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)


def test_throughput_ci_config_writes_json(tmp_path):
    out = tmp_path / "t.json"
    proc = _run(THROUGHPUT, "--backbone", "vit_tiny_patch16_224", "--depth", "2", "--embed-dim", "64",
                "--num-heads", "2", "--resolution", "32", "--batch-size", "4", "--rank", "4", "--tasks-finished", "0", "3",
                "--modes", "fast,resum,paper", "--steps", "1", "--warmup", "1", "--cpu-threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert {(r["mode"], r["tasks_finished"]) for r in results} == {
        (m, n) for m in ("fast", "resum", "paper") for n in (0, 3)
    }
    for r in results:
        for key in ("train_img_s", "covariance_img_s", "eval_img_s"):
            assert r[key] > 0
        assert r["finite_loss"] and r["precision"] == "fp32" and r["peak_mem_gib"] is None
        assert r["merged"] == (r["mode"] == "fast")
    assert {(q["baseline"], q["tasks_finished"]) for q in report["ratios"]} == {
        (b, n) for b in ("paper", "resum") for n in (0, 3)
    }
    assert report["step_time_growth"]["fast"]["to_tasks"] == 3
    assert report["environment"]["device"] == "cpu"
    assert "fast vs paper at 3 finished tasks" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert report["config"]["batch_size"] == 4 and report["config"]["cpu_threads"] == 1


def test_throughput_refuses_existing_out(tmp_path, capsys):
    out = tmp_path / "exists.json"
    out.write_text("{}")
    assert _load(THROUGHPUT).main(["--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "{}"


def test_dataloader_ci_config_writes_json(tmp_path):
    out = tmp_path / "d.json"
    proc = _run(DATALOADER, "--resolution", "32", "--batch-size", "8", "--batches", "2", "--num-workers", "0",
                "--images", "64", "--folder-size", "64", "48", "--cpu-threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"pil", "tensor-index", "tensor", "tensor-batched", "avalanche", "folder"}
    for name, r in results.items():
        assert r["img_s"] > 0 and r["finite"]
        if name == "tensor-index":  # the loader alone: raw uint8 CIFAR-sized batches
            assert r["batch_shape"] == [8, 3, 32, 32] and r["dtype"] == "uint8"
        else:
            assert r["batch_shape"] == [8, 3, 32, 32] and r["dtype"] == "float32"
    assert "synthetic 64x48 JPEGs" in report["sources"]["folder"]


def test_paper_emulation_computes_the_same_function():
    # The benchmark's "paper" adapters re-sum dense deltas; they must give the merged model's outputs.
    bench = _load(THROUGHPUT)
    args = bench.parse_args(["--backbone", "vit_tiny_patch16_224", "--depth", "2", "--embed-dim", "32",
                             "--num-heads", "2", "--resolution", "32", "--rank", "3", "--classes-per-task", "2"])
    x = torch.rand(2, 3, 32, 32)
    outs = {}
    for mode in ("fast", "resum", "paper"):
        model = bench.build_model(args, tasks_finished=3)
        bench.configure_mode(model, mode)
        with torch.no_grad():
            outs[mode] = model(x)
    assert outs["fast"].shape == (2, 8)
    assert torch.allclose(outs["fast"], outs["resum"], atol=1e-4)
    assert torch.allclose(outs["fast"], outs["paper"], atol=1e-4)
    model = bench.build_model(args, tasks_finished=3)
    adapter = next(a for _, a in model.adapters())
    assert adapter.num_finished == 9 and adapter.merged and adapter.up.abs().sum() > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "fast,turbo"], "--modes"),
        (["--batch-size", "0"], "--batch-size"),
        (["--cpu-threads", "0"], "--cpu-threads"),
        (["--tasks-finished", "-1"], "--tasks-finished"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--backbone", "no_such_vit", "--tasks-finished", "0"], "no_such_vit"),
        (["--no-such-flag"], "unrecognized"),
    ],
)
def test_throughput_bad_input_is_one_line_exit_2(argv, message, capsys):
    bench = _load(THROUGHPUT)
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [(["--paths", "pil,gpu"], "--paths"), (["--num-workers", "-1"], "--num-workers"),
     (["--folder", "/no/such/folder"], "--folder"), (["--cifar-root", "/no/such", "--paths", "tensor"], "CIFAR-100")],
)
def test_dataloader_bad_input_is_one_line_exit_2(argv, message, capsys):
    bench = _load(DATALOADER)
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_dataloader_refuses_existing_out(tmp_path, capsys):
    out = tmp_path / "exists.json"
    out.write_text("{}")
    assert _load(DATALOADER).main(["--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "{}"


def test_compile_failure_falls_back_to_eager(monkeypatch):
    bench = _load(THROUGHPUT)
    args = bench.parse_args(["--backbone", "vit_tiny_patch16_224", "--depth", "1", "--embed-dim", "32",
                             "--num-heads", "2", "--resolution", "32", "--batch-size", "2", "--rank", "2",
                             "--compile"])

    def broken_compile(*_args, **_kwargs):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(bench.torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed, running eager"):
        b = bench.Bench(args, "fast", tasks_finished=1)
    assert b.compile_status == "failed (RuntimeError: no C++ compiler)"
    assert b.features is b.model.backbone
    b.train_step()
    b.eval_step()
    assert torch.isfinite(b.loss_sum) and int(b.correct) >= 0


# --------------------------------------------------------------------------------------------------- flag names
def _parse(module, argv):
    return module.parse_args(argv)


def test_throughput_old_flag_names_are_aliases():
    bench = _load(THROUGHPUT)
    new = _parse(bench, ["--batch-size", "3", "--cpu-threads", "2"])
    old = _parse(bench, ["--batch", "3", "--threads", "2"])
    assert (new.batch_size, new.cpu_threads) == (old.batch_size, old.cpu_threads) == (3, 2)


def test_dataloader_old_flag_names_are_aliases():
    bench = _load(DATALOADER)
    new = _parse(bench, ["--batch-size", "3", "--num-workers", "1", "--cpu-threads", "2"])
    old = _parse(bench, ["--batch", "3", "--workers", "1", "--threads", "2"])
    assert (new.batch_size, new.num_workers, new.cpu_threads) == (old.batch_size, old.num_workers, old.cpu_threads)
    assert (new.batch_size, new.num_workers, new.cpu_threads) == (3, 1, 2)


def test_precision_agreement_flag_names(tmp_path):
    for sub in ("train", "val"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    bench = _load(AGREEMENT)
    new = _parse(bench, ["--data-root", str(tmp_path / "data"), "--weights", str(weights), "--classes", "4",
                         "--n-experiences", "2", "--max-train-per-class", "5", "--max-test-per-class", "6",
                         "--batch-size", "7", "--cpu-threads", "2", "--seeds", "0", "1"])
    old = _parse(bench, ["--data", str(tmp_path / "data"), "--weights", str(weights), "--classes", "4",
                         "--tasks", "2", "--train-per-class", "5", "--test-per-class", "6", "--batch", "7",
                         "--threads", "2", "--seeds", "0", "1"])
    assert vars(new) == vars(old)
    assert (new.n_experiences, new.max_train_per_class, new.max_test_per_class, new.batch_size, new.cpu_threads,
            new.seeds) == (2, 5, 6, 7, 2, [0, 1])
    with pytest.raises(SystemExit):
        _parse(bench, ["--data-root", str(tmp_path / "data"), "--weights", str(weights), "--classes", "3"])


def test_diagnostics_demo_flag_names(monkeypatch):
    monkeypatch.delenv("INFLORA_TEST_DATA", raising=False)
    monkeypatch.delenv("INFLORA_TEST_WEIGHTS", raising=False)
    demo = _load(DIAGNOSTICS_DEMO)
    new = demo.parse_args(["--data-root", "d", "--weights", "w", "--n-experiences", "3", "--max-train-per-class", "9",
                           "--max-test-per-class", "8", "--resolution", "28", "--cpu-threads", "1"])
    old = demo.parse_args(["--data", "d", "--weights", "w", "--experiences", "3", "--train-per-class", "9",
                           "--test-per-class", "8", "--img-size", "28", "--threads", "1"])
    assert vars(new) == vars(old)
    assert (new.data_root, new.n_experiences, new.max_train_per_class, new.max_test_per_class, new.resolution,
            new.cpu_threads) == ("d", 3, 9, 8, 28, 1)
    assert demo.parse_args(["--replot"]).replot  # redrawing needs neither data nor weights
    with pytest.raises(SystemExit):
        demo.parse_args([])  # no data: says to pass --data-root or set INFLORA_TEST_DATA
    monkeypatch.setenv("INFLORA_TEST_DATA", "from-env")
    monkeypatch.setenv("INFLORA_TEST_WEIGHTS", "w-env")
    args = demo.parse_args([])
    assert (args.data_root, args.weights) == ("from-env", "w-env")


RUNNER_NAMES = {"--batch-size", "--num-workers", "--cpu-threads", "--data-root", "--resolution", "--n-experiences",
                "--max-train-per-class", "--max-test-per-class", "--weights"}
OLD_NAMES = {"--batch", "--workers", "--threads", "--data", "--img-size", "--experiences", "--tasks",
             "--train-per-class", "--test-per-class"}


@pytest.mark.parametrize("script", [THROUGHPUT, DATALOADER, AGREEMENT, DIAGNOSTICS_DEMO, TARGET_MODULES, STEP_TIME],
                         ids=lambda p: p.name)
def test_help_uses_the_runner_names_and_shows_defaults_once(script):
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    words = set(text.replace(",", " ").replace("[", " ").replace("]", " ").split())
    assert not words & OLD_NAMES, words & OLD_NAMES  # old names are accepted but not listed
    assert words & RUNNER_NAMES
    assert "(default: None)" not in text and "/work/" not in text and "shared/" not in text
    # one default per option at most
    for block in text.split("\n  --")[1:]:
        assert block.count("(default") <= 1, block


@pytest.mark.parametrize("script", [THROUGHPUT, DATALOADER, AGREEMENT, DIAGNOSTICS_DEMO, TARGET_MODULES, STEP_TIME,
                                    FOLDER_SCAN], ids=lambda p: p.name)
def test_docstrings_hold_no_machine_paths(script):
    source = script.read_text()
    assert "/work/" not in source and "shared/data" not in source and "shared/weights" not in source


def test_step_time_benchmark_writes_json(tmp_path):
    """InfLoRA's step does not grow with finished tasks (they are merged); SD-LoRA's old branches stay live."""
    out = tmp_path / "steps.json"
    proc = _run(STEP_TIME, "--backbone", "vit_tiny_patch16_224", "--resolution", "32", "--finished-tasks", "0", "3",
                "--steps", "1", "--warmup", "0", "--rank", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [row["finished_tasks"] for row in report["rows"]] == [0, 3]
    assert all(row[m]["median_s"] > 0 for row in report["rows"] for m in ("inflora", "sd_lora"))


def test_folder_scan_benchmark_writes_json_and_counts_a_truncated_image(tmp_path):
    """The header check misses a JPEG cut in half; the decode check the runner makes finds it."""
    for c in range(2):
        for i in range(3):
            path = tmp_path / "data" / f"c{c}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(3 * c + i).integers(0, 256, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=95)
    whole = (tmp_path / "data" / "c1" / "2.jpg").read_bytes()
    (tmp_path / "data" / "c1" / "2.jpg").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "scan.json"
    proc = _run(FOLDER_SCAN, "--data-root", str(tmp_path / "data"), "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert results["files"] == 6 and results["header_check_unreadable"] == 0 and results["decode_check_unreadable"] == 1
    assert all(results[k] > 0 for k in ("scan_s", "scan_with_manifest_s", "imagefolder_s", "decode_check_s"))
    assert _run(FOLDER_SCAN, "--data-root", str(tmp_path / "data"), "--out", str(out)).returncode == 2  # exists
