"""The runner: config schema and CLI (flags, defaults, layering, one-line errors before heavy imports), the offline
path, the demo end to end, readable output, the pieces for reuse."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from inflora_avalanche import streams as S
from inflora_avalanche.methods import get_method
from inflora_avalanche.run import build, cli
from inflora_avalanche.run import config as C
from inflora_avalanche.run import presets as P
from inflora_avalanche.run.parallel import one_line
from inflora_avalanche.results import average_incremental_accuracy

REPO = Path(__file__).resolve().parents[1]
PAPER_PRESETS = ["cifar100_inflora", "cifar100_inflora_b5", "cifar100_inflora_ca", "imagenet_r_5", "imagenet_r_10",
                 "imagenet_r_20", "domainnet_inflora"]
TINY_BACKBONE = {"img_size": 8, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


def test_every_preset_and_method_validates():
    """Every shipped preset, under its own method and under every other method, gives a valid config."""
    presets = P.list_presets()
    assert set(PAPER_PRESETS + [P.DEMO_PRESET, "synthetic_smoke", "tinyimagenet_dinov2"]) <= set(presets)
    assert set(P.list_method_presets()) == {"inflora", "inflora_b5", "inflora_ca", "seq_lora", "linear_probe", "naive",
                                            "ewc", "lwf", "l2p", "joint", "sd_lora"}
    for name in presets:
        stream = S.get_stream(P.load_preset(name).get("benchmark", C.DEFAULTS["benchmark"]))
        root = {} if stream.data_root == "unused" else {"data_root": P.load_preset(name).get("data_root") or "images"}
        config = P.layered_config(name, None, root)
        assert config["preset"] == name and config["method"] == P.load_preset(name).get("method", "inflora")
        assert get_method(config["method"])
    for method in P.list_method_presets():
        config = P.layered_config("synthetic_smoke", method)
        assert config["method"] == method


def test_method_settings_of_a_preset_apply_to_its_own_method_only():
    cifar = P.layered_config("cifar100_inflora")
    assert (cifar["lr"], cifar["rank"], cifar["memory"], cifar["epochs"]) == (5e-4, 10, "dualgpm", 20)
    ca = P.layered_config("cifar100_inflora_ca")
    assert (ca["optimizer"], ca["lr"], ca["head_lr"], ca["milestones"], ca["reset_final_norm"]) == (
        "sgd", 1e-3, 1e-2, [18], True)
    # the same stream and budget with EWC: EWC's own learning rates, not InfLoRA+CA's SGD settings
    ewc = P.layered_config("cifar100_inflora_ca", "ewc")
    assert (ewc["optimizer"], ewc["lr"], ewc["backbone_lr"], ewc["ewc_lambda"], ewc["lr_schedule"]) == (
        "adam", 5e-4, 1e-5, 1e4, "constant")
    assert (ewc["epochs"], ewc["batch_size"], ewc["benchmark"], ewc["reset_final_norm"]) == (20, 128, "split_cifar100",
                                                                                             False)
    # ImageNet-R's lamb 0.98 stays with InfLoRA; the b5 variant brings its own
    assert P.layered_config("imagenet_r_10")["lamb"] == 0.98
    assert P.layered_config("imagenet_r_10", "inflora_b5")["memory"] == "gpm"


def test_the_schema_is_the_one_source_of_flags_defaults_and_resume_identity():
    parser = cli.run_parser(None, P.merge_layers("imagenet_r_10"), "run")
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for field in C.FIELDS:
        assert field.flag in flags, field.name
    text = parser.format_help()
    assert "(default: None)" not in text and "default: unset) (default" not in text
    assert "0.98" in text.split("--lamb", 1)[1].split("--lame", 1)[0]  # the preset's value is the default shown
    assert {"rank", "lamb", "lame", "memory", "backbone", "seeds", "method", "preset"} <= C.RESUME_IDENTITY_KEYS
    assert {"device", "num_workers", "out", "progress"} <= C.RESUME_FREE_KEYS
    assert not C.RESUME_IDENTITY_KEYS & C.RESUME_FREE_KEYS


def test_help_and_config_errors_come_before_heavy_imports(tmp_path):
    """``--help`` and a configuration error never import torch, timm or Avalanche (that takes seconds)."""
    probe = (
        "import sys\n"
        "from inflora_avalanche.run.cli import main\n"
        "codes = [main(['run', '--help']), main(['run', '--lamb', '1.5']), main(['compare', '--help']),\n"
        "         main(['run', '--preset', 'imagenet_r_10', '--method', 'nope']), main(['presets'])]\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'avalanche') if m in sys.modules)\n"
        "print('RESULT', codes, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT [0, 2, 0, 2, 0] []" in proc.stdout, proc.stdout[-500:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "lamb" in errors[0] and "unknown method 'nope'" in errors[1]


def test_console_script_and_module_entry_points(tmp_path):
    script = Path(sys.executable).with_name("inflora-avalanche")
    assert script.is_file(), "pip install . installs the inflora-avalanche console script"
    for command in ([str(script), "presets"], [sys.executable, "-m", "inflora_avalanche", "presets"]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "cifar100_inflora" in proc.stdout and "imagenet_r_10_ca" in proc.stdout and "ewc" in proc.stdout


def test_cli_overrides_and_validation():
    config = cli.config_from_argv(["--epochs", "3", "--batch-size", "16", "--seeds", "0", "1", "--no-normalize",
                                   "--lr", "0.002", "--lr-schedule", "step", "--milestones", "2", "--set", "gamma=0.5"],
                                  "split_cifar100")
    assert (config["epochs"], config["batch_size"], config["seeds"], config["lr"], config["milestones"],
            config["gamma"]) == (3, 16, [0, 1], 0.002, [2], 0.5)
    assert config["preset"] == "cifar100_inflora" and config["method"] == "inflora"
    with pytest.raises(C.ConfigError, match="unknown setting.*learning_rate"):
        P.layered_config("cifar100_inflora", None, {"learning_rate": 1})
    with pytest.raises(C.ConfigError, match="unknown preset"):
        P.layered_config("no_such_preset")
    with pytest.raises(C.ConfigError, match="epochs .* must be >= 1"):
        P.layered_config("cifar100_inflora", None, {"epochs": 0})
    with pytest.raises(C.ConfigError, match="epochs .* must be an integer"):
        P.layered_config("cifar100_inflora", None, {"epochs": "3"})
    with pytest.raises(C.ConfigError, match="run_imagenet_r.py"):
        cli.config_from_argv(["--preset", "imagenet_r_10"], "split_cifar100")
    with pytest.raises(C.ConfigError, match="needs --data-root"):
        P.layered_config("imagenet_r_10", None, {"data_root": None})
    with pytest.raises(C.ConfigError, match="given both as --lr and by --set"):
        cli.config_from_argv(["--lr", "0.1", "--set", "lr=0.2"], "split_cifar100")
    with pytest.raises(C.ConfigError, match="--demo runs its own offline preset.*--preset"):
        cli.config_from_argv(["--demo", "--preset", "cifar100_inflora"], "split_cifar100")
    # the old flag name still works
    assert cli.config_from_argv(["--experiences", "5"], "split_cifar100")["n_experiences"] == 5


def _main(capsys, *argv, benchmark="split_cifar100"):
    started = time.perf_counter()
    code = cli.run_main(list(argv), benchmark=benchmark)
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
    code, err, _ = _main(capsys, "--out", str(out), "--no-pretrained")
    assert code == 2 and "--overwrite" in err and "\n" not in err
    assert (out / "results.json").read_text() == "{}"  # user results untouched

    # no data and downloads switched off: says where to put CIFAR-100, leaves no empty results folder behind
    empty = tmp_path / "no_data"
    code, err, elapsed = _main(capsys, "--data-root", str(empty), "--no-download", "--no-pretrained",
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
    # found before anything trains, every bad file named, and the advice keeps --resume possible
    assert "1 of the stream's 20 image files cannot be read" in err and str(data / "c1" / "3.png") in err
    assert "Replace them with readable images" in err and not (tmp_path / "out").exists()


def test_runner_pieces_for_reuse(tmp_path):
    """The building blocks work on their own: stream, the method's model and strategy, evaluator, extra plugins;
    reset_final_norm gives a frozen identity norm."""
    from avalanche.core import SupervisedPlugin

    class Marker(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.experiences = 0

        def after_training_exp(self, strategy, **kwargs):
            self.experiences += 1

    data = _folder(tmp_path / "data")
    config = P.layered_config(str(_tiny_preset(tmp_path)), None, {"data_root": str(data), "reset_final_norm": True})
    bench, info = build.build_stream(config, tmp_path / "out")
    assert info.num_classes == 4 and (tmp_path / "out" / "folder_split_seed0.json").is_file()
    method = get_method(config["method"])
    model = method.make_model(config, info)
    norm = model.backbone.norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.weight.requires_grad
    evaluator, _ = build.build_evaluator(config)
    marker = Marker()
    strategy = method.make_strategy(config, model, info, evaluator, [marker], "cpu", 0)
    strategy.train(bench.train_stream[0], num_workers=0)
    assert marker.experiences == 1


def test_demo_runs_offline_and_writes_results(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(  # output to a pipe: no progress bars unless asked for
        [sys.executable, str(REPO / "experiments" / "run_split_cifar.py"), "--demo", "--out", str(out),
         "--export", str(tmp_path / "export")],
        capture_output=True, text=True, env=env, timeout=170,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DEMO" in proc.stdout and "NOT the benchmark" in proc.stdout
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) < 40 and not any("%|" in line or "it/s]" in line for line in lines), lines[:50]
    assert "A_last" in proc.stdout and proc.stdout.count("experience 5/5") == 1  # a one-screen summary at the end
    # CSV logs: no column that is empty or zero in every row (Avalanche's validation columns are dropped)
    import csv

    for name in ("training_results.csv", "eval_results.csv"):
        with open(out / "seed0" / "csv" / name) as handle:
            rows = list(csv.DictReader(handle))
        assert rows, name
        for column in rows[0]:
            values = [row[column] for row in rows]
            assert any(v not in ("", "0", "0.0", "0.0000") for v in values), (name, column)
    assert elapsed < 170
    for name in ("results.json", "summary.txt", "accuracy_curve.png", "accuracy_matrix.png", "config.json",
                 "seed0/metrics.json", "seed0/log.txt", "seed0/csv/eval_results.csv"):
        assert (out / name).is_file(), name
    assert any((out / "seed0" / "tensorboard").iterdir())
    # the resolved config as YAML: --config reads it back to the same settings
    assert cli.config_from_argv(["--config", str(out / "config.yaml")]) == json.loads((out / "config.json").read_text())
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
    # --export: a timm folder after every experience; the last one predicts all 10 digits
    exported = sorted((tmp_path / "export" / "seed0").glob("after_exp*"))
    assert [p.name for p in exported] == [f"after_exp{t}" for t in range(1, 6)]
    assert all((p / "model.safetensors").is_file() for p in exported)
    meta = json.loads((exported[-1] / "config.json").read_text())
    assert meta["num_classes"] == 10 and sorted(meta["class_order"]) == list(range(10))
    # the demo trains on [0, 1] pixels without normalisation: that is the export's data config too
    assert (meta["pretrained_cfg"]["mean"], meta["pretrained_cfg"]["std"]) == ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert meta["pretrained_cfg"]["input_size"] == [3, 16, 16]


def test_worker_errors_are_shortened_to_the_original_message(tmp_path):
    """An unreadable image met in a DataLoader worker process still ends as one line naming the file."""
    from inflora_avalanche.streams import ImageFileDataset, ImageLoadError

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    loader = torch.utils.data.DataLoader(ImageFileDataset([(str(bad), 0)]), num_workers=1, collate_fn=list)
    with pytest.raises(ImageLoadError) as info:
        next(iter(loader))
    assert "Traceback" in str(info.value)  # torch wraps the worker's traceback into the message
    line = one_line(info.value)
    assert line.startswith("cannot read image") and str(bad) in line and "Traceback" not in line


def test_set_can_clear_a_preset_value():
    config = cli.config_from_argv(["--preset", "tinyimagenet_dinov2", "--data-root", "x", "--set",
                                   "max_train_per_class=null"], "imagenet_r")
    assert config["max_train_per_class"] is None and config["max_test_per_class"] == 25
    config = cli.config_from_argv(["--preset", "tinyimagenet_dinov2", "--data-root", "x", "--max-test-per-class",
                                   "null"], "imagenet_r")
    assert config["max_test_per_class"] is None


def test_ca_preset_attaches_classifier_alignment():
    from inflora_avalanche.alignment import ClassifierAlignmentPlugin
    from inflora_avalanche.methods.inflora import alignment_plugins

    plugins = alignment_plugins(P.layered_config("cifar100_inflora_ca"))
    assert len(plugins) == 1 and isinstance(plugins[0], ClassifierAlignmentPlugin)
    assert alignment_plugins(P.layered_config("cifar100_inflora")) == []
    with pytest.raises(C.ConfigError, match="classifier_alignment"):
        alignment_plugins(P.layered_config("cifar100_inflora_ca", None, {"classifier_alignment": {"no_such_arg": 1}}))


def test_device_augment_cifar_path_feeds_uint8_and_augments_on_the_device(tmp_path, monkeypatch):
    from inflora_avalanche.device_augment import DeviceAugment
    from inflora_avalanche.streams import cifar as D
    from inflora_avalanche.streams.common import BatchedTensorImageDataset
    from inflora_avalanche.methods.inflora import build_model, inflora_strategy

    (tmp_path / "cifar-100-python").mkdir()
    gen = torch.Generator().manual_seed(0)
    fake = lambda root, train=True: BatchedTensorImageDataset(  # noqa: E731
        torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=gen), [i % 100 for i in range(200)]
    )
    monkeypatch.setattr(D, "cifar100_uint8", fake)
    config = P.layered_config("cifar100_inflora", None, {"data_root": str(tmp_path), "resolution": 48,
                                                          "device_augment": True})
    bench, info = build.build_stream(config)
    assert info.extra["device_augment"] and len(bench.train_stream) == 10
    x, y = bench.train_stream[0].dataset[0][:2]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)  # no per-sample transform: workers only index
    model = build_model({**config, "backbone": "vit_tiny_patch16_224", "pretrained": False,
                         "backbone_kwargs": {"patch_size": 16, "depth": 1}, "rank": 2})
    strategy = inflora_strategy(config, model, info, None, [], "cpu")
    assert isinstance(strategy.input_transform, DeviceAugment)
    out = strategy.prepare_input(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), True)
    assert out.shape == (4, 3, 48, 48) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    with pytest.raises(C.ConfigError, match="--device-augment does nothing for the folder stream"):
        P.layered_config("tinyimagenet_dinov2", None, {"data_root": "x", "device_augment": True})


@pytest.mark.parametrize("preset, stream", [("demo_digits", "digits"), ("synthetic_smoke", "synthetic"),
                                            ("tinyimagenet_dinov2", "folder")])
def test_device_augment_elsewhere_names_the_stream_it_does_nothing_for(preset, stream):
    """--demo --device-augment used to be told that 'folder streams decode in DataLoader workers'."""
    with pytest.raises(C.ConfigError) as info:
        P.layered_config(preset, None, {"data_root": "x" if stream == "folder" else None, "device_augment": True})
    message = str(info.value)
    assert message.startswith("--device-augment does nothing for the " + stream + " stream"), message
    assert "Split CIFAR-100" in message and message.endswith("drop it"), message


def test_script_short_preset_names():
    config = cli.config_from_argv(["--preset", "inflora_ca"], "split_cifar100")
    assert config["preset"] == "cifar100_inflora_ca" and config["classifier_alignment"] == {}


def test_export_folder_is_checked_before_any_compute(capsys, tmp_path):
    taken = tmp_path / "exports" / "seed0" / "after_exp1"
    taken.mkdir(parents=True)
    (taken / "model.safetensors").write_bytes(b"earlier result")
    code, err, _ = _main(capsys, "--demo", "--out", str(tmp_path / "run"), "--export", str(tmp_path / "exports"))
    assert code == 2 and "already holds exported models" in err and "\n" not in err
    assert (taken / "model.safetensors").read_bytes() == b"earlier result"
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    code, err, _ = _main(capsys, "--demo", "--out", str(tmp_path / "run"), "--export", str(tmp_path / "file"))
    assert code == 2 and "is a file" in err


def test_settings_a_method_does_not_use_are_refused_not_ignored():
    for argv, needle in (
        (["--method", "naive", "--optimizer", "sgd"], "naive trains with Adam at a constant rate"),
        (["--method", "naive", "--weight-decay", "0.1"], "--weight-decay only applies"),
        (["--method", "ewc", "--rank", "4"], "--rank only applies"),
        (["--method", "inflora", "--ewc-lambda", "3"], "--ewc-lambda only applies to ewc, not inflora"),
    ):
        with pytest.raises(C.ConfigError, match=needle):
            cli.config_from_argv(["--demo", *argv])
    # the same flags through a method that uses them are fine
    assert cli.config_from_argv(["--demo", "--method", "ewc", "--ewc-lambda", "3"])["ewc_lambda"] == 3.0
    assert "diagnostics" in C.RESUME_IDENTITY_KEYS  # its plugin's state is part of the checkpoint


# --------------------------------------------------------------------------------------------- capabilities
def test_methods_declare_named_capabilities():
    from inflora_avalanche.methods import (CAPABILITIES, DIAGNOSTICS, EXPORT, JOINT, REGISTRY, RESUME, TORCHRUN,
                                           Method, methods_with)

    inflora_family = ["inflora", "inflora_b5", "inflora_ca", "seq_lora"]
    for capability in (EXPORT, TORCHRUN):
        assert methods_with(capability) == inflora_family + ["sd_lora"]
    assert methods_with(DIAGNOSTICS) == inflora_family  # subspace diagnostics: InfLoRA's memory
    assert methods_with(RESUME) == list(REGISTRY) and methods_with(JOINT) == ["joint"]
    assert all(set(m.capabilities) <= set(CAPABILITIES) for m in REGISTRY.values())
    with pytest.raises(ValueError, match="unknown capabilities"):
        Method("x", "finetune:head_model", "finetune:naive_strategy", frozenset({"exprot"}))


def test_a_method_without_a_capability_refuses_its_flag_in_one_line(capsys, tmp_path, monkeypatch):
    from inflora_avalanche.methods import REGISTRY, Method

    owners = "inflora, inflora_b5, inflora_ca, seq_lora, sd_lora"
    code, err, _ = _main(capsys, "--demo", "--method", "naive", "--out", str(tmp_path / "run"), "--export",
                         str(tmp_path / "export"))
    assert code == 2 and "\n" not in err and not (tmp_path / "run").exists()
    assert "--export" in err and "does not apply to naive" in err and owners in err
    cli.check_launch(cli.config_from_argv(["--demo", "--export", str(tmp_path / "export")]))  # InfLoRA exports

    with pytest.raises(C.ConfigError, match="--diagnostics only applies to inflora, inflora_b5, inflora_ca, seq_lora, "
                                            "not lwf: drop it"):
        cli.config_from_argv(["--demo", "--method", "lwf", "--diagnostics"])
    assert not cli.config_from_argv(["--demo", "--method", "lwf", "--no-diagnostics"])["diagnostics"]

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(C.ConfigError, match=f"torchrun does not apply to ewc, only to {owners}: run it in one"):
        cli.check_launch(cli.config_from_argv(["--demo", "--method", "ewc", "--batch-size", "8"]))
    cli.check_launch(cli.config_from_argv(["--demo", "--batch-size", "8"]))
    monkeypatch.delenv("WORLD_SIZE")

    # a method registered without "resume" refuses --resume, naming the methods that have it
    monkeypatch.setitem(REGISTRY, "no_resume", Method("no_resume", "finetune:head_model", "finetune:naive_strategy",
                                                      frozenset()))
    config = {**cli.config_from_argv(["--demo", "--method", "naive"]), "method": "no_resume", "resume": True}
    with pytest.raises(C.ConfigError) as err:
        cli.check_launch(config)
    assert "--resume does not apply to no_resume, only to inflora, " in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- method settings
def _help(tmp_path, *argv, command="run"):
    proc = subprocess.run([sys.executable, "-m", "inflora_avalanche", command, "--help", *argv], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())  # unwrapped


def test_help_shows_the_chosen_methods_own_settings(tmp_path):
    inflora = _help(tmp_path)  # the default preset's method
    assert "settings of inflora" in inflora and "capabilities: diagnostics, export, resume" in inflora
    for flag in ("--rank", "--lamb", "--target-modules", "--qkv-rows", "--weight-decay"):
        assert flag in inflora
    assert "--ewc-lambda" not in inflora and "--backbone-lr" not in inflora and "--l2p-top-k" not in inflora

    probe = _help(tmp_path, "--method", "linear_probe")
    assert "settings of linear_probe" in probe and "no settings of its own" in probe
    for flag in ("--rank", "--target-modules", "--qkv-rows", "--lamb", "--ewc-lambda", "--backbone-lr"):
        assert flag not in probe
    assert "--lr " in probe and "--epochs" in probe and "--benchmark" in probe  # the common settings stay

    ewc = _help(tmp_path, "--method", "ewc")
    assert "--ewc-lambda" in ewc and "--backbone-lr" in ewc and "--rank" not in ewc and "--lwf-alpha" not in ewc

    compare = _help(tmp_path, command="compare")  # runs every method: every section, each naming its methods
    assert "InfLoRA settings (methods: inflora, inflora_b5, inflora_ca, seq_lora)" in compare
    assert "EWC settings (methods: ewc)" in compare and "--l2p-top-k" in compare and "--qkv-rows" in compare


def test_method_settings_are_declared_by_the_methods():
    from inflora_avalanche.methods import REGISTRY, setting_owners

    own = {f.name for m in REGISTRY.values() for f in m.fields}
    assert {f.name for f in C.FIELDS} == {f.name for f in C.COMMON_FIELDS} | own and len(C.FIELDS) == len(C.FIELD_BY_NAME)
    assert not {f.name for f in C.COMMON_FIELDS} & own
    assert {f.name for f in REGISTRY["inflora"].fields} >= {"rank", "lamb", "target_modules", "qkv_rows"}
    assert setting_owners("qkv_rows") == ["inflora", "inflora_b5", "inflora_ca", "seq_lora", "sd_lora"]
    assert setting_owners("lamb") == ["inflora", "inflora_b5", "inflora_ca"]  # seq_lora keeps no subspace memory
    assert setting_owners("reset_final_norm") == ["inflora", "inflora_b5", "inflora_ca", "seq_lora"]
    assert setting_owners("reset_magnitudes") == ["sd_lora"]
    assert setting_owners("ewc_lambda") == ["ewc"] and setting_owners("lr") is None  # lr: common
    assert all(f.group == "method" for m in REGISTRY.values() for f in m.fields)  # a preset's apply to its method
    assert {"target_modules", "qkv_rows"} <= C.RESUME_IDENTITY_KEYS


def test_target_modules_and_qkv_rows_are_checked_once_and_reach_the_model(monkeypatch):
    config = cli.config_from_argv(["--demo"])
    assert config["target_modules"] == ["attn.qkv"] and config["qkv_rows"] == ["k", "v"]
    config = cli.config_from_argv(["--demo", "--target-modules", "attn.qkv", "mlp.fc1", "--qkv-rows", "v", "q"])
    assert config["target_modules"] == ["attn.qkv", "mlp.fc1"] and config["qkv_rows"] == ["q", "v"]  # weight order
    assert cli.config_from_argv(["--demo", "--target-modules", "all-linear"])["target_modules"] == ["all-linear"]
    assert cli.config_from_argv(["--demo", "--method", "seq_lora", "--qkv-rows", "q"])["qkv_rows"] == ["q"]
    for argv, needle in (
        (["--qkv-rows", "k", "x"], "qkv_rows .*takes names among q, k, v, got 'x'; set it with --qkv-rows"),
        (["--qkv-rows", "K"], "takes names among q, k, v, got 'K'"),
        (["--qkv-rows", "k", "k"], "--qkv-rows names a row twice"),
        (["--set", "qkv_rows=[]"], "qkv_rows .*must be a list of names"),
        (["--target-modules", "mlp.fc1", "mlp.fc1"], "--target-modules names a module twice"),
        (["--target-modules", "all-linear", "mlp.fc1"], "all-linear already takes every linear layer"),
        (["--target-modules", "."], "module names relative to a block"),
        (["--method", "naive", "--qkv-rows", "q"], "--qkv-rows only applies to inflora, inflora_b5, inflora_ca, "
                                                   "seq_lora, sd_lora, not naive"),
    ):
        with pytest.raises(C.ConfigError, match=needle) as err:
            cli.config_from_argv(["--demo", *argv])
        assert "\n" not in str(err.value)

    import inflora_avalanche.methods.inflora as I

    seen = {}

    class Model:
        def __init__(self, name, **kwargs):
            seen.clear()
            seen.update(kwargs)

    monkeypatch.setattr(I, "InfLoRAViT", Model)
    I.build_model(cli.config_from_argv(["--demo", "--target-modules", "mlp.fc1", "--qkv-rows", "q", "k", "v"]))
    assert seen["target_modules"] == ["mlp.fc1"] and seen["qkv_rows"] == ["q", "k", "v"]
    I.build_model(cli.config_from_argv(["--demo"]))  # the reference's layers: the model's own defaults
    assert seen.get("target_modules", ["attn.qkv"]) == ["attn.qkv"] and seen.get("qkv_rows", ["k", "v"]) == ["k", "v"]


def test_an_out_folder_with_only_the_users_files_is_not_said_to_hold_results(tmp_path):
    """It used to be refused as 'already holds results; ... pass --resume to continue that run', though it holds no
    run (and --resume would start one from scratch)."""
    from inflora_avalanche.run.output import prepare_output_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = P.layered_config("demo_digits", None, {"out": str(out)})
    with pytest.raises(C.ConfigError) as info:
        prepare_output_dir(config)
    message = str(info.value)
    assert "is not empty (it holds notes.txt, none of them a run's)" in message and "--resume" not in message
    assert "--overwrite to write the run into it (its files are kept)" in message
    (out / "results.json").write_text("{}")
    with pytest.raises(C.ConfigError, match="already holds results; choose another --out, pass --resume"):
        prepare_output_dir(config)


@pytest.mark.parametrize("argv", [["presets"], ["run", "--help"]], ids=["presets", "run --help"])
def test_output_into_a_closed_pipe_ends_quietly(argv):
    """`inflora-avalanche presets | head -5` used to end in a BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before anything is written: every write fails
    try:
        proc = subprocess.run([sys.executable, "-m", "inflora_avalanche", *argv], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode in (0, 1), proc.stderr
