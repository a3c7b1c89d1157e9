"""The results folder of a run: checked before anything is computed, written atomically, never overwritten by
accident; ``--export`` folders the same way; the files a run leaves (results.json, summary.txt, plots)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from ..io import atomic_write_json
from .config import ConfigError
from .resume import CHECKPOINT_NAME


#: What a run writes at the top of its folder (besides ``seed<N>/``): a folder holding none of these holds no run.
RUN_FILES = ("results.json", CHECKPOINT_NAME, "config.json", "config.yaml", "summary.txt", "config_resumed.json",
             "config_resumed.yaml")


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
    for part in (path, *path.parents):  # a link to nothing would fail only once the run creates the folder
        if part.is_symlink() and not part.exists():
            raise ConfigError(f"{flag} {path}: {part} is a symbolic link to {os.readlink(part)}, which does not exist; "
                              f"create that folder or choose another {flag}")
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
    OutputLock(out).check_free()  # a live run in that folder: the one-line "another run is writing" error
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if config["resume"]:
            if not (out / CHECKPOINT_NAME).is_file() and (out / "results.json").is_file():
                raise ConfigError(f"{out} holds results but no {CHECKPOINT_NAME} to resume from; choose another --out "
                                  "or pass --overwrite instead of --resume to start anew")
        elif not config["overwrite"]:
            entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
            if not any(n in RUN_FILES or n.startswith("seed") or "_split_seed" in n for n in entries):
                shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                raise ConfigError(f"output folder {out} is not empty (it holds {shown}, none of them a run's); choose "
                                  "another --out, or pass --overwrite to write the run into it (its files are kept)")
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
    export_timm_checkpoint(strategy.model, path, class_names=info.class_names or None, overwrite=overwrite,
                           data_config=trained_data_config(config))


def trained_data_config(config: dict) -> dict:
    """The preprocessing the run's test data went through, as timm's data config (the stream's, from the registry)."""
    from ..streams import get_stream

    return get_stream(config["benchmark"]).data_config(config)


LOCK_NAME = ".inflora-run.lock"


def _try_flock(fd: int) -> Optional[bool]:
    """An exclusive, non-blocking ``flock`` on ``fd``: ``True`` when taken, ``False`` when another open file holds
    it, ``None`` where the file system (or the platform) has none."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


class OutputLock:
    """One output folder, one run: ``<out>/.inflora-run.lock``, held with an exclusive ``flock`` for as long as the
    run writes, and naming its process (pid, host, start time) for the message a second run gets.

    The kernel drops a ``flock`` when its process ends, however it ends (SIGKILL, a crash), so a lock file that no
    process holds is stale: it is taken over, with a note, and of several runs that find it at once exactly one gets
    it. Where the file system has no ``flock`` (some network or FUSE mounts) or on Windows, the file is created
    exclusively instead and is stale when the pid it names no longer runs on this machine (a lock naming another
    machine is assumed alive). Released when the run ends.
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self.stale_note = ""
        self.held = False
        self._fd: Optional[int] = None

    # ------------------------------------------------------------------ taking and releasing
    def acquire(self) -> "OutputLock":
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            except PermissionError as err:
                raise ConfigError(f"cannot open the lock {self.path} ({err.strerror}); it belongs to another user's "
                                  "run: choose another --out") from None
            try:
                taken = _try_flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if taken is None:
                os.close(fd)
                return self._acquire_by_pid()
            if not taken:
                os.close(fd)
                raise self._busy(self._holder(wait=True))
            try:  # released (unlinked) between our open and our flock: take the new file instead
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            previous = self._holder()
            if previous is not None:
                self.stale_note = self._stale(previous)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self._me()).encode())
            self._fd, self.held = fd, True
            return self
        raise ConfigError(f"cannot take the lock {self.path}; another run may be starting in {self.path.parent}")

    def check_free(self) -> None:
        """Raise the one-line "another run is writing" error when a live run holds the lock; creates nothing."""
        if not self.path.is_file():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            taken = _try_flock(fd)
        finally:
            os.close(fd)  # also drops the probe's own flock
        if taken is False or (taken is None and self._alive(self._holder())):
            raise self._busy(self._holder(wait=True))

    def release(self) -> None:
        if self._fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    self.path.unlink()
            except FileNotFoundError:
                pass  # the folder was removed (a run that failed before its first checkpoint)
            finally:
                os.close(self._fd)  # drops the flock
                self._fd, self.held = None, False
            return
        holder = self._holder()
        if self.held and holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    # ------------------------------------------------------------------ without flock
    def _acquire_by_pid(self) -> "OutputLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder(wait=True)
                if self._alive(holder):
                    raise self._busy(holder) from None
                self.stale_note = self._stale(holder)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(self._me(), handle)
            self.held = True
            return self
        raise ConfigError(f"cannot take the lock {self.path}; another run may be starting in {self.path.parent}")

    @staticmethod
    def _alive(holder: Optional[dict]) -> bool:
        import socket

        if holder is None:
            return False  # unreadable: a crash while it was written
        if holder.get("host") != socket.gethostname():
            return True  # another machine's process cannot be checked from here: assume it runs
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, TypeError, OverflowError):
            return True
        return True

    # ------------------------------------------------------------------ the file's content and the messages
    @staticmethod
    def _me() -> dict:
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}

    def _holder(self, wait: bool = False) -> Optional[dict]:
        """Who holds the lock, as its file says; ``wait``: give a holder that has just taken it up to 0.2 s to
        write its name."""
        import time

        for _ in range(20 if wait else 1):
            try:
                data = json.loads(self.path.read_text())
                if isinstance(data, dict):
                    return data
            except (OSError, ValueError):
                pass  # missing, empty or half written
            if wait:
                time.sleep(0.01)
        return None

    def _busy(self, holder: Optional[dict]) -> ConfigError:
        who = (f"another run (pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')})"
               if holder else "another run")
        return ConfigError(f"{who} is writing into {self.path.parent}; wait for it to end or choose another --out "
                           f"(if no such run exists, delete {self.path})")

    @staticmethod
    def _stale(holder: Optional[dict]) -> str:
        return (f"a stale lock of a run that ended without releasing it (pid {(holder or {}).get('pid')}) was taken "
                "over")


def missing_folders(path: Path) -> list[Path]:
    """The folders that creating ``path`` would make: ``path`` and its missing parents, topmost first."""
    return [folder for folder in (*reversed(path.parents), path) if not folder.is_dir()]


def make_folders(folders: list[Path]) -> None:
    """Create ``folders`` (as :func:`missing_folders` lists them), tolerating one that another process made."""
    for folder in folders:
        try:
            folder.mkdir()
        except FileExistsError:
            pass


def discard_new_entries(out: Path, before: set) -> None:
    """Remove what a run wrote into ``out`` (every entry not named in ``before``, and not the lock)."""
    import shutil

    for entry in out.iterdir() if out.is_dir() else ():
        if entry.name in before or entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def release_output(out: Path, lock: "OutputLock", before: set, missing: list, discard: bool) -> None:
    """Release the output lock; with ``discard`` (an interrupted or failed start with nothing to resume), first take
    back what the run added to ``out`` (``before``: the names it held), then the folders it made (``missing``)."""
    if discard and lock.held:
        discard_new_entries(out, before)
    lock.release()
    if discard:
        remove_empty_folders(missing)


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove those of ``folders`` (as :func:`missing_folders` lists them) that exist, deepest first, while they are
    empty: a folder another run has written into stays, and so do its parents."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def changes_note(results: dict) -> str:
    """For ``summary.txt``: the settings a ``--resume-with-changes`` changed, and from where (not an uninterrupted
    run's results)."""
    lines = [f"- seed {c['seed']} from experience {c['experiences_done'] + 1}: "
             + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in c["changed"].items())
             for c in results.get("settings_changes") or []]
    return ("\nSettings changed on resume (per experience in results.json, settings_by_experience):\n"
            + "\n".join(lines) + "\n") if lines else ""


def write_results(results: dict, out_dir: Path) -> None:
    """``results.json``, ``summary.txt``, ``accuracy_curve.png`` and ``accuracy_matrix.png`` in ``out_dir``."""
    from ..results import format_summary, plot_accuracy_curve, plot_accuracy_matrix

    write_json(out_dir / "results.json", results)
    (out_dir / "summary.txt").write_text(format_summary(results) + changes_note(results))
    plot_accuracy_curve(results, out_dir / "accuracy_curve.png")
    plot_accuracy_matrix(results, out_dir / "accuracy_matrix.png")
