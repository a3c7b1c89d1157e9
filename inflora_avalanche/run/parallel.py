"""Running under ``torchrun``: joining the process group, and user errors that reach every rank as one line."""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import torch

from .. import distributed as ddp
from .config import ConfigError


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (for an error re-raised from a DataLoader worker: the original message)."""
    text = str(err)
    if "Original Traceback" in text:
        text = [line for line in text.splitlines() if line.strip()][-1]
        text = text.split(": ", 1)[1] if re.match(r"^\w+(\.\w+)*: ", text) else text
    return " ".join(text.split())


def user_errors() -> tuple:
    """The exception types that are the user's to fix (one line, exit code 2), not bugs."""
    from ..checkpoint import CheckpointError
    from ..methods import MethodNotApplicable
    from ..backbone import WeightsUnavailableError
    from ..streams import DataUnavailableError, ImageLoadError

    return (ConfigError, CheckpointError, DataUnavailableError, ImageLoadError, WeightsUnavailableError,
            MethodNotApplicable, FileNotFoundError)


def on_main(step: Callable[[], Any]) -> Any:
    """Run ``step`` on the main process; every rank gets its value, or raises its user error (one line)."""
    value, error = None, None
    if ddp.is_main_process():
        try:
            value = step()
        except user_errors() as err:
            error = err
    if ddp.is_distributed():
        import torch.distributed as dist

        box = [value, None if error is None else one_line(error)]
        dist.broadcast_object_list(box, src=0)
        if error is None and box[1] is not None:
            raise ConfigError(box[1])
        value = box[0]
    if error is not None:
        raise error
    return value


def on_all(step: Callable[[], Any]) -> Any:
    """Run ``step`` on every rank; a user error on any rank is raised on all (so none waits in a collective)."""
    value, error = None, None
    try:
        value = step()
    except user_errors() as err:
        error = err
    if ddp.is_distributed():
        import torch.distributed as dist

        messages: list = [None] * ddp.world_size()
        dist.all_gather_object(messages, None if error is None else one_line(error))
        first = next((m for m in messages if m), None)
        if error is None and first is not None:
            raise ConfigError(first)
    if error is not None:
        raise error
    return value


def init_distributed(config: dict) -> bool:
    """Join the process group when launched by ``torchrun`` with ``WORLD_SIZE`` > 1 (NCCL on ``cuda:LOCAL_RANK``,
    gloo on the CPU); sets ``config["device"]`` to this rank's device. Returns whether a group was created."""
    import torch.distributed as dist

    from .build import resolve_device

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
