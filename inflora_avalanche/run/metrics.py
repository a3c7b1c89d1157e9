"""What the runner measures besides Avalanche's metrics: task-aware accuracy, a finite-loss guard, the parameters
a method really updates, and peak memory."""

from __future__ import annotations

import re
import resource
from typing import Any, Callable, Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation import PluginMetric

from .. import distributed as ddp


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names seed, experience and iteration."""


def task_columns(model: Any) -> Optional[list]:
    """The label columns of each task's head, for models that have per-task heads (``InfLoRAViT``)."""
    from ..plugins import unwrap_model

    try:
        return list(unwrap_model(model).task_classes)
    except (AttributeError, TypeError):
        return None


class TaskAwareAccuracy(PluginMetric):
    """Accuracy when the task id is given: the argmax runs over the classes of the sample's own experience.

    The classes of each trained experience come from the model's per-task heads when it has them, else from the
    experiences trained so far. Emits ``TaskAware_Acc_Exp/eval_phase/<stream>/ExpNNN`` per experience and
    ``TaskAware_Acc_Stream/eval_phase/<stream>`` (sample-weighted over the evaluated experiences)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[int, list[int]] = {}
        self.trained_classes: list[list[int]] = []

    def reset(self) -> None:
        self.counts = {}

    def result(self) -> dict[int, float]:
        return {exp: c / n for exp, (c, n) in self.counts.items() if n}

    def after_training_exp(self, strategy: Any) -> None:
        # JointTraining trains every experience at once: each of them is a task whose classes were learned
        experiences = getattr(strategy, "_experiences", None) or [strategy.experience]
        for experience in experiences:
            classes = sorted(int(c) for c in experience.classes_in_this_experience)
            if classes not in self.trained_classes:
                self.trained_classes.append(classes)

    def before_eval(self, strategy: Any) -> None:
        self.reset()

    def state_dict(self) -> dict:
        """The classes of the experiences trained so far (for an exact resume)."""
        return {"trained_classes": [list(c) for c in self.trained_classes]}

    def load_state_dict(self, state: dict) -> None:
        self.trained_classes = [[int(c) for c in classes] for classes in state["trained_classes"]]

    @torch.no_grad()
    def after_eval_iteration(self, strategy: Any) -> None:
        out, y = strategy.mb_output, strategy.mb_y
        groups = task_columns(strategy.model)
        if groups is None:
            groups = self.trained_classes
        correct = 0
        for classes in groups:
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


def metric_value(metrics: dict, prefix: str) -> float:
    """The value of the metric whose name is ``prefix`` (optionally followed by ``/TaskNNN``); NaN if absent."""
    for key, value in metrics.items():
        if key == prefix or re.fullmatch(re.escape(prefix) + r"/Task\d+", key):
            return float(value)
    return float("nan")


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
            f"{iteration} (epoch {(iteration - 1) // per_epoch + 1}); lower the learning rate (--lr) or check the "
            "inputs"
        )


class UpdatedParameterCounter(SupervisedPlugin):
    """Counts the parameters that actually receive optimiser updates (in the optimiser and with a gradient).

    ``per_experience[i]`` is the count of experience i; ``total`` counts distinct tensors over the whole stream
    (InfLoRA trains new branches per task, so its total exceeds its per-experience count).
    """

    def __init__(self) -> None:
        super().__init__()
        #: tensors a plugin trains with its own optimiser after the experience (InfLoRA+CA's old heads)
        self.also_updated: Optional[Callable[[Any], list[torch.Tensor]]] = None
        self.per_experience: list[int] = []
        # id -> tensor: holding the tensor keeps its id from being reused by a later task's new branch
        self._current: dict[int, torch.Tensor] = {}
        self._all: dict[int, torch.Tensor] = {}

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        for group in strategy.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._current[id(p)] = p

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.also_updated is not None:
            for p in self.also_updated(strategy):
                self._current[id(p)] = p
        self.per_experience.append(sum(p.numel() for p in self._current.values()))
        self._all.update(self._current)
        self._current = {}

    @property
    def total(self) -> int:
        return sum(p.numel() for p in self._all.values())


def _proc_status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_memory(device: str) -> float:
    """Start a new peak-memory window; returns the baseline the peak is measured above (MiB).

    CUDA: resets the allocator's peak, baseline 0. CPU (Linux): resets the process's peak RSS (``VmHWM``, via
    ``/proc/self/clear_refs``) and returns the RSS now, i.e. libraries and data already loaded. Elsewhere the
    baseline is the lifetime peak RSS so far (``getrusage``), so a peak below it reads as 0.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        rss = _proc_status_mb("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_mb(device: str) -> tuple[float, str]:
    """Peak memory of the current window: CUDA max allocated, else the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm, "peak RSS above the process baseline (libraries and data loaded)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "max RSS above the process baseline"
