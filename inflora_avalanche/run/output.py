"""The results folder of a run: checked before anything is computed, written atomically, never overwritten by
accident; ``--export`` folders the same way; the files a run leaves (results.json, summary.txt, plots)."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from ..io import atomic_write_json
from .config import ConfigError
from .resume import CHECKPOINT_NAME


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically (a temporary file and a rename)."""
    atomic_write_json(path, data)


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
    lock = OutputLock(out)
    holder = lock._holder() if lock.path.is_file() else None
    if holder is not None and lock._alive(holder):
        lock.acquire()  # raises the one-line "another run is writing" error
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
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
    earlier = sorted(export.glob("seed*/after_exp*/model.safetensors")) if export.is_dir() else []
    if earlier and not (config["overwrite"] or config["resume"]):
        raise ConfigError(f"--export {export} already holds exported models (e.g. {earlier[0]}); choose another "
                          "folder or pass --overwrite")


def export_experience(config: dict, info: Any, strategy: Any, seed: int, t: int) -> None:
    """``--export``: the merged model after experience ``t`` as the timm folder ``<export>/seed<seed>/after_exp<t+1>/``
    (``model.safetensors`` + ``config.json``: ``timm.create_model("local-dir:<folder>", pretrained=True)``)."""
    from ..export import export_timm_checkpoint

    path = Path(config["export"]).expanduser() / f"seed{seed}" / f"after_exp{t + 1}"
    overwrite = bool(config["overwrite"] or config["resume"])
    # export_timm_checkpoint unwraps DistributedDataParallel itself
    export_timm_checkpoint(strategy.model, path, class_names=info.class_names or None, overwrite=overwrite)


LOCK_NAME = ".inflora-run.lock"


class OutputLock:
    """One output folder, one run: ``<out>/.inflora-run.lock`` names the process writing into it.

    Taken with an exclusive create, so of two runs started together exactly one gets it; released when the run ends,
    however it ends. A crash that kills the process leaves it, and it is then recognised as stale (same machine,
    process gone) and taken over, with a note.
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self.stale_note = ""

    def acquire(self) -> "OutputLock":
        import socket

        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._alive(holder):
                    raise ConfigError(
                        f"another run (pid {holder.get('pid')} on {holder.get('host')}, started "
                        f"{holder.get('started')}) is writing into {self.path.parent}; wait for it to end or choose "
                        f"another --out (if no such run exists, delete {self.path})") from None
                self.stale_note = (f"a stale lock of a run that ended without releasing it (pid "
                                   f"{(holder or {}).get('pid')}) was taken over")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            return self
        raise ConfigError(f"cannot take the lock {self.path}; another run may be starting in {self.path.parent}")

    def _holder(self) -> Optional[dict]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None  # unreadable: a crash while it was written

    @staticmethod
    def _alive(holder: dict) -> bool:
        import socket

        if holder.get("host") != socket.gethostname():
            return True  # another machine's process cannot be checked from here: assume it runs
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, TypeError, OverflowError):
            return True
        return True

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def write_results(results: dict, out_dir: Path) -> None:
    """``results.json``, ``summary.txt``, ``accuracy_curve.png`` and ``accuracy_matrix.png`` in ``out_dir``."""
    from ..results import format_summary, plot_accuracy_curve, plot_accuracy_matrix

    write_json(out_dir / "results.json", results)
    (out_dir / "summary.txt").write_text(format_summary(results))
    plot_accuracy_curve(results, out_dir / "accuracy_curve.png")
    plot_accuracy_matrix(results, out_dir / "accuracy_matrix.png")
