"""The results folder of a run: checked before anything is computed, written atomically, never overwritten by
accident; ``--export`` folders the same way; the files a run leaves (results.json, summary.txt, plots)."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import ConfigError
from .resume import CHECKPOINT_NAME


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically (a temporary file and a rename)."""
    from ..export import atomic_write

    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


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


def _check_folder(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; give a folder")
    base = _nearest_existing(path.absolute())
    if not base.is_dir():
        raise ConfigError(f"{flag} {path} cannot be created: {base} is a file; give a folder path")
    _check_writable(base, flag)


def default_out(config: dict) -> Path:
    return Path("results") / config.get("preset", "run") / datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare_output_dir(config: dict) -> Path:
    """The results folder (``--out`` or ``results/<preset>/<time>``), checked to be writable; refuses a non-empty one
    unless ``overwrite`` or ``resume``. Nothing is created here; the caller creates it once the inputs are checked."""
    out = config["out"]
    if out is None:
        if config["resume"]:
            raise ConfigError("--resume needs --out: the folder of the run to continue")
        out = default_out(config)
    out = Path(out).expanduser()
    _check_folder(out, "--out")
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


def check_export_dir(config: dict) -> None:
    """``--export``: refuse, before any compute, a folder that cannot be written or already holds exports."""
    if not config["export"]:
        return
    export = Path(config["export"]).expanduser()
    _check_folder(export, "--export")
    earlier = sorted(export.glob("seed*/after_exp*.safetensors")) if export.is_dir() else []
    if earlier and not (config["overwrite"] or config["resume"]):
        raise ConfigError(f"--export {export} already holds exported models (e.g. {earlier[0]}); choose another "
                          "folder or pass --overwrite")


def export_experience(config: dict, info: Any, strategy: Any, seed: int, t: int) -> None:
    """``--export``: the merged model after experience ``t`` as ``<export>/seed<seed>/after_exp<t+1>.safetensors``."""
    from ..export import export_timm_checkpoint

    path = Path(config["export"]).expanduser() / f"seed{seed}" / f"after_exp{t + 1}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    overwrite = bool(config["overwrite"] or config["resume"])
    # export_timm_checkpoint unwraps DistributedDataParallel itself
    export_timm_checkpoint(strategy.model, path, class_names=info.class_names or None, overwrite=overwrite)


def write_results(results: dict, out_dir: Path) -> None:
    """``results.json``, ``summary.txt``, ``accuracy_curve.png`` and ``accuracy_matrix.png`` in ``out_dir``."""
    from ..results import format_summary, plot_accuracy_curve, plot_accuracy_matrix

    write_json(out_dir / "results.json", results)
    (out_dir / "summary.txt").write_text(format_summary(results))
    plot_accuracy_curve(results, out_dir / "accuracy_curve.png")
    plot_accuracy_matrix(results, out_dir / "accuracy_matrix.png")
