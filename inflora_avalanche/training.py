"""Training knobs any method can use, without Avalanche: per-epoch learning-rate schedules (with an optional linear
warmup), optimiser and scheduler factories, and the autocast of a precision setting.

A scheduler from :func:`epoch_scheduler` is stepped once after every epoch; ``factor(e)`` is the learning-rate
multiplier of epoch ``e`` (0-based). Strategies take ``optimizer_factory(param_groups) -> Optimizer`` and
``scheduler_factory(optimizer, epochs) -> scheduler`` so users can bring their own: a torch ``LRScheduler``
(``step()`` after every epoch) or a timm scheduler (``step(epoch)`` after every epoch, ``step_update(num_updates)``
after every optimiser step; :func:`scheduler_kind` tells them apart).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

import torch

from .optimizer_names import (OPTIMIZER_ARGS, OPTIMIZERS, OWN_OPTIMIZERS, check_optimizer_name,  # noqa: F401
                              number_of_betas, takes_momentum)

LR_SCHEDULES = ("cosine", "annealing", "step", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
DEFAULT_WARMUP_FACTOR = 0.1  # the lr multiplier of the first warmup epoch
OptimizerFactory = Callable[[list], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


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


def with_warmup(factor: Callable[[int], float], warmup_epochs: int, warmup_factor: float) -> Callable[[int], float]:
    """timm's warmup (``warmup_prefix=False``): over the first ``warmup_epochs`` epochs the multiplier rises linearly
    from ``warmup_factor`` towards 1 (``warmup_factor + (1 - warmup_factor) e / N``); from epoch ``N`` on it is the
    schedule's own ``factor(e)``, not shifted (the schedule counts from epoch 0; warmup overrides its first epochs)."""
    if warmup_epochs == 0:
        return factor

    def warmed(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_factor + (1.0 - warmup_factor) * epoch / warmup_epochs
        return factor(epoch)

    return warmed


def check_warmup(warmup_epochs: int, warmup_factor: float, epochs: Optional[int] = None) -> None:
    """Warmup takes a whole number of epochs, fewer than a task has, and starts from a factor in [0, 1]."""
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be a whole number >= 0, got {warmup_epochs!r}")
    if not 0.0 <= warmup_factor <= 1.0:
        raise ValueError(f"warmup_factor (the lr multiplier of the first warmup epoch) must be in [0, 1], got "
                         f"{warmup_factor!r}")
    if epochs is not None and warmup_epochs and warmup_epochs >= epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) must be below the epochs of a task ({epochs}): the "
                         "schedule would never run")


def epoch_scheduler(schedule: str = "cosine", milestones: Sequence[int] = (), gamma: float = 0.1,
                    warmup_epochs: int = 0, warmup_factor: float = DEFAULT_WARMUP_FACTOR) -> SchedulerFactory:
    """A scheduler factory: ``factory(optimizer, epochs)`` gives a ``LambdaLR`` to step once after every epoch, with
    ``warmup_epochs`` epochs of linear warmup from ``warmup_factor`` x lr (:func:`with_warmup`; 0: none)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    check_warmup(warmup_epochs, warmup_factor)

    def make(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        check_warmup(warmup_epochs, warmup_factor, epochs)
        factor = with_warmup(lr_factor(schedule, epochs, milestones, gamma), warmup_epochs, warmup_factor)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return make


def scheduler_kind(scheduler: Any) -> str:
    """``"timm"`` (``step(epoch)`` and ``step_update(num_updates)``) or ``"torch"`` (``step()``); anything else is
    refused in one line (a factory that forgot its ``return`` gives ``None``; the optimiser itself, or a scheduler
    class not yet called, has a ``step`` too)."""
    from timm.scheduler import PlateauLRScheduler

    if isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, PlateauLRScheduler)):
        raise ValueError(f"{type(scheduler).__name__} steps on a validation metric, which the strategy does not "
                         "compute between epochs: use a schedule over epochs")
    step = getattr(scheduler, "step", None)
    if callable(step) and not isinstance(scheduler, (type, torch.optim.Optimizer)):
        return "timm" if callable(getattr(scheduler, "step_update", None)) else "torch"
    got = f"the class {scheduler.__name__} itself" if isinstance(scheduler, type) else type(scheduler).__name__
    raise ValueError(f"scheduler_factory must return a scheduler (torch's LRScheduler with step(), or timm's with "
                     f"step(epoch) and step_update(num_updates)), got {got}; for a constant rate use "
                     "lr_schedule='constant'")


def optimizer_factory(name: str = "adam", betas: Optional[Sequence[float]] = None, momentum: Optional[float] = None,
                      weight_decay: float = 0.0, fused: Optional[bool] = None) -> OptimizerFactory:
    """An optimiser factory: ``factory(param_groups)`` gives the reference's Adam (``betas``, default
    ``(0.9, 0.999)``), torch's SGD (``momentum``, default 0.9), or any other of :data:`OPTIMIZERS` through timm's
    ``create_optimizer_v2`` (``betas`` and ``momentum`` if it takes them, default its own). Each group keeps its
    ``lr``. A setting the optimiser does not take is refused, not ignored."""
    check_optimizer_name(name)
    if momentum is not None and not takes_momentum(name):
        raise ValueError(f"optimizer {name} takes no momentum, got momentum={momentum}; drop it ("
                         f"{', '.join([n for n in OPTIMIZER_ARGS if takes_momentum(n)][:6])}, ... take one)")
    wanted = number_of_betas(name)
    if betas is not None and not wanted:
        raise ValueError(f"optimizer {name} takes no betas, got betas={tuple(betas)}; those that do: "
                         "adam, adamw, lamb, lion, nadam, ...")
    if betas is not None and len(betas) != wanted:
        raise ValueError(f"optimizer {name} takes {wanted} betas, got {len(betas)}: {tuple(betas)}")

    if name not in OWN_OPTIMIZERS:
        import timm
        from timm.optim import list_optimizers

        if name not in list_optimizers():
            raise ValueError(f"optimizer {name} is not in the installed timm {timm.__version__}: upgrade timm")

    def make(groups: list) -> torch.optim.Optimizer:
        if name == "adam":
            return torch.optim.Adam(groups, betas=tuple(betas or (0.9, 0.999)), weight_decay=weight_decay,
                                    fused=fused)
        if name == "sgd":
            return torch.optim.SGD(groups, momentum=0.9 if momentum is None else momentum, weight_decay=weight_decay,
                                   fused=fused)
        from timm.optim import create_optimizer_v2

        extra = {} if betas is None else {"betas": tuple(betas)}
        if momentum is not None:
            extra["momentum"] = momentum
        return create_optimizer_v2(groups, opt=name, weight_decay=weight_decay, **extra)

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


