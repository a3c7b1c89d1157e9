"""The checks of a run's files and folders that need no torch, made before the heavy imports (torch, timm and
Avalanche take seconds to import): the output and export folders, the data folder, and for ``--resume`` the
checkpoint's settings. Each failure is one :class:`ConfigError` line; nothing is created or changed here.
"""

from __future__ import annotations

from pathlib import Path

from .. import streams as S
from .config import ConfigError
from .output import check_export_dir, prepare_output_dir
from .resume import (CHECKPOINT_NAME, check_resume_settings, check_same_run, checkpoint_header_state,
                     finished_run_note)


def check_data_root(config: dict) -> None:
    """A stream that reads its images from ``--data-root`` needs that folder to exist (and to be a folder)."""
    if not config["data_root"]:
        return
    stream = S.get_stream(config["benchmark"])
    root = Path(config["data_root"]).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--data-root {root} is a file; give the folder that holds the images ({stream.data})")
    if stream.data_root == "required" and not root.exists():
        raise ConfigError(f"--data-root {root} does not exist; point --data-root at the folder that holds the images "
                          f"({stream.data})")


def check_resume_checkpoint(config: dict, out: Path, suggest_config: bool = True, finished_ok: bool = False) -> bool:
    """``--resume``: the checkpoint in ``out`` belongs to this run, was trained with these settings (read from its
    header; a file that cannot be read so is reported when it is loaded) and is not of a finished run (whose files
    a resume would rewrite, with nothing to train). ``suggest_config``: see :func:`check_resume_settings`.
    ``finished_ok`` (``compare``, which keeps a finished method's results): returns whether the run is finished
    instead of refusing it."""
    path = out / CHECKPOINT_NAME
    if not config["resume"] or not path.is_file():
        return False
    state = checkpoint_header_state(path)
    saved = state.get("config") if state else None
    if not isinstance(saved, dict):
        return False
    check_same_run(saved, config, path)
    finished = finished_run_note(state, config, out)
    if finished and not finished_ok:
        raise ConfigError(finished)
    check_resume_settings(saved, {**config, "out": str(out)}, path, suggest_config=suggest_config)
    return finished is not None


def check_before_heavy_imports(config: dict) -> None:
    out = prepare_output_dir(config)
    check_export_dir(config)
    check_data_root(config)
    check_resume_checkpoint(config, out)
