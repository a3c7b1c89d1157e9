"""Building a run from its config: device, data stream, the checks that need torch, evaluator and loggers."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import distributed as ddp
from ..streams import DataUnavailableError, ImageLoadError, StreamInfo, get_stream
from .config import ConfigError


def resolve_device(config: dict) -> str:
    if config["device"] == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(config["device"])


def check_environment(config: dict) -> None:
    """The checks the config schema cannot make without torch: the device exists."""
    device = str(config["device"])
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but CUDA is not available; use --device cpu")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s)")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("device mps requested but this machine has no MPS backend; use --device cpu")


def build_stream(config: dict, out_dir: Optional[Path] = None) -> tuple[Any, StreamInfo]:
    """The Avalanche benchmark and its :class:`StreamInfo` for ``config``; a seeded split's manifest goes to ``out_dir``."""
    stream = get_stream(config["benchmark"])
    manifest = None
    if out_dir is not None and stream.split_manifest and config["split_manifest"] is None:
        manifest = Path(out_dir) / f"{stream.name}_split_seed{config['split_seed']}.json"
    try:
        return stream.build(config, manifest)
    except DataUnavailableError as err:
        text = str(err)
        if (stream.data_root == "required" and "--data-root" not in text
                and ("does not exist" in text or "no class" in text)):
            raise DataUnavailableError(f"{text}; point --data-root at the folder that holds the images") from None
        raise
    except ImageLoadError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_stream(config: dict, info: StreamInfo) -> None:
    """Before anything trains: the stream has at least two classes, and every image file it will read has a readable
    header (one line names every bad file)."""
    from ..io import unreadable_images

    if info.num_classes < 2:
        raise ConfigError(f"the {info.name} stream has {info.num_classes} class; class-incremental learning needs at "
                          "least two (check --data-root and --classes)")
    bad = unreadable_images(info.files, workers=min(16, 4 * (os.cpu_count() or 1)))
    if bad:
        raise ImageLoadError(
            f"{len(bad)} of the stream's {len(info.files)} image files cannot be read: {'; '.join(bad[:20])}"
            + (f"; and {len(bad) - 20} more" if len(bad) > 20 else "")
            + ". Replace them with readable images (deleting them changes the train/test split, which a later "
              "--resume of this run would refuse), then run the same command again")


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


def check_model(config: dict) -> None:
    """Build the method's model structure (on the meta device: no memory, no compute) to check the backbone name,
    rank and adapted blocks; with ``weights``, build it for real on the CPU to check the file fits the architecture."""
    from ..methods import get_method

    method = get_method(config["method"])
    info = StreamInfo("check", 2, 1, [0, 1])
    if config["weights"]:
        method.make_model(config, info)
        return
    with torch.device("meta"):
        method.make_model({**config, "pretrained": False}, info)


def show_progress(config: dict) -> bool:
    """Progress bars when asked for, or by default only when the output is a terminal (no spam in logs and CI)."""
    if config["progress"] is not None:
        return bool(config["progress"])
    return sys.stdout.isatty()


def build_evaluator(config: dict, log_dir: Optional[Path] = None, extra_metrics: Sequence[Any] = (),
                    resume: bool = False):
    """``(EvaluationPlugin, loggers)``: accuracy, loss, forgetting and task-aware accuracy metrics, with interactive
    (progress bars, see :func:`show_progress`), text, CSV and TensorBoard loggers writing into ``log_dir``.

    Only the main process logs (Avalanche refuses loggers elsewhere). With ``resume`` the text log is appended to and
    the CSV logs go to a new ``csv_resumeN`` folder (Avalanche's CSV logger would truncate the old files). Loss is
    measured per experience too, so the CSV loss columns hold values."""
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
    from avalanche.logging import InteractiveLogger, TensorboardLogger, TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    from .metrics import TaskAwareAccuracy

    loggers: list = []
    if show_progress(config) and ddp.is_main_process():
        loggers.append(InteractiveLogger())
    if log_dir is not None and ddp.is_main_process():
        log_dir.mkdir(parents=True, exist_ok=True)
        loggers.append(TextLogger(open(log_dir / "log.txt", "a" if resume else "w")))
        csv_dir = log_dir / "csv"
        if resume:
            n = 1
            while csv_dir.exists():
                csv_dir, n = log_dir / f"csv_resume{n}", n + 1
        loggers.append(csv_logger(csv_dir))
        loggers.append(TensorboardLogger(tb_log_dir=str(log_dir / "tensorboard")))
    evaluator = EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        TaskAwareAccuracy(),
        *extra_metrics,
        loggers=loggers,
    )
    return evaluator, loggers


def csv_logger(folder: Path) -> Any:
    """Avalanche's CSV logger without its validation columns: the runner evaluates after each experience, never
    during training, so they would hold 0 in every row."""
    from avalanche.logging import CSVLogger

    class TrainingCSVLogger(CSVLogger):
        def __init__(self, log_folder: str) -> None:
            super().__init__(log_folder=log_folder)
            self.training_file.seek(0)
            self.training_file.truncate()
            print("training_exp", "epoch", "training_accuracy", "training_loss", sep=",", file=self.training_file,
                  flush=True)

        def print_train_metrics(self, training_exp, epoch, train_acc, val_acc, train_loss, val_loss) -> None:
            print(training_exp, epoch, self._val_to_str(train_acc), self._val_to_str(train_loss), sep=",",
                  file=self.training_file, flush=True)

    return TrainingCSVLogger(str(folder))


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
    return {"num_workers": workers, "pin_memory": device.startswith("cuda"), "persistent_workers": False}
