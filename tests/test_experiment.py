"""The experiment runner: presets, validation and one-line errors, the offline path, the demo end to end."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from inflora_avalanche import experiment as E
from inflora_avalanche.results import average_incremental_accuracy

REPO = Path(__file__).resolve().parents[1]
PAPER_PRESETS = ["cifar100_inflora", "cifar100_inflora_b5", "cifar100_inflora_ca", "imagenet_r_5", "imagenet_r_10",
                 "imagenet_r_20", "domainnet_inflora"]
TINY_BACKBONE = {"img_size": 8, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


def test_presets_follow_the_paper_table():
    assert set(PAPER_PRESETS + [E.DEMO_PRESET]) <= set(E.list_presets())
    # every preset validates (folder presets have no default data folder)
    configs = {name: E.load_config(name, {"data_root": E.load_preset(name).get("data_root") or "images"})
               for name in E.list_presets()}
    for name in PAPER_PRESETS:
        c = configs[name]
        assert c["normalize"] is False and c["resolution"] == 224 and c["batch_size"] == 128
        assert c["backbone"] == "vit_base_patch16_224.augreg_in21k" and c["seeds"] == [0, 1, 2, 3, 4]
    cifar = configs["cifar100_inflora"]
    assert (cifar["n_experiences"], cifar["epochs"], cifar["optimizer"], cifar["lr"], cifar["rank"], cifar["memory"]) == (
        10, 20, "adam", 5e-4, 10, "dualgpm")
    assert cifar["class_order"] is None and (cifar["lamb"], cifar["lame"]) == (0.95, 1.0)
    b5 = configs["cifar100_inflora_b5"]
    assert (b5["adapted_blocks"], b5["lr"], b5["memory"]) == (5, 1e-3, "gpm")
    ca = configs["cifar100_inflora_ca"]
    assert (ca["optimizer"], ca["lr"], ca["head_lr"], ca["weight_decay"], ca["lr_schedule"], ca["milestones"]) == (
        "sgd", 1e-3, 1e-2, 1e-3, "step", [18])
    assert (ca["rank"], ca["memory"], ca["reset_final_norm"]) == (5, "gpm", True)
    assert ca["classifier_alignment"] == {}
    for n in (5, 10, 20):
        r = configs[f"imagenet_r_{n}"]
        assert (r["n_experiences"], r["epochs"], r["lr"], r["lamb"], r["memory"]) == (n, 50, 5e-4, 0.98, "dualgpm")
    d = configs["domainnet_inflora"]
    assert (d["n_experiences"], d["epochs"], d["optimizer"], d["lr"], d["head_lr"], d["milestones"], d["rank"],
            d["memory"]) == (5, 5, "sgd", 5e-3, 1e-2, [4], 30, "gpm")
    assert configs["cifar100_inflora"]["published"] == {"A_last": "86.51 ± 0.73", "A_avg": "91.70 ± 0.32"}


def test_cli_overrides_and_validation():
    args = E.build_parser("split_cifar100").parse_args(
        ["--epochs", "3", "--batch-size", "16", "--seeds", "0", "1", "--no-normalize", "--set", "lr=0.002",
         "--set", "milestones=[2]"])
    config = E.config_from_args(args, "split_cifar100")
    assert (config["epochs"], config["batch_size"], config["seeds"], config["lr"], config["milestones"]) == (
        3, 16, [0, 1], 0.002, [2])
    assert config["preset"] == "cifar100_inflora"
    with pytest.raises(E.ConfigError, match="unknown config key"):
        E.load_config("cifar100_inflora", {"learning_rate": 1})
    with pytest.raises(E.ConfigError, match="unknown preset"):
        E.load_config("no_such_preset")
    with pytest.raises(E.ConfigError, match="epochs must be a positive integer"):
        E.load_config("cifar100_inflora", {"epochs": 0})
    with pytest.raises(E.ConfigError, match="run_imagenet_r.py"):
        E.config_from_args(E.build_parser().parse_args(["--preset", "imagenet_r_10"]), "split_cifar100")
    with pytest.raises(E.ConfigError, match="needs --data-root"):
        E.load_config("imagenet_r_10", {"data_root": ""})


def _main(capsys, *argv, benchmark="split_cifar100"):
    started = time.perf_counter()
    code = E.main(list(argv), benchmark=benchmark)
    captured = capsys.readouterr()
    return code, captured.err.strip(), time.perf_counter() - started


def test_user_errors_are_one_line_with_exit_code_2(capsys, tmp_path, monkeypatch):
    code, err, _ = _main(capsys, "--preset", "nope")
    assert code == 2 and err.startswith("error: unknown preset 'nope'") and "\n" not in err

    code, err, _ = _main(capsys, "--weights", str(tmp_path / "missing.safetensors"))
    assert code == 2 and "missing.safetensors: no such file" in err and "\n" not in err

    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text("{}")
    code, err, _ = _main(capsys, "--out", str(out), "--set", "pretrained=false")
    assert code == 2 and "--overwrite" in err and "\n" not in err
    assert (out / "results.json").read_text() == "{}"  # user results untouched

    # no data and downloads switched off: says where to put CIFAR-100, leaves no empty results folder behind
    empty = tmp_path / "no_data"
    code, err, elapsed = _main(capsys, "--data-root", str(empty), "--no-download", "--set", "pretrained=false",
                               "--out", str(tmp_path / "run"))
    assert code == 2 and "cifar-100-python" in err and str(empty) in err and "\n" not in err
    assert elapsed < 30 and not (tmp_path / "run").exists()

    # pretrained weights neither cached nor reachable: says to pass --weights
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    code, err, elapsed = _main(capsys, "--data-root", str(empty), "--out", str(tmp_path / "run2"))
    assert code == 2 and "--weights" in err and "not cached" in err and "\n" not in err
    assert elapsed < 30


def _tiny_preset(tmp_path: Path, **overrides) -> Path:
    preset = {
        "benchmark": "folder", "n_experiences": 2, "resolution": 8, "backbone": "vit_tiny_patch16_224",
        "pretrained": False, "backbone_kwargs": TINY_BACKBONE, "rank": 2, "epochs": 1, "batch_size": 8,
        "seeds": [0], "device": "cpu", "num_workers": 0, "progress": False, "cpu_threads": 1, **overrides,
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(preset))
    return path


def _folder(root: Path, n_classes: int = 4, per_class: int = 5) -> Path:
    for c in range(n_classes):
        for i in range(per_class):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_corrupt_image_is_reported_by_path(capsys, tmp_path):
    data = _folder(tmp_path / "data")
    (data / "c1" / "3.png").write_bytes(b"garbage")
    preset = _tiny_preset(tmp_path)
    code, err, _ = _main(capsys, "--preset", str(preset), "--data-root", str(data), "--out", str(tmp_path / "out"),
                         benchmark="imagenet_r")
    assert code == 2 and "\n" not in err
    assert "cannot read image" in err and str(data / "c1" / "3.png") in err


def test_runner_pieces_for_reuse(tmp_path):
    """build_* functions work on their own; config keys attach plugins; reset_final_norm gives an identity norm."""
    from avalanche.core import SupervisedPlugin

    class Marker(SupervisedPlugin):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag
            self.experiences = 0

        def after_training_exp(self, strategy, **kwargs):
            self.experiences += 1

    E.register_plugin("_test_marker", lambda value, config: Marker(value))
    try:
        data = _folder(tmp_path / "data")
        config = E.load_config(str(_tiny_preset(tmp_path)), {"data_root": str(data), "_test_marker": "x",
                                                             "reset_final_norm": True})
        bench, info = E.build_benchmark(config, tmp_path / "out")
        assert info.num_classes == 4 and (tmp_path / "out" / "folder_split_seed0.json").is_file()
        model = E.build_model(config, num_classes=info.num_classes)
        norm = model.backbone.norm
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.weight.requires_grad
        evaluator, _ = E.build_evaluator(config)
        strategy = E.build_strategy(config, model, evaluator)
        markers = [p for p in strategy.plugins if isinstance(p, Marker)]
        assert len(markers) == 1 and markers[0].tag == "x"
        strategy.train(bench.train_stream[0], num_workers=0)
        assert markers[0].experiences == 1
    finally:
        E.PLUGIN_FACTORIES.pop("_test_marker")
        E.DEFAULTS.pop("_test_marker")


def test_demo_runs_offline_and_writes_results(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "run_split_cifar.py"), "--demo", "--out", str(out),
         "--no-progress", "--export", str(tmp_path / "export")],
        capture_output=True, text=True, env=env, timeout=170,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DEMO" in proc.stdout and "NOT the benchmark" in proc.stdout
    assert elapsed < 170
    for name in ("results.json", "summary.txt", "accuracy_curve.png", "accuracy_matrix.png", "config.json",
                 "seed0/metrics.json", "seed0/log.txt", "seed0/csv/eval_results.csv"):
        assert (out / name).is_file(), name
    assert any((out / "seed0" / "tensorboard").iterdir())
    results = json.loads((out / "results.json").read_text())
    run = results["seeds"][0]
    assert results["demo"] is True and len(run["A_t"]) == 5
    assert run["A_avg"] == pytest.approx(average_incremental_accuracy(run["A_t"]))
    # A_t from the accuracy matrix (sample-weighted) equals Avalanche's stream accuracy over the seen experiences
    assert run["A_t"] == pytest.approx(run["avalanche_stream_accuracy"], abs=1e-6)
    assert run["test_sizes"] == [72, 72, 72, 72, 71]  # 20% of each digit class, seeded
    assert run["A_t"][0] > 80 and run["task_aware_last"] > 75  # chance is 50% per two-class task
    for ta_row, row in zip(run["task_aware_matrix"], run["accuracy_matrix"]):
        for ta, acc in zip(ta_row, row):
            if acc is not None:
                assert ta >= acc - 1e-9  # knowing the task can only help
    assert "A_last" in (out / "summary.txt").read_text()
    # diagnostics are on by default: one record per adapted layer and experience, and the heatmaps
    diagnostics = json.loads((out / "seed0" / "diagnostics" / "subspace_diagnostics.json").read_text())
    records = diagnostics["records"]
    assert len({r["experience"] for r in records}) == 5 and len(records) == 5 * len({r["layer"] for r in records})
    assert (out / "seed0" / "diagnostics" / "subspace_heatmaps.png").is_file()
    # --export: a plain timm checkpoint after every experience; the last one predicts all 10 digits
    exported = sorted((tmp_path / "export" / "seed0").glob("after_exp*.safetensors"))
    assert [p.name for p in exported] == [f"after_exp{t}.safetensors" for t in range(1, 6)]
    meta = json.loads(exported[-1].with_suffix(".json").read_text())
    assert meta["num_classes"] == 10 and sorted(meta["class_order"]) == list(range(10))


def test_worker_errors_are_shortened_to_the_original_message(tmp_path):
    """An unreadable image met in a DataLoader worker process still ends as one line naming the file."""
    from inflora_avalanche.benchmarks import ImageFileDataset, ImageLoadError

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    loader = torch.utils.data.DataLoader(ImageFileDataset([(str(bad), 0)]), num_workers=1, collate_fn=list)
    with pytest.raises(ImageLoadError) as info:
        next(iter(loader))
    assert "Traceback" in str(info.value)  # torch wraps the worker's traceback into the message
    line = E._one_line(info.value)
    assert line.startswith("cannot read image") and str(bad) in line and "Traceback" not in line


def test_set_can_clear_a_preset_value():
    args = E.build_parser("imagenet_r").parse_args(
        ["--preset", "tinyimagenet_dinov2", "--data-root", "x", "--set", "max_train_per_class=null"])
    config = E.config_from_args(args, "imagenet_r")
    assert config["max_train_per_class"] is None and config["max_test_per_class"] == 25


def test_ca_preset_attaches_classifier_alignment():
    from inflora_avalanche.alignment import ClassifierAlignmentPlugin

    plugins = E.build_config_plugins(E.load_config("cifar100_inflora_ca"))
    assert len(plugins) == 1 and isinstance(plugins[0], ClassifierAlignmentPlugin)
    assert E.build_config_plugins(E.load_config("cifar100_inflora")) == []
    with pytest.raises(E.ConfigError, match="classifier_alignment"):
        E.build_config_plugins(E.load_config("cifar100_inflora_ca", {"classifier_alignment": {"no_such_arg": 1}}))


def test_device_augment_cifar_path_feeds_uint8_and_augments_on_the_device(tmp_path, monkeypatch):
    from inflora_avalanche import device_augment as D

    (tmp_path / "cifar-100-python").mkdir()
    gen = torch.Generator().manual_seed(0)
    fake = lambda root, train=True: D.BatchedTensorImageDataset(  # noqa: E731
        torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=gen), [i % 100 for i in range(200)]
    )
    monkeypatch.setattr(D, "cifar100_uint8", fake)
    config = E.load_config("cifar100_inflora", {"data_root": str(tmp_path), "resolution": 48}, {"device_augment": True})
    bench, info = E.build_benchmark(config)
    assert info.extra["device_augment"] and len(bench.train_stream) == 10
    x, y = bench.train_stream[0].dataset[0][:2]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)  # no per-sample transform: workers only index
    model = E.build_model({**config, "backbone": "vit_tiny_patch16_224", "pretrained": False,
                           "backbone_kwargs": {"patch_size": 16, "depth": 1}, "rank": 2})
    strategy = E.build_strategy(config, model, evaluator=None)
    assert isinstance(strategy.input_transform, D.DeviceAugment)
    out = strategy.prepare_input(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), True)
    assert out.shape == (4, 3, 48, 48) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    with pytest.raises(E.ConfigError, match="device_augment"):
        E.build_strategy({**config, "benchmark": "folder"}, model, evaluator=None)


def test_script_short_preset_names():
    args = E.build_parser("split_cifar100").parse_args(["--preset", "inflora_ca"])
    config = E.config_from_args(args, "split_cifar100")
    assert config["preset"] == "cifar100_inflora_ca" and "classifier_alignment" in config


def test_export_folder_is_checked_before_any_compute(capsys, tmp_path):
    taken = tmp_path / "exports" / "seed0"
    taken.mkdir(parents=True)
    (taken / "after_exp1.safetensors").write_bytes(b"earlier result")
    code, err, _ = _main(capsys, "--demo", "--out", str(tmp_path / "run"), "--export", str(tmp_path / "exports"))
    assert code == 2 and "already holds exported models" in err and "\n" not in err
    assert (taken / "after_exp1.safetensors").read_bytes() == b"earlier result"
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    code, err, _ = _main(capsys, "--demo", "--out", str(tmp_path / "run"), "--export", str(tmp_path / "file"))
    assert code == 2 and "is a file" in err
