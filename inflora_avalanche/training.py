"""Training knobs any method can use, without Avalanche: per-epoch learning-rate schedules, optimiser and scheduler
factories, and the autocast of a precision setting.

A scheduler from :func:`epoch_scheduler` is stepped once after every epoch; ``factor(e)`` is the learning-rate
multiplier of epoch ``e`` (0-based). Strategies take ``optimizer_factory(param_groups) -> Optimizer`` and
``scheduler_factory(optimizer, epochs) -> scheduler`` so users can bring their own.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial
from typing import Callable, ContextManager, Optional, Sequence, Union

import torch

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", "annealing", "step", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
OptimizerFactory = Callable[[list], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


def reference_cosine_factor(epoch: int, num_epochs: int) -> float:
    """The reference's ``CosineSchedule``: ``cos(99 pi max(e - 1, 0) / (200 (E - 1)))``.

    Its constructor already steps once, and its loop steps after every epoch, so epochs 0 and 1 both run at the full
    rate and the last epoch at ``cos(99 pi (E - 2) / (200 (E - 1)))``. (With ``E = 1`` the reference divides by zero;
    its one epoch runs at the full rate here.)"""
    if num_epochs <= 1:
        return 1.0
    return math.cos(99.0 * math.pi * max(epoch - 1, 0) / (200.0 * (num_epochs - 1)))


def cosine_annealing_factor(epoch: int, num_epochs: int) -> float:
    """torch's ``CosineAnnealingLR(T_max=E)`` stepped once per epoch: ``(1 + cos(pi e / E)) / 2`` (the reference's
    InfLoRA+CA on ImageNet-R)."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs))


def step_factor(epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """``gamma`` to the number of milestones reached: x ``gamma`` from each milestone epoch on."""
    return gamma ** sum(epoch >= m for m in milestones)


def lr_factor(schedule: str, num_epochs: int, milestones: Sequence[int] = (), gamma: float = 0.1
              ) -> Callable[[int], float]:
    """The per-epoch multiplier of ``schedule`` (one of :data:`LR_SCHEDULES`)."""
    if schedule == "cosine":
        return partial(reference_cosine_factor, num_epochs=num_epochs)
    if schedule == "annealing":
        return partial(cosine_annealing_factor, num_epochs=num_epochs)
    if schedule == "step":
        return partial(step_factor, milestones=sorted(int(m) for m in milestones), gamma=gamma)
    if schedule == "constant":
        return lambda epoch: 1.0
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def epoch_scheduler(schedule: str = "cosine", milestones: Sequence[int] = (), gamma: float = 0.1) -> SchedulerFactory:
    """A scheduler factory: ``factory(optimizer, epochs)`` gives a ``LambdaLR`` to step once after every epoch."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")

    def make(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, epochs, milestones, gamma))

    return make


def optimizer_factory(name: str = "adam", betas: Sequence[float] = (0.9, 0.999), momentum: float = 0.9,
                      weight_decay: float = 0.0, fused: Optional[bool] = None) -> OptimizerFactory:
    """An optimiser factory: ``factory(param_groups)`` gives Adam (``betas``) or SGD (``momentum``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")

    def make(groups: list) -> torch.optim.Optimizer:
        if name == "adam":
            return torch.optim.Adam(groups, betas=tuple(betas), weight_decay=weight_decay, fused=fused)
        return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay, fused=fused)

    return make


def uses_bf16(precision: str, device: Union[str, torch.device]) -> bool:
    """``"auto"`` means bf16 on CUDA and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def autocast(precision: str, device: Union[str, torch.device]) -> ContextManager:
    """The autocast context of forwards under ``precision`` on ``device``."""
    if not uses_bf16(precision, device):
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


