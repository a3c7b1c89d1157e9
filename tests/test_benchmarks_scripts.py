"""The two benchmark scripts in their CI-sized CPU configuration, plus their handling of bad input."""

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
                "--num-heads", "2", "--resolution", "32", "--batch", "4", "--rank", "4", "--tasks-finished", "0", "3",
                "--modes", "fast,resum,paper", "--steps", "1", "--warmup", "1", "--threads", "1", "--out", str(out))
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


def test_throughput_refuses_existing_out(tmp_path, capsys):
    out = tmp_path / "exists.json"
    out.write_text("{}")
    assert _load(THROUGHPUT).main(["--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "{}"


def test_dataloader_ci_config_writes_json(tmp_path):
    out = tmp_path / "d.json"
    proc = _run(DATALOADER, "--resolution", "32", "--batch", "8", "--batches", "2", "--workers", "0",
                "--images", "64", "--folder-size", "64", "48", "--threads", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"pil", "tensor-index", "tensor", "tensor-batched", "avalanche", "folder", "folder-cached"}
    for name, r in results.items():
        assert r["img_s"] > 0 and r["finite"]
        if name == "tensor-index":  # the loader alone: raw uint8 CIFAR-sized batches
            assert r["batch_shape"] == [8, 3, 32, 32] and r["dtype"] == "uint8"
        else:
            assert r["batch_shape"] == [8, 3, 32, 32] and r["dtype"] == "float32"
    assert report["results"]["folder-cached"]["cache_fill_img_s"] > 0
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
        (["--batch", "0"], "--batch"),
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
    [(["--paths", "pil,gpu"], "--paths"), (["--workers", "-1"], "--workers"),
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


def test_resize_cache_reuses_and_matches_decoding(tmp_path):
    from inflora_avalanche.cached_folder import CachedImageFolder, ResizeCache, resize_shorter

    root = tmp_path / "imgs" / "a"
    root.mkdir(parents=True)
    arr = (np.arange(40 * 60 * 3) % 251).astype(np.uint8).reshape(40, 60, 3)
    Image.fromarray(arr).save(root / "x.png")
    cache = ResizeCache(tmp_path / "cache", 20)
    ds = CachedImageFolder.from_folder(tmp_path / "imgs", cache=cache)
    first, label = ds[0]
    assert label == 0 and first.size == (30, 20)
    entries = list((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 1
    expected = np.asarray(resize_shorter(Image.fromarray(arr), 20))
    assert np.array_equal(np.asarray(first), expected)
    np.save(entries[0], np.zeros_like(expected))  # a second read comes from the cache, not the file
    assert np.asarray(ds[0][0]).max() == 0
    with pytest.raises(ValueError, match="cache size"):
        ResizeCache(tmp_path / "c2", 0)
    with pytest.raises(FileNotFoundError, match="no images"):
        CachedImageFolder.from_folder(tmp_path / "cache")


def test_compile_failure_falls_back_to_eager(monkeypatch):
    bench = _load(THROUGHPUT)
    args = bench.parse_args(["--backbone", "vit_tiny_patch16_224", "--depth", "1", "--embed-dim", "32",
                             "--num-heads", "2", "--resolution", "32", "--batch", "2", "--rank", "2", "--compile"])

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
