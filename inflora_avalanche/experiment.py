"""The experiment runner shared by ``experiments/run_*.py``: presets, validation, stream/model/strategy/evaluator
construction, the seed x experience loop and the results files.

A config is a preset (``inflora_avalanche/presets/<name>.json``, or any JSON file) merged with command-line overrides.
Everything is checked before any compute; user mistakes end in one line on stderr and exit code 2.

Reuse from other scripts::

    config = load_config("cifar100_inflora", {"epochs": 1})
    bench, info = build_benchmark(config)
    model = build_model(config, num_classes=info.num_classes)
    results = run_experiment(config)                      # writes results.json, summary.txt, plots
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation import PluginMetric

from . import distributed as ddp
from .benchmarks import DataUnavailableError, ImageLoadError, StreamInfo
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .model import WeightsUnavailableError
from .results import aggregate, format_summary, plot_accuracy_curve, plot_accuracy_matrix, seed_result

PRESET_DIR = Path(__file__).resolve().parent / "presets"
BENCHMARKS = ("split_cifar100", "imagenet_r", "domainnet", "folder", "digits")
DEMO_PRESET = "demo_digits"
# The default preset of each script, and which presets' benchmarks a script accepts.
SCRIPT_DEFAULTS = {"split_cifar100": "cifar100_inflora", "imagenet_r": "imagenet_r_10", "domainnet": "domainnet_inflora"}
SCRIPT_ACCEPTS = {
    "split_cifar100": {"split_cifar100", "digits"},
    "imagenet_r": {"imagenet_r", "folder", "digits"},
    "domainnet": {"domainnet", "folder", "digits"},
}
SCRIPTS = {"split_cifar100": "run_split_cifar.py", "imagenet_r": "run_imagenet_r.py", "domainnet": "run_domainnet.py"}
DEMO_BANNER = (
    "DEMO: scikit-learn's 8x8 digits (5 experiences x 2 classes) on a tiny random-init ViT, on the CPU. It runs the "
    "same code as the benchmarks to check the installation; its numbers are NOT the benchmark's."
)

# Every config key with its default. Other modules may add keys (e.g. a plugin's) with ``register_plugin``.
DEFAULTS: dict[str, Any] = {
    "description": "",
    "benchmark": "split_cifar100",
    "data_root": None,
    "download": True,
    "n_experiences": 10,
    "class_order": None,
    "classes": None,  # folder streams: keep the first N classes (name order) or the named ones
    "max_train_per_class": None,
    "max_test_per_class": None,
    "test_fraction": 0.2,
    "split_seed": 0,
    "split_manifest": None,
    "domains": None,
    "resolution": 224,
    "normalize": False,
    "mean": None,
    "std": None,
    "backbone": "vit_base_patch16_224.augreg_in21k",
    "pretrained": True,
    "weights": None,
    "backbone_kwargs": {},
    "rank": 10,
    "adapted_blocks": None,
    "reset_final_norm": False,
    "optimizer": "adam",
    "lr": 5e-4,
    "head_lr": None,
    "betas": [0.9, 0.999],
    "momentum": 0.9,
    "weight_decay": 0.0,
    "lr_schedule": "cosine",
    "milestones": [],
    "gamma": 0.1,
    "lamb": 0.95,
    "lame": 1.0,
    "memory": "dualgpm",
    "epochs": 20,
    "batch_size": 128,
    "eval_batch_size": None,
    "precision": "auto",
    "seeds": [0],
    "device": "auto",
    "num_workers": None,
    "cpu_threads": None,  # torch.set_num_threads; 1 avoids oversubscription for tiny models on shared CPUs
    "out": None,
    "overwrite": False,
    "resume": False,
    # "fixed": one seeded permutation per experience, read in order: the same global batches for any process count
    "train_shuffle": True,
    "deterministic": False,  # torch.use_deterministic_algorithms (see docs/reliability.md)
    "progress": True,
    "diagnostics": True,  # SubspaceDiagnosticsPlugin: per layer and task memory / energy / interference, heatmaps
    "export": None,  # folder: a plain timm checkpoint (merged branches, one head) after every experience
    "device_augment": False,  # Split CIFAR-100: augment uint8 tensors in batches on the device (see docs/performance.md)
    "demo": False,
    "published": {},
}

PluginFactory = Callable[[Any, dict], Any]
PLUGIN_FACTORIES: dict[str, PluginFactory] = {}


class ConfigError(ValueError):
    """A mistake in the presets or options; the message says what to change."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names seed, experience and iteration."""


USER_ERRORS = (ConfigError, CheckpointError, DataUnavailableError, ImageLoadError, WeightsUnavailableError,
               FileNotFoundError)
CHECKPOINT_NAME = "checkpoint.safetensors"
# Config keys that may change between a run and its --resume: they do not change what is computed.
RESUME_FREE_KEYS = {"device", "num_workers", "progress", "cpu_threads", "out", "overwrite", "resume", "download",
                    "data_root", "weights", "split_manifest", "eval_batch_size", "description", "published", "demo"}
# Keys that define the run (stream, model, memory): a checkpoint made with other values is refused.
RESUME_IDENTITY_KEYS = {"preset", "benchmark", "n_experiences", "class_order", "classes", "max_train_per_class",
                        "max_test_per_class", "test_fraction", "split_seed", "domains", "resolution", "normalize",
                        "mean", "std", "backbone", "backbone_kwargs", "pretrained", "rank", "adapted_blocks",
                        "reset_final_norm", "memory", "lamb", "lame", "seeds"}


def register_plugin(key: str, factory: PluginFactory, default: Any = None) -> None:
    """Let the config key ``key`` attach a plugin: ``factory(value, config)`` is called when the value is set."""
    DEFAULTS.setdefault(key, default)
    PLUGIN_FACTORIES[key] = factory


def _classifier_alignment(value: Any, config: dict) -> Any:
    from .alignment import ClassifierAlignmentPlugin  # imported only when a preset asks for it

    return ClassifierAlignmentPlugin(**({} if value is True else dict(value)))


register_plugin("classifier_alignment", _classifier_alignment)


# --------------------------------------------------------------------------------------------------- presets
def list_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> dict:
    """A preset by name (shipped with the package) or by the path of a JSON file."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {', '.join(list_presets())} or a .json file")
    try:
        preset = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"preset {path} is not valid JSON: {err}") from None
    if not isinstance(preset, dict):
        raise ConfigError(f"preset {path} must hold a JSON object")
    preset.setdefault("preset", path.stem)
    return preset


def load_config(preset: str, overrides: Optional[dict] = None, explicit: Optional[dict] = None) -> dict:
    """Defaults, then the preset, then ``overrides`` (``None`` values ignored), then ``explicit`` (``None`` kept);
    validated."""
    config = copy.deepcopy(DEFAULTS)
    config.update(load_preset(preset))
    config.update({k: v for k, v in (overrides or {}).items() if v is not None})
    config.update(explicit or {})
    return validate_config(config)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(config: dict) -> dict:
    """Check every key and value; raises :class:`ConfigError` with a one-line message."""
    unknown = sorted(set(config) - set(DEFAULTS) - {"preset"})
    _check(not unknown, f"unknown config key(s) {unknown}; known keys: {', '.join(sorted(DEFAULTS))}")
    c = config
    _check(c["benchmark"] in BENCHMARKS, f"benchmark must be one of {BENCHMARKS}, got {c['benchmark']!r}")
    for key in ("n_experiences", "resolution", "epochs", "batch_size", "rank", "split_seed"):
        _check(_is_int(c[key]) and c[key] >= (0 if key == "split_seed" else 1),
               f"{key} must be a positive integer, got {c[key]!r}")
    for key in ("eval_batch_size", "num_workers", "max_train_per_class", "max_test_per_class"):
        _check(c[key] is None or (_is_int(c[key]) and c[key] >= (0 if key == "num_workers" else 1)),
               f"{key} must be a positive integer, got {c[key]!r}")
    for key in ("lr", "momentum", "weight_decay", "gamma", "lamb", "lame", "test_fraction"):
        _check(isinstance(c[key], (int, float)) and not isinstance(c[key], bool) and c[key] >= 0,
               f"{key} must be a non-negative number, got {c[key]!r}")
    _check(c["lr"] > 0 and (c["head_lr"] is None or (isinstance(c["head_lr"], (int, float)) and c["head_lr"] > 0)),
           f"learning rates must be positive, got lr={c['lr']}, head_lr={c['head_lr']}")
    _check(c["cpu_threads"] is None or (_is_int(c["cpu_threads"]) and c["cpu_threads"] >= 1),
           f"cpu_threads must be a positive integer, got {c['cpu_threads']!r}")
    _check(isinstance(c["seeds"], list) and c["seeds"] and all(_is_int(s) for s in c["seeds"]),
           f"seeds must be a non-empty list of integers, got {c['seeds']!r}")
    _check(len(set(c["seeds"])) == len(c["seeds"]), f"seeds must be distinct, got {c['seeds']}")
    _check(isinstance(c["backbone"], str) and c["backbone"], "backbone must be a timm model name")
    _check(isinstance(c["backbone_kwargs"], dict), "backbone_kwargs must be a JSON object")
    _check(isinstance(c["published"], dict), "published must be a JSON object")
    _check(c["device"] == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", str(c["device"])) is not None,
           f"device must be auto, cpu, cuda, cuda:N or mps, got {c['device']!r}")
    for key in ("mean", "std"):
        _check(c[key] is None or (isinstance(c[key], list) and len(c[key]) == 3), f"{key} must be 3 numbers")
    if c["classes"] is not None or c["max_train_per_class"] or c["max_test_per_class"]:
        _check(c["benchmark"] == "folder",
               "classes / max_train_per_class / max_test_per_class only apply to folder streams (benchmark 'folder')")
    if c["classes"] is not None:
        _check((_is_int(c["classes"]) and c["classes"] >= 1) or (isinstance(c["classes"], list) and c["classes"]),
               f"classes must be a positive integer or a list of class folder names, got {c['classes']!r}")
        if _is_int(c["classes"]):
            _check(c["classes"] % c["n_experiences"] == 0,
                   f"{c['classes']} classes cannot be split evenly into {c['n_experiences']} experiences")
    _check(0 < c["test_fraction"] < 1, f"test_fraction must be in (0, 1), got {c['test_fraction']}")
    if c["benchmark"] in ("imagenet_r", "domainnet", "folder") and not c["data_root"]:
        raise ConfigError(f"the {c['benchmark']} stream needs --data-root (the folder that holds the images)")
    for key in ("weights", "split_manifest"):
        if c[key] is not None:
            _check(Path(c[key]).expanduser().is_file(), f"--{key.replace('_', '-')} {c[key]}: no such file")
    if c["device"] != "auto" and str(c["device"]).startswith("cuda"):
        _check(torch.cuda.is_available(), f"device {c['device']} requested but CUDA is not available; use --device cpu")
    from .subspace import validate_thresholds

    try:
        validate_thresholds(c["lamb"], c["lame"])
    except ValueError as err:
        raise ConfigError(f"{err} (set them with --set lamb=... --set lame=...)") from None
    known = FIXED_CLASS_COUNTS.get(c["benchmark"])
    if known is not None:
        _check(known % c["n_experiences"] == 0,
               f"the {known} classes of {c['benchmark']} cannot be split evenly into {c['n_experiences']} experiences; "
               f"choose --experiences among {[n for n in range(1, known + 1) if known % n == 0]}")
    _check(not (c["resume"] and c["overwrite"]),
           "--resume continues the run in --out and --overwrite starts it anew; pass only one of them")
    for key in ("overwrite", "resume", "deterministic", "progress"):
        _check(isinstance(c[key], bool), f"{key} must be true or false, got {c[key]!r}")
    _check(c["train_shuffle"] in (True, False, "fixed"),
           f"train_shuffle must be true, false or \"fixed\", got {c['train_shuffle']!r}")
    return config


FIXED_CLASS_COUNTS = {"split_cifar100": 100, "digits": 10}


def check_model(config: dict) -> None:
    """Build the model's structure (on the meta device: no memory, no compute) to check the backbone name, rank and
    adapted blocks; with ``weights``, build it for real on the CPU to check the file fits the architecture."""
    if config["weights"]:
        build_model(config)
        return
    with torch.device("meta"):
        build_model({**config, "pretrained": False})


# --------------------------------------------------------------------------------------------------- builders
def resolve_device(config: dict) -> str:
    if config["device"] == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(config["device"])


def build_benchmark(config: dict, out_dir: Optional[Path] = None) -> tuple[Any, StreamInfo]:
    """The Avalanche benchmark and its :class:`StreamInfo` for ``config``; a seeded split's manifest goes to ``out_dir``."""
    from . import benchmarks as B

    name = config["benchmark"]
    root = Path(config["data_root"]).expanduser() if config["data_root"] else None
    norm = {"resolution": config["resolution"], "normalize": config["normalize"]}
    norm.update({k: config[k] for k in ("mean", "std") if config[k] is not None})
    order = config["class_order"]
    n = config["n_experiences"]
    manifest = None
    if out_dir is not None and name in ("imagenet_r", "folder") and config["split_manifest"] is None:
        manifest = Path(out_dir) / f"{name}_split_seed{config['split_seed']}.json"
    split_manifest = Path(config["split_manifest"]).expanduser() if config["split_manifest"] else None
    try:
        if name == "split_cifar100":
            return B.split_cifar100(root or Path("data"), n, order, download=config["download"],
                                    device_augment=bool(config["device_augment"]), **norm)
        if name == "imagenet_r":
            return B.split_imagenet_r(root, n, config["split_seed"], manifest, split_manifest, order,
                                      config["test_fraction"], **norm)
        if name == "domainnet":
            domains = config["domains"] or B.DOMAINNET_DOMAINS
            return B.split_domainnet(root, n, domains, order, **norm)
        if name == "folder":
            return B.folder_benchmark(root, n, config["classes"], order, config["test_fraction"], config["split_seed"],
                                      manifest, split_manifest, config["max_train_per_class"],
                                      config["max_test_per_class"], **norm)
        return B.split_digits(n, config["resolution"], order)
    except DataUnavailableError as err:
        text = str(err)
        if name != "split_cifar100" and "--data-root" not in text and ("does not exist" in text or "no class" in text):
            raise DataUnavailableError(f"{text}; point --data-root at the folder that holds the images") from None
        raise
    except ImageLoadError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def pretrained_weights_problem(backbone: str) -> Optional[str]:
    """Why timm's pretrained weights for ``backbone`` cannot be had right now (not cached and no network), or ``None``.

    Checked up front because timm retries an unreachable hub for about a minute before failing.
    """
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(backbone)
    except Exception:  # unknown names are reported when the model is built
        return None
    if cfg is None:
        return None
    host = None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            if isinstance(try_to_load_from_cache(cfg.hf_hub_id, filename), str):
                return None
        host = "huggingface.co"
    elif cfg.url:
        from urllib.parse import urlparse

        if (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)).is_file():
            return None
        host = urlparse(cfg.url).hostname
    if host is None:
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return None
        except OSError:
            pass
    return (
        f"the pretrained weights of {backbone!r} are not cached and {host} cannot be reached: pass --weights "
        f"/path/to/checkpoint (.safetensors, .pth or .npz with timm key names), or run once with network access "
        f"(timm caches them under ~/.cache/huggingface)"
    )


def build_model(config: dict, num_classes: Optional[int] = None):
    """The :class:`InfLoRAViT` of ``config``: timm backbone (local ``weights``, timm's pretrained or random), rank,
    adapted blocks, and the optional fresh final LayerNorm (``reset_final_norm``)."""
    from .model import InfLoRAViT

    kwargs = dict(config["backbone_kwargs"])
    if "img_size" not in kwargs and not kwargs.get("dynamic_img_size"):
        kwargs["img_size"] = config["resolution"]
    weights = Path(config["weights"]).expanduser() if config["weights"] else None
    try:
        model = InfLoRAViT(
            config["backbone"],
            rank=config["rank"],
            adapted_blocks=config["adapted_blocks"],
            pretrained=bool(config["pretrained"]) and weights is None,
            checkpoint_path=weights,
            num_classes=num_classes,
            **kwargs,
        )
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise ConfigError(
            f"the weights do not fit {config['backbone']} at resolution {config['resolution']} "
            f"({str(err).splitlines()[-1].strip()[:160]}); set backbone_kwargs.dynamic_img_size=true to keep the "
            "checkpoint's position embeddings"
        ) from None
    except (TypeError, ValueError) as err:
        if isinstance(err, WeightsUnavailableError):
            raise
        raise ConfigError(f"cannot build the model: {err}") from None
    if config["reset_final_norm"]:
        reset_final_norm(model)
    return model


def reset_final_norm(model: Any) -> None:
    """Replace the backbone's final LayerNorm with a fresh, identity-initialised one (frozen, like the backbone)."""
    norm = getattr(model.backbone, "norm", None)
    if not isinstance(norm, torch.nn.LayerNorm):
        raise ConfigError(f"reset_final_norm needs a final LayerNorm at model.backbone.norm, found {type(norm).__name__}")
    weight = norm.weight if norm.weight is not None else next(model.backbone.parameters())
    fresh = torch.nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    fresh.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
    model.backbone.norm = fresh


def build_config_plugins(config: dict) -> list:
    """Plugins requested by config keys (see :func:`register_plugin`), in key order."""
    plugins = []
    for key, factory in PLUGIN_FACTORIES.items():
        value = config.get(key)
        if value is None or value is False:
            continue
        try:
            plugins.append(factory(value, config))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid {key!r} settings {value!r}: {err}") from None
    return plugins


def build_evaluator(config: dict, log_dir: Optional[Path] = None, extra_metrics: Sequence[Any] = (),
                    resume: bool = False):
    """``(EvaluationPlugin, loggers)``: accuracy, loss, forgetting and task-aware accuracy metrics, with interactive
    (progress bars, unless ``progress`` is off), text, CSV and TensorBoard loggers writing into ``log_dir``.

    Only the main process logs (Avalanche refuses loggers elsewhere). With ``resume`` the text log is appended to and
    the CSV logs go to a new ``csv_resumeN`` folder (Avalanche's CSV logger would truncate the old files)."""
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
    from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    loggers: list = []
    if config["progress"] and ddp.is_main_process():
        loggers.append(InteractiveLogger())
    if log_dir is not None and ddp.is_main_process():
        log_dir.mkdir(parents=True, exist_ok=True)
        loggers.append(TextLogger(open(log_dir / "log.txt", "a" if resume else "w")))
        csv_dir = log_dir / "csv"
        if resume:
            n = 1
            while csv_dir.exists():
                csv_dir, n = log_dir / f"csv_resume{n}", n + 1
        loggers.append(CSVLogger(log_folder=str(csv_dir)))
        loggers.append(TensorboardLogger(tb_log_dir=str(log_dir / "tensorboard")))
    evaluator = EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        TaskAwareAccuracy(),
        *extra_metrics,
        loggers=loggers,
    )
    return evaluator, loggers


def build_strategy(config: dict, model: Any, evaluator: Any, extra_plugins: Iterable[Any] = ()):
    """The :class:`InfLoRAStrategy` of ``config``, with ``extra_plugins`` and the plugins config keys ask for."""
    from .strategy import InfLoRAStrategy

    plugins = list(extra_plugins) + build_config_plugins(config)
    input_transform = None
    if config["device_augment"]:
        if config["benchmark"] != "split_cifar100":
            raise ConfigError("device_augment is for Split CIFAR-100 (decoded uint8 tensors); folder streams decode "
                              "in DataLoader workers: drop --device-augment")
        from .device_augment import DeviceAugment

        from .benchmarks.common import IMAGENET_MEAN, IMAGENET_STD

        norm = {}
        if config["normalize"]:
            norm = {"mean": config["mean"] or IMAGENET_MEAN, "std": config["std"] or IMAGENET_STD}
        input_transform = DeviceAugment(config["resolution"], **norm)
    try:
        return InfLoRAStrategy(
            model=model,
            lr=config["lr"],
            optimizer=config["optimizer"],
            betas=tuple(config["betas"]),
            momentum=config["momentum"],
            weight_decay=config["weight_decay"],
            head_lr=config["head_lr"],
            lr_schedule=config["lr_schedule"],
            milestones=config["milestones"],
            gamma=config["gamma"],
            lamb=config["lamb"],
            lame=config["lame"],
            memory=config["memory"],
            num_tasks=config["n_experiences"],
            precision=config["precision"],
            train_mb_size=config["batch_size"],
            train_epochs=config["epochs"],
            eval_mb_size=config["eval_batch_size"] or config["batch_size"],
            device=resolve_device(config),
            plugins=plugins,
            evaluator=evaluator,
            input_transform=input_transform,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid strategy settings: {err}") from None


# --------------------------------------------------------------------------------------------------- metrics
class TaskAwareAccuracy(PluginMetric):
    """Accuracy when the task id is given: the argmax runs over the columns of the sample's own task's head
    (``model.task_classes``). Emits ``TaskAware_Acc_Exp/eval_phase/<stream>/ExpNNN`` per experience and
    ``TaskAware_Acc_Stream/eval_phase/<stream>`` (sample-weighted over the evaluated experiences)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[int, list[int]] = {}

    def reset(self) -> None:
        self.counts = {}

    def result(self) -> dict[int, float]:
        return {exp: c / n for exp, (c, n) in self.counts.items() if n}

    def before_eval(self, strategy: Any) -> None:
        self.reset()

    @torch.no_grad()
    def after_eval_iteration(self, strategy: Any) -> None:
        from .plugins import unwrap_model

        model = unwrap_model(strategy.model)
        out, y = strategy.mb_output, strategy.mb_y
        correct = 0
        for classes in model.task_classes:
            cols = torch.tensor(classes, device=y.device)
            mask = torch.isin(y, cols)
            if mask.any():
                pred = cols[out[mask][:, cols].argmax(dim=1)]
                correct += int((pred == y[mask]).sum())
        exp = strategy.experience.current_experience
        entry = self.counts.setdefault(exp, [0, 0])
        entry[0] += correct
        entry[1] += int(y.numel())  # samples of classes no head covers yet count as wrong

    def _value(self, strategy: Any, name: str, value: float) -> list:
        from avalanche.evaluation.metric_results import MetricValue

        return [MetricValue(self, name, value, strategy.clock.train_iterations)]

    def after_eval_exp(self, strategy: Any) -> list:
        exp = strategy.experience.current_experience
        c, n = self.counts.get(exp, (0, 0))
        stream = strategy.experience.origin_stream.name
        return self._value(strategy, f"TaskAware_Acc_Exp/eval_phase/{stream}_stream/Exp{exp:03d}", c / max(n, 1))

    def after_eval(self, strategy: Any) -> list:
        c = sum(v[0] for v in self.counts.values())
        n = sum(v[1] for v in self.counts.values())
        stream = strategy.experience.origin_stream.name
        return self._value(strategy, f"TaskAware_Acc_Stream/eval_phase/{stream}_stream", c / max(n, 1))

    def __str__(self) -> str:
        return "TaskAware_Acc"


_EXP_KEY = re.compile(r"^(Top1_Acc_Exp|TaskAware_Acc_Exp)/eval_phase/test_stream/(?:Task\d+/)?Exp(\d+)$")


def experience_accuracies(metrics: dict) -> tuple[dict[int, float], dict[int, float]]:
    """Per test experience, the class-incremental and the task-aware accuracy (fractions) from Avalanche's metrics."""
    acc: dict[int, float] = {}
    task_aware: dict[int, float] = {}
    for key, value in metrics.items():
        match = _EXP_KEY.match(key)
        if match:
            (acc if match.group(1) == "Top1_Acc_Exp" else task_aware)[int(match.group(2))] = float(value)
    return acc, task_aware


def _metric(metrics: dict, prefix: str) -> float:
    """The value of the metric whose name is ``prefix`` (optionally followed by ``/TaskNNN``); NaN if absent."""
    for key, value in metrics.items():
        if key == prefix or re.fullmatch(re.escape(prefix) + r"/Task\d+", key):
            return float(value)
    return float("nan")


# --------------------------------------------------------------------------------------------------- running
def set_seed(seed: int) -> None:
    from avalanche.training.determinism.rng_manager import RNGManager

    RNGManager.set_random_seeds(seed)


def set_determinism(config: dict) -> None:
    """``deterministic``: deterministic torch kernels (cuBLAS needs its workspace setting before the first call)."""
    if config["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def loader_kwargs(config: dict, device: str) -> dict:
    workers = config["num_workers"]
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    kwargs = {"num_workers": workers, "pin_memory": device.startswith("cuda"), "persistent_workers": False}
    return kwargs


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


class FiniteLossGuard(SupervisedPlugin, supports_distributed=True):
    """Stops training when the loss becomes NaN or infinite, naming the experience and the iteration.

    The first bad iteration is tracked on the loss's device (no host sync per step) and read every ``check_every``
    iterations and at the end of each epoch, with one ``.item()`` (and, under ``torch.distributed``, one all-reduce,
    so that every rank stops at the same check).
    """

    _NONE = 2**62

    def __init__(self, check_every: int = 20, seed: Optional[int] = None) -> None:
        super().__init__()
        self.check_every = check_every
        self.seed = seed
        self._first: Optional[torch.Tensor] = None
        self._counter: Optional[torch.Tensor] = None
        self._iterations = 0

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._first = self._counter = None
        self._iterations = 0

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        loss = strategy.loss.detach()
        if self._counter is None:
            self._counter = torch.zeros((), dtype=torch.long, device=loss.device)
            self._first = torch.full((), self._NONE, dtype=torch.long, device=loss.device)
        self._counter += 1
        self._iterations += 1
        bad = ~torch.isfinite(loss).all()
        self._first = torch.minimum(self._first, torch.where(bad, self._counter, self._NONE))
        if self._iterations % self.check_every == 0:
            self.check(strategy)

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.check(strategy)

    def check(self, strategy: Any) -> None:
        if self._first is None:
            return
        first = self._first.clone()
        if ddp.is_distributed():
            import torch.distributed as dist

            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        iteration = int(first.item())
        if iteration == self._NONE:
            return
        per_epoch = max(1, len(strategy.dataloader))
        exp = strategy.experience.current_experience
        n_exp = len(strategy.experience.origin_stream) if hasattr(strategy.experience, "origin_stream") else "?"
        seed = "" if self.seed is None else f"seed {self.seed}, "
        raise NonFiniteLossError(
            f"the training loss is not finite (NaN or inf) at {seed}experience {exp + 1}/{n_exp}, iteration "
            f"{iteration} (epoch {(iteration - 1) // per_epoch + 1}); lower the learning rate (--set lr=...) or "
            "check the inputs"
        )


def _fixed_order(experience: Any, seed: int, t: int) -> Any:
    """A copy of ``experience`` whose training data is permuted once (seeded by ``seed`` and ``t``); loaded without
    shuffling it gives the same global batches in one process and under ``torchrun`` (DistributedSampler shards)."""
    generator = torch.Generator().manual_seed(1_000_003 * seed + t)
    order = torch.randperm(len(experience.dataset), generator=generator).tolist()
    experience = copy.copy(experience)
    experience.dataset = experience.dataset.subset(order)
    return experience


def backbone_fingerprint(model: Any) -> float:
    """A float64 sum of the frozen backbone's parameters outside the adapted ``qkv`` layers (which InfLoRA changes):
    tells whether a checkpoint was made on the same backbone weights."""
    total = torch.zeros((), dtype=torch.float64)
    for name, param in model.backbone.named_parameters():
        if ".attn.qkv." not in name:
            total += param.detach().to("cpu", torch.float64).sum()
    return float(total)


def _checkpointed_model_state(model: Any) -> dict:
    """The model entries InfLoRA changes: heads, branches, merged ``qkv`` weights and the structure (extra state)."""
    from .plugins import unwrap_model

    state = unwrap_model(model).state_dict()
    return {k: v for k, v in state.items() if not k.startswith("backbone.") or ".attn.qkv." in k}


def _stateful_plugins(strategy: Any) -> dict[str, Any]:
    """This package's plugins of ``strategy`` that have ``state_dict``/``load_state_dict``, by a stable key."""
    out = {}
    for i, plugin in enumerate(strategy.plugins):
        if type(plugin).__module__.startswith("inflora_avalanche") and callable(getattr(plugin, "state_dict", None)) \
                and callable(getattr(plugin, "load_state_dict", None)):
            out[f"{i}:{type(plugin).__name__}"] = plugin
    return out


def _forgetting_metrics(strategy: Any) -> list:
    from avalanche.evaluation.metrics.forgetting_bwt import GenericExperienceForgetting

    return [m for m in strategy.evaluator.metrics if isinstance(m, GenericExperienceForgetting)]


def strategy_state(strategy: Any) -> dict:
    """What a resumed run needs from ``strategy`` between two experiences (no optimiser: it is rebuilt per task)."""
    return {
        "model": _checkpointed_model_state(strategy.model),
        "plugins": {key: plugin.state_dict() for key, plugin in _stateful_plugins(strategy).items()},
        "clock": {k: v for k, v in vars(strategy.clock).items() if _is_int(v)},
        "forgetting": [{"initial": dict(m.forgetting.initial), "last": dict(m.forgetting.last)}
                       for m in _forgetting_metrics(strategy)],
    }


def load_strategy_state(strategy: Any, state: dict) -> None:
    """Restore :func:`strategy_state` into a freshly built strategy of the same config."""
    from .plugins import unwrap_model

    model = unwrap_model(strategy.model)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.startswith("backbone.") or ".attn.qkv." in k]
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint's model does not fit this model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); resume with the settings of the run that wrote it")
    plugins = _stateful_plugins(strategy)
    if set(plugins) != set(state["plugins"]):
        raise CheckpointError(f"the checkpoint holds plugin states {sorted(state['plugins'])} but this run has "
                              f"{sorted(plugins)}; resume with the settings of the run that wrote it")
    device = torch.device(strategy.device)
    for key, plugin in plugins.items():
        try:
            plugin.load_state_dict(state["plugins"][key])
        except ValueError as err:
            raise CheckpointError(f"cannot restore {key.split(':', 1)[1]}: {err}") from None
        if callable(getattr(plugin, "to", None)):
            plugin.to(device)
    for key, value in state["clock"].items():
        setattr(strategy.clock, key, value)
    metrics = _forgetting_metrics(strategy)
    for metric, saved in zip(metrics, state["forgetting"]):
        metric.forgetting.initial = {int(k): float(v) for k, v in saved["initial"].items()}
        metric.forgetting.last = {int(k): float(v) for k, v in saved["last"].items()}


ExperienceCallback = Callable[[int, Any, dict], None]


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
    """Train on ``bench``'s experiences with one seed; after each, evaluate on every seen test experience.

    Returns :func:`results.seed_result`'s dict (also written to ``seed_dir/metrics.json`` after every experience).
    ``on_experience_end(t, strategy, partial_result)`` runs after experience ``t`` (e.g. to save a checkpoint).
    ``resume``: a checkpoint's seed state (``{"result", "strategy", "rng", "fingerprint"}``) to continue from; the
    experiences it holds are skipped.
    """
    set_seed(seed)
    device = resolve_device(config)
    model = build_model(config, num_classes=info.num_classes)
    fingerprint = backbone_fingerprint(model)
    if resume is not None and resume["fingerprint"] != fingerprint:
        raise CheckpointError("the backbone weights differ from those the checkpoint was trained on; resume with the "
                              "same --weights / backbone, or start a new --out")
    evaluator, loggers = build_evaluator(config, seed_dir if ddp.is_main_process() else None,
                                         resume=resume is not None)
    guard = FiniteLossGuard(seed=seed)
    strategy = build_strategy(config, model, evaluator, [*extra_plugins, guard])
    strategy.backbone_fingerprint = fingerprint
    loader = loader_kwargs(config, device)
    fixed_order = config["train_shuffle"] == "fixed"
    train_loader = {**loader, "shuffle": config["train_shuffle"] is True}
    test_sizes = [len(exp.dataset) for exp in bench.test_stream]
    T = len(bench.train_stream)
    matrix: list[list[Optional[float]]] = []
    ta_matrix: list[list[Optional[float]]] = []
    extra: dict[str, list] = {"train_time_s": [], "eval_time_s": [], "avalanche_stream_accuracy": [],
                              "avalanche_stream_forgetting": []}
    result: dict = {}
    done = 0
    previous_runtime = 0.0
    if resume is not None:
        result = resume["result"]
        done = int(result["experiences_done"])
        matrix = [list(row) for row in result["accuracy_matrix"]]
        ta_matrix = [list(row) for row in result["task_aware_matrix"]]
        extra = {key: list(result[key]) for key in extra}
        previous_runtime = float(result.get("runtime_s", 0.0))
        load_strategy_state(strategy, resume["strategy"])
        set_rng_state(resume["rng"])
        log(f"[seed {seed}] resuming after experience {done}/{T}")
    started = time.perf_counter()
    try:
        for t, experience in enumerate(bench.train_stream):
            if t < done:
                continue
            if fixed_order:
                experience = _fixed_order(experience, seed, t)
            t0 = time.perf_counter()
            strategy.train(experience, **train_loader)
            t1 = time.perf_counter()
            metrics = strategy.eval(bench.test_stream[: t + 1], **loader)
            t2 = time.perf_counter()
            acc, task_aware = experience_accuracies(metrics)
            missing = [j for j in range(t + 1) if j not in acc or j not in task_aware]
            if missing:
                raise RuntimeError(f"evaluation produced no accuracy for test experiences {missing}")
            matrix.append([100.0 * acc[j] for j in range(t + 1)] + [None] * (T - t - 1))
            ta_matrix.append([100.0 * task_aware[j] for j in range(t + 1)] + [None] * (T - t - 1))
            extra["train_time_s"].append(t1 - t0)
            extra["eval_time_s"].append(t2 - t1)
            extra["avalanche_stream_accuracy"].append(100.0 * _metric(metrics, "Top1_Acc_Stream/eval_phase/test_stream"))
            extra["avalanche_stream_forgetting"].append(100.0 * _metric(metrics, "StreamForgetting/eval_phase/test_stream"))
            result = seed_result(matrix, test_sizes, ta_matrix, seed=seed, experiences_done=t + 1,
                                 runtime_s=previous_runtime + time.perf_counter() - started, **extra)
            if seed_dir is not None and ddp.is_main_process():
                _write_json(seed_dir / "metrics.json", result)
            log(
                f"[seed {seed}] experience {t + 1}/{T}: A_t {result['A_t'][-1]:.2f}%  task-aware "
                f"{result['task_aware_A_t'][-1]:.2f}%  (train {t1 - t0:.1f} s, eval {t2 - t1:.1f} s)"
            )
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


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(base: Path, flag: str) -> None:
    """Write and remove a probe file in ``base`` (``os.access`` says yes to root even on read-only mounts)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".inflora-write-test", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"cannot write into {base} ({err.strerror or err}); choose a writable {flag} folder") from None


def prepare_output_dir(config: dict) -> Path:
    """The results folder (``--out`` or ``results/<preset>/<time>``), checked to be writable; refuses a non-empty one
    unless ``overwrite`` or ``resume``.

    Nothing is created here; the caller creates it once the inputs have been checked.
    """
    out = config["out"]
    if out is None:
        if config["resume"]:
            raise ConfigError("--resume needs --out: the folder of the run to continue")
        out = Path("results") / config.get("preset", "run") / datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    base = _nearest_existing(out.absolute())
    if not base.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {base} is a file; give a folder path")
    _check_writable(base, "--out")
    if out.is_dir() and any(out.iterdir()):
        if config["resume"]:
            if not (out / CHECKPOINT_NAME).is_file() and (out / "results.json").is_file():
                raise ConfigError(f"{out} holds results but no {CHECKPOINT_NAME} to resume from; choose another --out "
                                  "or pass --overwrite instead of --resume to start anew")
        elif not config["overwrite"]:
            raise ConfigError(
                f"output folder {out} already holds results; choose another --out, pass --resume to continue that run "
                "or --overwrite to write into it"
            )
    return out


def check_resume(config: dict, info: StreamInfo, checkpoint: dict, path: Path) -> dict:
    """Refuse a checkpoint of another preset, backbone, stream or model; returns the other settings that changed
    (``{key: (checkpoint's, this run's)}``)."""
    saved = checkpoint["config"]
    identity = ["preset", "backbone", "benchmark"]
    identity += sorted((RESUME_IDENTITY_KEYS | set(PLUGIN_FACTORIES)) - set(identity))
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (tuples = lists)
    for key in identity:
        if not same(saved.get(key), config.get(key)):
            raise CheckpointError(
                f"the checkpoint {path} was made with {key}={saved.get(key)!r} but this run has {key}={config.get(key)!r}; "
                "resume with the same settings, or choose another --out (or --overwrite) to start anew")
    stream = {k: v for k, v in info.to_dict().items() if k in STREAM_KEYS}
    for key in STREAM_KEYS:
        if not same(checkpoint["stream"].get(key), stream.get(key)):
            raise CheckpointError(
                f"the data stream differs from the checkpoint's ({key}: {checkpoint['stream'].get(key)!r} there, "
                f"{stream.get(key)!r} now); resume on the same data, or choose another --out")
    return {k: (saved.get(k), config.get(k)) for k in sorted(set(saved) | set(config))
            if k not in RESUME_FREE_KEYS and k not in identity and not same(saved.get(k), config.get(k))}


STREAM_KEYS = ("name", "num_classes", "n_experiences", "class_order", "train_size", "test_size")


def _on_main(step: Callable[[], Any]) -> Any:
    """Run ``step`` on the main process; every rank gets its value, or raises its user error (one line)."""
    value, error = None, None
    if ddp.is_main_process():
        try:
            value = step()
        except USER_ERRORS as err:
            error = err
    if ddp.is_distributed():
        import torch.distributed as dist

        box = [value, None if error is None else _one_line(error)]
        dist.broadcast_object_list(box, src=0)
        if error is None and box[1] is not None:
            raise ConfigError(box[1])
        value = box[0]
    if error is not None:
        raise error
    return value


def _on_all(step: Callable[[], Any]) -> Any:
    """Run ``step`` on every rank; a user error on any rank is raised on all (so none waits in a collective)."""
    value, error = None, None
    try:
        value = step()
    except USER_ERRORS as err:
        error = err
    if ddp.is_distributed():
        import torch.distributed as dist

        messages: list = [None] * ddp.world_size()
        dist.all_gather_object(messages, None if error is None else _one_line(error))
        first = next((m for m in messages if m), None)
        if error is None and first is not None:
            raise ConfigError(first)
    if error is not None:
        raise error
    return value


def assemble_results(config: dict, info: StreamInfo, seed_results: list[dict], runtime_s: float) -> dict:
    """The content of ``results.json``."""
    return {
        "preset": config.get("preset"),
        "demo": bool(config["demo"]),
        "config": config,
        "benchmark": info.to_dict(),
        "published": config["published"],
        "seeds": seed_results,
        "aggregate": aggregate(seed_results),
        "runtime_s": runtime_s,
        "device": resolve_device(config),
        "torch_threads": torch.get_num_threads(),
        "world_size": ddp.world_size(),
    }


def write_results(results: dict, out_dir: Path) -> None:
    """``results.json``, ``summary.txt``, ``accuracy_curve.png`` and ``accuracy_matrix.png`` in ``out_dir``."""
    _write_json(out_dir / "results.json", results)
    (out_dir / "summary.txt").write_text(format_summary(results))
    plot_accuracy_curve(results, out_dir / "accuracy_curve.png")
    plot_accuracy_matrix(results, out_dir / "accuracy_matrix.png")


def standard_plugins(config: dict, seed_dir: Path) -> list:
    """Plugins every run gets from its config: the subspace diagnostics (on unless ``diagnostics`` is false)."""
    if not config["diagnostics"]:
        return []
    from .diagnostics import SubspaceDiagnosticsPlugin

    out = seed_dir / "diagnostics" if ddp.is_main_process() else None
    return [SubspaceDiagnosticsPlugin(out_dir=out, overwrite=bool(config["resume"] or config["overwrite"]))]


def check_export_dir(config: dict) -> None:
    """``--export``: refuse, before any compute, a folder that cannot be written or already holds exports."""
    if not config["export"]:
        return
    export = Path(config["export"]).expanduser()
    if export.exists() and not export.is_dir():
        raise ConfigError(f"--export {export} is a file; give a folder")
    base = _nearest_existing(export.absolute())
    if not base.is_dir():
        raise ConfigError(f"--export {export} cannot be created: {base} is a file; give a folder path")
    _check_writable(base, "--export")
    earlier = sorted(export.glob("seed*/after_exp*.safetensors")) if export.is_dir() else []
    if earlier and not (config["overwrite"] or config["resume"]):
        raise ConfigError(f"--export {export} already holds exported models (e.g. {earlier[0]}); choose another "
                          "folder or pass --overwrite")


def export_experience(config: dict, info: StreamInfo, strategy: Any, seed: int, t: int) -> None:
    """``--export``: the merged model after experience ``t`` as ``<export>/seed<seed>/after_exp<t+1>.safetensors``."""
    from .export import export_timm_checkpoint

    path = Path(config["export"]).expanduser() / f"seed{seed}" / f"after_exp{t + 1}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    overwrite = bool(config["overwrite"] or config["resume"])
    # export_timm_checkpoint unwraps DistributedDataParallel itself
    export_timm_checkpoint(strategy.model, path, class_names=info.class_names or None, overwrite=overwrite)


def run_experiment(
    config: dict,
    extra_plugins: Callable[[int], Iterable[Any]] = lambda seed: (),
    on_experience_end: Optional[Callable[[int, int, Any, dict], None]] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every seed of ``config`` and write the results; returns the content of ``results.json``.

    ``extra_plugins(seed)`` gives additional plugins for a seed's strategy; ``on_experience_end(seed, t, strategy,
    partial)`` runs after each experience. After every experience the run's state goes to ``<out>/checkpoint.safetensors``
    (atomically); with ``resume`` the run continues from it. Under ``torch.distributed`` only rank 0 logs and writes.
    """
    validate_config(config)
    main_process = ddp.is_main_process()
    if not main_process:
        log = lambda *_: None  # noqa: E731

    def prepare() -> tuple[str, bool]:
        out = prepare_output_dir(config)
        if config["pretrained"] and not config["weights"]:
            problem = pretrained_weights_problem(config["backbone"])
            if problem:
                raise WeightsUnavailableError(problem)
        check_model(config)
        check_export_dir(config)
        return str(out), (out / CHECKPOINT_NAME).is_file()

    out_str, has_checkpoint = _on_main(prepare)
    out_dir = Path(out_str)
    ckpt_path = out_dir / CHECKPOINT_NAME
    if config["demo"]:
        log(DEMO_BANNER)
    if config["cpu_threads"]:
        torch.set_num_threads(config["cpu_threads"])
    set_determinism(config)
    created = main_process and not out_dir.exists()
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        bench, info = _on_all(lambda: build_benchmark(config, out_dir if main_process else None))
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)  # made just now: holds at most the split manifest
        raise
    config = {**config, "out": str(out_dir)}
    checkpoint: Optional[dict] = None
    if config["resume"] and has_checkpoint:
        checkpoint = _on_all(lambda: load_checkpoint(ckpt_path))
        changed = _on_all(lambda: check_resume(config, info, checkpoint, ckpt_path))
        log(f"resuming from {ckpt_path}: seed {checkpoint['seed']}, {checkpoint['experiences_done']} of "
            f"{info.n_experiences} experiences done")
        if changed:
            log("resuming with changed settings (results after the checkpoint differ from an uninterrupted run): "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    elif config["resume"]:
        log(f"--resume: no checkpoint in {out_dir}; starting from the first experience")
    if main_process:
        if checkpoint is None and ckpt_path.exists():
            ckpt_path.unlink()  # --overwrite: a stale checkpoint must not be resumed later
        _write_json(out_dir / ("config.json" if checkpoint is None else "config_resumed.json"), config)
    log(f"{info.name}: {info.num_classes} classes, {info.n_experiences} experiences, {info.train_size} train / "
        f"{info.test_size} test images; seeds {config['seeds']}; device {resolve_device(config)}; "
        f"{ddp.world_size()} process(es); results in {out_dir}")
    started = time.perf_counter()
    seed_results: list[dict] = list(checkpoint["completed"]) if checkpoint else []
    previous_runtime = float(checkpoint.get("runtime_s", 0.0)) if checkpoint else 0.0
    results: dict = {}
    for index, seed in enumerate(config["seeds"]):
        resume_state = None
        if checkpoint is not None and index < checkpoint["seed_index"]:
            continue  # finished before the checkpoint; its result is in seed_results
        if checkpoint is not None and index == checkpoint["seed_index"]:
            resume_state = checkpoint
            if checkpoint["experiences_done"] >= info.n_experiences:
                seed_results.append(checkpoint["result"])
                results = assemble_results(config, info, seed_results, previous_runtime)
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
                    "runtime_s": previous_runtime + time.perf_counter() - started,
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
        results = assemble_results(config, info, seed_results, previous_runtime + time.perf_counter() - started)
        if main_process:
            write_results(results, out_dir)
    log("")
    log(format_summary(results).rstrip())
    log(f"\nresults: {out_dir / 'results.json'}, {out_dir / 'summary.txt'}, plots accuracy_curve.png and "
        "accuracy_matrix.png")
    if config["demo"]:
        log(DEMO_BANNER)
    return results


# --------------------------------------------------------------------------------------------------- command line
def build_parser(benchmark: str = "split_cifar100") -> argparse.ArgumentParser:
    default = SCRIPT_DEFAULTS.get(benchmark, "cifar100_inflora")
    parser = argparse.ArgumentParser(
        description=(
            f"InfLoRA on {benchmark} with Avalanche: trains the experiences in order, evaluates on all seen classes "
            "after each, and writes results.json, summary.txt and plots (A_t curve, accuracy matrix) to --out. "
            f"Presets: {', '.join(list_presets())}."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = parser.add_argument
    a("--preset", default=default, help="preset name (inflora_avalanche/presets/) or path of a preset .json file")
    a("--demo", action="store_true", help="offline CPU demo on scikit-learn's digits with a tiny ViT (not the benchmark)")
    a("--list-presets", action="store_true", help="print the presets and exit")
    a("--data-root", help="data folder (CIFAR-100: the folder holding cifar-100-python/; ImageNet-R: imagenet-r/; "
                          "DomainNet: the folder with the domains and <domain>_train.txt lists)")
    a("--weights", help="local backbone checkpoint (.safetensors/.pth/.npz with timm key names) instead of timm's download")
    a("--backbone", help="timm model name of the backbone (default: the preset's)")
    a("--resolution", type=int, help="input resolution in pixels")
    a("--normalize", action=argparse.BooleanOptionalAction, default=None,
      help="normalise pixels with mean/std (the paper feeds [0, 1] pixels: off in its presets)")
    a("--seeds", type=int, nargs="+", help="seeds, e.g. --seeds 0 1 2 3 4 (mean ± std is reported over them)")
    a("--device", help="auto, cpu, cuda or cuda:N")
    a("--epochs", type=int, help="training epochs per experience")
    a("--batch-size", type=int, help="minibatch size (training and evaluation)")
    a("--num-workers", type=int, help="DataLoader worker processes (default: up to 8 CPU cores)")
    a("--experiences", type=int, help="number of experiences (tasks)")
    a("--classes", type=int, help="folder streams: use only the first N classes (name order)")
    a("--max-train-per-class", type=int, help="folder streams: at most this many training images per class")
    a("--max-test-per-class", type=int, help="folder streams: at most this many test images per class")
    a("--split-seed", type=int, help="seed of the train/test split of folder streams without train/ and val/")
    a("--split-manifest", help="reuse the split manifest (JSON) of an earlier run instead of making a split")
    a("--no-download", action="store_true", help="never download data (CIFAR-100)")
    a("--out", help="results folder (default results/<preset>/<date-time>); must be new or empty")
    a("--overwrite", action="store_true", help="allow writing into an existing non-empty --out folder")
    a("--resume", action="store_true",
      help="continue the run in --out from its checkpoint (written after every experience)")
    a("--no-progress", action="store_true", help="no progress bars (text, CSV and TensorBoard logs are still written)")
    a("--export", metavar="DIR", help="after every experience, write a plain timm checkpoint (branches merged, one "
                                      "head; loads without this package) to DIR/seed<N>/after_exp<t>.safetensors")
    a("--no-diagnostics", action="store_true",
      help="switch off the subspace diagnostics (memory, energy in the old subspace, interference per layer and task)")
    a("--device-augment", action="store_true",
      help="Split CIFAR-100: keep images as uint8 tensors and crop/flip/resize them in batches on the device")
    a("--set", action="append", default=[], metavar="KEY=VALUE",
      help="override any preset key, VALUE in JSON (e.g. --set lr=0.001 --set milestones=[10])")
    return parser


def _parse_set(items: Sequence[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value  # a bare string
    return overrides


def config_from_args(args: argparse.Namespace, benchmark: str) -> dict:
    """Preset + command-line overrides, validated; the preset must suit the script's ``benchmark``."""
    preset = DEMO_PRESET if args.demo else args.preset
    short = {"split_cifar100": "cifar100_", "domainnet": "domainnet_"}.get(benchmark, "")
    if preset not in list_presets() and short + preset in list_presets():
        preset = short + preset  # run_split_cifar.py --preset inflora_ca -> cifar100_inflora_ca
    overrides = {
        "data_root": args.data_root, "weights": args.weights, "backbone": args.backbone, "resolution": args.resolution,
        "normalize": args.normalize, "seeds": args.seeds, "device": args.device, "epochs": args.epochs,
        "batch_size": args.batch_size, "num_workers": args.num_workers, "n_experiences": args.experiences,
        "classes": args.classes, "max_train_per_class": args.max_train_per_class,
        "max_test_per_class": args.max_test_per_class, "split_seed": args.split_seed,
        "split_manifest": args.split_manifest, "out": args.out, "export": args.export,
    }
    if args.no_diagnostics:
        overrides["diagnostics"] = False
    if args.device_augment:
        overrides["device_augment"] = True
    if args.no_download:
        overrides["download"] = False
    if args.overwrite:
        overrides["overwrite"] = True
    if args.resume:
        overrides["resume"] = True
    if args.no_progress:
        overrides["progress"] = False
    config = load_config(preset, overrides, _parse_set(args.set))
    accepted = SCRIPT_ACCEPTS.get(benchmark)
    if accepted is not None and config["benchmark"] not in accepted:
        script = SCRIPTS.get(config["benchmark"], "run_imagenet_r.py")
        raise ConfigError(f"preset {config['preset']!r} is a {config['benchmark']} preset; run it with experiments/{script}")
    return config


def _one_line(err: BaseException) -> str:
    text = str(err)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the original message
        text = [line for line in text.splitlines() if line.strip()][-1]
        text = text.split(": ", 1)[1] if re.match(r"^\w+(\.\w+)*: ", text) else text
    return " ".join(text.split())


def init_distributed(config: dict) -> bool:
    """Join the process group when launched by ``torchrun`` with ``WORLD_SIZE`` > 1 (NCCL on ``cuda:LOCAL_RANK``,
    gloo on the CPU); sets ``config["device"]`` to this rank's device. Returns whether a group was created."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    import avalanche.training  # noqa: F401  (Avalanche makes loggers at import time: before the group exists)

    if resolve_device(config).startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        config["device"] = f"cuda:{local}"
        dist.init_process_group("nccl", device_id=torch.device(f"cuda:{local}"))
    else:
        dist.init_process_group("gloo")
    return True


def main(argv: Optional[Sequence[str]] = None, benchmark: str = "split_cifar100") -> int:
    """Command-line entry point of ``experiments/run_*.py``; returns the exit code (2 for user errors, 3 when the
    training loss stops being finite)."""
    args = build_parser(benchmark).parse_args(argv)
    if args.list_presets:
        for name in list_presets():
            print(f"{name:24s} {load_preset(name).get('description', '')}")
        return 0
    group = False
    try:
        config = config_from_args(args, benchmark)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if config["batch_size"] % world:
            raise ConfigError(f"batch_size {config['batch_size']} is the global batch and must divide by the "
                              f"{world} processes; change --batch-size or --nproc-per-node")
        group = init_distributed(config)
        run_experiment(config)
    except USER_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; pass --resume with the same --out to continue after the last finished experience",
              file=sys.stderr)
        return 130
    finally:
        if group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
