"""``LowRankStrategy``: the Avalanche ``SupervisedTemplate`` of the low-rank continual methods; ``InfLoRAStrategy``
and ``SDLoRAStrategy``: InfLoRA and SD-LoRA on it."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from avalanche.core import BasePlugin
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed as ddp
from . import training
from .model import UNSEEN_CLASS_LOGIT, BlockSelection, InfLoRAViT, LowRankViT
from .plugin_support import check_criterion, check_plugins
from .plugins import ForwardContext, SubspaceUpdatePlugin, experience_classes, unwrap_model
from .subspace import MEMORY_ALGORITHMS, validate_thresholds
from .training import LR_SCHEDULES, OPTIMIZERS, PRECISIONS, cosine_annealing_factor, reference_cosine_factor

__all__ = ["InfLoRAStrategy", "LowRankStrategy", "SDLoRAStrategy", "LR_SCHEDULES", "OPTIMIZERS", "PRECISIONS",
           "cosine_annealing_factor", "reference_cosine_factor"]


def infer_num_classes(experience: Any) -> Optional[int]:
    """``1 + the largest label`` of the stream ``experience`` belongs to, from Avalanche's class timeline."""
    labels: set[int] = set()
    for attr in ("classes_in_this_experience", "previous_classes", "classes_seen_so_far", "future_classes"):
        try:
            labels |= {int(c) for c in getattr(experience, attr)}
        except Exception:  # attribute missing or masked in this experience type
            continue
    try:
        labels |= {int(c) for c in experience.origin_stream.benchmark.classes_order}
    except Exception:
        pass
    return max(labels) + 1 if labels else None


def check_experience_fits(experience: Any, plugins: Sequence[Any]) -> None:
    """Refuse, in one line and before anything of the experience runs, what one task per experience cannot learn:
    a sub-experience of an online stream, or a single class without classifier alignment."""
    if getattr(experience, "origin_experience", None) is not None or hasattr(experience, "subexp_size"):
        raise ValueError(
            "the low-rank strategies learn one task per experience: each task's branches are designed from the whole "
            "experience's inputs before training and merged when it ends, which the minibatch-sized sub-experiences "
            "of an online stream (split_online_stream) do not allow; train on the parent stream's experiences"
        )
    classes = experience_classes(experience)
    if len(classes) == 1 and not any(getattr(p, "aligns_single_class_tasks", False) for p in plugins):
        raise ValueError(
            f"experience {experience.current_experience} has a single class ({classes[0]}): its own head has nothing "
            "to tell it from, and with the old heads frozen and no old samples nothing learns to tell it from the "
            "earlier classes; add ClassifierAlignmentPlugin(logit_normalization=False) (the runner's "
            "--classifier-alignment '{\"logit_normalization\": false}'), which trains every head on the stored class "
            "statistics after each task, or put at least two classes in each experience"
        )


def _silent_default_evaluator() -> EvaluationPlugin:
    """Avalanche's default metrics without loggers (for ranks other than 0)."""
    return EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        loggers=[],
    )


class LowRankStrategy(SupervisedTemplate):
    """What the low-rank continual methods share (:class:`InfLoRAStrategy`, ``SDLoRAStrategy``): per task, train the
    new low-rank branches of a :class:`~inflora_avalanche.model.LowRankViT` and a new head.

    The strategy owns each task's lifecycle: it opens the task (a head and a new branch in every adapted layer) when
    the experience starts, trains what the model says is trainable (``trainable_parameter_groups()``: the branches'
    group at ``lr``, the head's at ``head_lr``, any other group the model declares at ``lr``), and closes the task
    when training ends: plugins with ``update_task_memory(strategy)`` update their memories with the trained branch
    live, then the model finishes the task (its adapters close their branches, the head is frozen), before the other
    plugins' ``after_training_exp``. Training runs on the task's own classes with the user's ``criterion`` (an
    experience of a single class needs ``ClassifierAlignmentPlugin(logit_normalization=False)``: alone its loss is
    0). A sample of an earlier task (e.g. from a ``ReplayPlugin``) is trained on its own task's head, so its
    gradient reaches the current branches. Evaluation uses every seen head (class-incremental), or with
    ``eval_task_labels`` only the classes trained under the sample's task label; it works before any training.
    Plugins and criteria the strategy cannot honour are refused when it is built
    (:mod:`~inflora_avalanche.plugin_support`), online sub-experiences when they arrive.

    Args:
        model: a :class:`~inflora_avalanche.model.LowRankViT`.
        lr: learning rate of the branches (and of the head unless ``head_lr`` is set).
        optimizer: ``"adam"`` (reference default, betas ``betas``, default ``(0.9, 0.999)``), ``"sgd"``
            (``momentum``) or a timm optimiser name (``"adamw"``, ``"lamb"``, ``"lion"``, ...: built by
            ``timm.optim.create_optimizer_v2`` with ``betas`` and ``momentum`` where it takes them; the list is
            :data:`~inflora_avalanche.optimizer_names.OPTIMIZERS`); or pass ``optimizer_factory(param_groups) ->
            Optimizer`` to bring your own (it gets the branches' group and the head's group with their ``lr``).
        lr_schedule: ``"cosine"`` (the reference's CosineSchedule), ``"annealing"`` (torch's CosineAnnealingLR),
            ``"step"`` (x ``gamma`` at each of ``milestones`` epochs) or ``"constant"``, after ``warmup_epochs``
            epochs of linear warmup from ``warmup_factor`` x lr (:func:`~inflora_avalanche.training.with_warmup`;
            0, the default: none); or pass ``scheduler_factory(optimizer, epochs) -> scheduler``, rebuilt for every
            task: a torch ``LRScheduler`` is stepped (``step()``) after every epoch, a timm scheduler gets
            ``step(epoch + 1)`` after every epoch and ``step_update(num_updates)`` after every optimiser step (both
            counted from the task's start).
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"bf16"`` or ``"fp32"``.
        input_transform: ``f(x, training) -> x`` applied to each minibatch on the device before the model (batched
            augmentation on the accelerator); plugins' own passes use it too (:meth:`forward_context`).
        compile: run training and evaluation forwards through ``torch.compile``; if compiling fails, a warning is
            given and the eager model is used from then on. Covariance passes always run eagerly.
        eval_task_labels: at evaluation, predict among the classes trained under the sample's task label
            (task-incremental) instead of among all seen classes.
        Other keyword arguments are those of ``SupervisedTemplate``.

    Under ``torch.distributed`` (e.g. ``torchrun``), ``train_mb_size`` and ``eval_mb_size`` stay global batch sizes:
    each rank takes its share, trains through ``DistributedDataParallel`` and sees the gathered evaluation outputs,
    so metrics and results do not depend on the number of processes.
    """

    def __init__(
        self,
        *,
        model: LowRankViT,
        lr: float = 5e-4,
        optimizer: str = "adam",
        betas: Optional[Sequence[float]] = None,
        momentum: Optional[float] = None,
        weight_decay: float = 0.0,
        head_lr: Optional[float] = None,
        lr_schedule: str = "cosine",
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        warmup_factor: Optional[float] = None,
        optimizer_factory: Optional[training.OptimizerFactory] = None,
        scheduler_factory: Optional[training.SchedulerFactory] = None,
        precision: str = "auto",
        input_transform: Optional[Callable[[torch.Tensor, bool], torch.Tensor]] = None,
        compile: bool = False,
        eval_task_labels: bool = False,
        criterion: nn.Module = nn.CrossEntropyLoss(),
        train_mb_size: int = 128,
        train_epochs: int = 20,
        eval_mb_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[Sequence[BasePlugin]] = None,
        evaluator: Any = default_evaluator,
        eval_every: int = -1,
        **kwargs: Any,
    ) -> None:
        unwrap_model(model)  # a LowRankViT, or a one-line TypeError
        if not lr > 0 or (head_lr is not None and not head_lr > 0):
            raise ValueError(f"learning rates must be positive, got lr={lr}, head_lr={head_lr}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if train_mb_size < 1 or train_epochs < 1:
            raise ValueError(f"train_mb_size and train_epochs must be >= 1, got {train_mb_size}, {train_epochs}")
        if train_mb_size % ddp.world_size():
            raise ValueError(
                f"train_mb_size={train_mb_size} must divide by the number of processes ({ddp.world_size()}): "
                "it is the global batch, split evenly across ranks"
            )
        fused = True if torch.device(device).type == "cuda" else None
        self.optimizer_factory = optimizer_factory or training.optimizer_factory(
            optimizer, betas, momentum, weight_decay, fused)
        if scheduler_factory is not None and warmup_epochs:
            raise ValueError("warmup_epochs applies to the built-in lr_schedule; with scheduler_factory put the warmup "
                             "in your scheduler (e.g. timm's CosineLRScheduler(warmup_t=...))")
        if warmup_factor is not None and not warmup_epochs:
            raise ValueError(f"warmup_factor={warmup_factor} does nothing without warmup_epochs: drop it or set "
                             "warmup_epochs")
        warmup_factor = training.DEFAULT_WARMUP_FACTOR if warmup_factor is None else warmup_factor
        training.check_warmup(warmup_epochs, warmup_factor, train_epochs)
        self.scheduler_factory = scheduler_factory or training.epoch_scheduler(lr_schedule, milestones, gamma,
                                                                               warmup_epochs, warmup_factor)
        plugins = list(plugins or [])
        check_plugins(plugins, input_transform)
        self._reduction = check_criterion(criterion)

        self.lr = lr
        self.head_lr = head_lr if head_lr is not None else lr
        self.precision = precision
        self.input_transform = input_transform
        self.compile = compile
        self.eval_task_labels = eval_task_labels
        self.task_label_classes: dict[int, list[int]] = {}  # task label -> classes trained under it
        self._compiled: Optional[nn.Module] = None
        self.lr_scheduler: Optional[Any] = None
        self._scheduler_kind = "torch"  # or "timm": how lr_scheduler is stepped (training.scheduler_kind)
        self._task_epochs = self._task_updates = 0  # epochs and optimiser steps of the current task (timm's counts)
        self._local_targets: Optional[torch.Tensor] = None  # per label: its index in its own task's head
        self._current_targets: Optional[torch.Tensor] = None  # per label: its index among the trained columns
        self._current_columns: Optional[torch.Tensor] = None
        self._own_loader: Any = None  # the loader built over the experience's own data (see _replaying)
        self._eval_seen = 0  # per-rank samples evaluated in the current experience (distributed gathering)
        self._eval_size = 0
        if evaluator is default_evaluator and not ddp.is_main_process():
            evaluator = _silent_default_evaluator  # Avalanche refuses loggers outside rank 0
        placeholder = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)  # replaced in make_optimizer
        super().__init__(
            model=model,
            optimizer=placeholder,
            criterion=criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size if eval_mb_size is not None else train_mb_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
            eval_every=eval_every,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------------- forwards
    @property
    def use_bf16(self) -> bool:
        return training.uses_bf16(self.precision, self.device)

    def autocast(self):
        """The autocast context of forwards (bf16 by default on CUDA)."""
        return training.autocast(self.precision, self.device)

    def prepare_input(self, x: torch.Tensor, training: bool = True) -> torch.Tensor:
        """The minibatch as the model sees it (after ``input_transform``, if any)."""
        return x if self.input_transform is None else self.input_transform(x, training)

    def forward_context(self, training: bool = False) -> ForwardContext:
        """How this strategy runs a forward (input transform in ``training`` mode, autocast), for plugins that pass
        over data themselves: ``strategy.forward_context().features(model, x)``."""
        transform = None if self.input_transform is None else (lambda x: self.input_transform(x, training))
        return ForwardContext(transform, self.autocast)

    # ----------------------------------------------------------------------------------------------- adaptation
    def _before_training_exp(self, **kwargs: Any) -> None:
        check_experience_fits(self.experience, self.plugins)
        if len(self.experience.dataset) == 0:
            raise ValueError(
                f"experience {self.experience.current_experience} has no training samples; remove it from the stream "
                "(Avalanche's class_incremental_benchmark splits the labels 0..max, so labels that are not 0..C-1 "
                "leave experiences empty: build the stream with inflora_avalanche.streams.class_incremental_stream "
                "or nc_benchmark instead)"
            )
        super()._before_training_exp(**kwargs)

    def model_adaptation(self, model: Optional[nn.Module] = None) -> nn.Module:
        model = self.model if model is None else model
        inner = unwrap_model(model)
        if self.is_training:
            classes = experience_classes(self.experience)
            if inner.num_classes is None:
                inner.num_classes = infer_num_classes(self.experience)
            inner.start_task(classes)
            for label in getattr(self.experience, "task_labels", None) or []:
                known = self.task_label_classes.setdefault(int(label), [])
                known.extend(c for c in classes if c not in known)
            width = inner.output_width
            local = torch.full((width,), -100, dtype=torch.long)
            for task_classes in inner.task_classes:  # every seen class: its index in its own task's head
                local[torch.tensor(task_classes)] = torch.arange(len(task_classes))
            self._local_targets = local.to(self.device)
            current = torch.full((width,), -100, dtype=torch.long)
            current[torch.tensor(classes)] = torch.arange(len(classes))
            self._current_targets = current.to(self.device)
            self._current_columns = torch.tensor(classes, dtype=torch.long, device=self.device)
            if ddp.is_distributed():
                # Re-wrapped per task: the trainable parameters are new. Wrapping broadcasts rank 0's weights.
                inner.to(self.device)
                device_ids = [self.device] if torch.device(self.device).type == "cuda" else None
                return DistributedDataParallel(inner, device_ids=device_ids, forward_sync_buffers=False)
        return model.to(self.device)

    def _before_eval_exp(self, **kwargs: Any) -> None:
        inner = unwrap_model(self.model)
        if inner.num_classes is None:  # evaluated before any training: the width is the stream's label range
            inner.num_classes = infer_num_classes(self.experience)
        super()._before_eval_exp(**kwargs)

    def make_optimizer(self, **kwargs: Any) -> None:
        inner = unwrap_model(self.model)
        self.optimized_param_id = {}  # the optimiser is rebuilt per task; Avalanche's bookkeeping is not used
        if not inner.task_open:
            return
        groups = inner.trainable_parameter_groups()
        self.optimizer = self.optimizer_factory([{"params": params, "lr": self.head_lr if name == "head" else self.lr}
                                                 for name, params in groups.items()])
        self.lr_scheduler = self.scheduler_factory(self.optimizer, self.train_epochs)
        self._scheduler_kind = training.scheduler_kind(self.lr_scheduler)
        self._task_epochs = self._task_updates = 0

    # ----------------------------------------------------------------------------------------------- data
    def make_train_dataloader(self, num_workers: int = 0, shuffle: bool = True, pin_memory: Optional[bool] = None,
                              persistent_workers: bool = False, drop_last: bool = False, **kwargs: Any) -> None:
        if not ddp.is_distributed():
            super().make_train_dataloader(
                num_workers=num_workers, shuffle=shuffle, pin_memory=pin_memory,
                persistent_workers=persistent_workers, drop_last=drop_last, **kwargs,
            )
        else:
            self.dataloader = ddp.sharded_loader(self.adapted_dataset, self.train_mb_size, self.device, num_workers,
                                                 pin_memory, persistent_workers, drop_last, shuffle=shuffle)
        self._own_loader = self.dataloader

    def make_eval_dataloader(self, num_workers: int = 0, pin_memory: Optional[bool] = None,
                             persistent_workers: bool = False, **kwargs: Any) -> None:
        if not ddp.is_distributed():
            return super().make_eval_dataloader(
                num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers, **kwargs
            )
        # Padded, unshuffled shards: equal batch counts on every rank; the padding is dropped after gathering.
        self._eval_seen, self._eval_size = 0, len(self.adapted_dataset)
        self.dataloader = ddp.sharded_loader(self.adapted_dataset, self.eval_mb_size, self.device, num_workers,
                                             pin_memory, persistent_workers, False, shuffle=False)

    def _before_training_epoch(self, **kwargs: Any) -> None:
        ddp.set_sampler_epoch(self.dataloader, self.clock.train_exp_epochs)
        super()._before_training_epoch(**kwargs)

    def _after_training_epoch(self, **kwargs: Any) -> None:
        if self.lr_scheduler is not None:
            self._task_epochs += 1
            if self._scheduler_kind == "timm":
                self.lr_scheduler.step(self._task_epochs)  # timm's train.py: step(epoch + 1) after each epoch
            else:
                self.lr_scheduler.step()
        super()._after_training_epoch(**kwargs)

    def _after_update(self, **kwargs: Any) -> None:
        if self.lr_scheduler is not None and self._scheduler_kind == "timm":
            self._task_updates += 1
            self.lr_scheduler.step_update(self._task_updates)  # a no-op unless its schedule counts updates
        super()._after_update(**kwargs)

    # ----------------------------------------------------------------------------------------------- step
    def _compiled_model(self) -> Optional[nn.Module]:
        if not self.compile or ddp.is_distributed():
            return None
        if self._compiled is None:
            self._compiled = torch.compile(unwrap_model(self.model))
        return self._compiled

    def forward(self) -> torch.Tensor:
        model = self.model if self.is_training else unwrap_model(self.model)
        x = self.prepare_input(self.mb_x, self.is_training)
        with self.autocast():
            compiled = self._compiled_model()
            out = None
            if compiled is not None:
                try:
                    out = compiled(x)
                except Exception as err:  # compilation is an optimisation: never let it stop a run
                    warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); continuing without it")
                    self.compile, self._compiled = False, None
            if out is None:
                out = model(x)
        if self.is_training:
            return out
        if ddp.is_distributed():
            out = self._gather_eval_batch(out)
        missing = int(self.mb_y.max()) + 1 - out.shape[1] if self.mb_y.numel() else 0
        if missing > 0:  # labels beyond the model's width (a stream whose label range it was not told)
            out = torch.cat([out, out.new_full((out.shape[0], missing), UNSEEN_CLASS_LOGIT)], dim=1)
        if self.eval_task_labels:
            out = out.masked_fill(~self._task_label_columns(out), UNSEEN_CLASS_LOGIT)
        return out

    def _known_columns(self, out: torch.Tensor) -> torch.Tensor:
        """Per sample, the columns the model can predict: the trained classes (under the sample's task label with
        ``eval_task_labels``)."""
        known = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
        known[[c for c in unwrap_model(self.model).seen_classes if c < out.shape[1]]] = True
        known = known.expand_as(out)
        return known & self._task_label_columns(out) if self.eval_task_labels else known

    def _task_label_columns(self, out: torch.Tensor) -> torch.Tensor:
        """Task-incremental prediction: per sample, the columns of the classes trained under its task label."""
        allowed = torch.zeros(max(self.task_label_classes, default=0) + 1, out.shape[1], dtype=torch.bool,
                              device=out.device)
        for label, classes in self.task_label_classes.items():
            allowed[label, [c for c in classes if c < out.shape[1]]] = True
        labels = self.mb_task_id.to(out.device).clamp(max=allowed.shape[0] - 1)
        return allowed[labels]

    def _gather_eval_batch(self, out: torch.Tensor) -> torch.Tensor:
        """Every rank's outputs and labels of this batch, in dataset order, without the sampler's padding."""
        keep = ddp.unpadded_positions(self._eval_seen, out.shape[0], self._eval_size, out.device)
        self._eval_seen += out.shape[0]
        gathered = ddp.gather_interleaved(out)[keep]
        self.mbatch[1] = ddp.gather_interleaved(self.mbatch[1])[keep]
        self.mbatch[-1] = ddp.gather_interleaved(self.mbatch[-1])[keep]
        return gathered

    def criterion(self) -> torch.Tensor:
        """Training: cross-entropy of each sample over its own task's head (the current task's, unless the sample
        was replayed from an earlier one). Evaluation: over every column."""
        if not self.is_training:
            return self._evaluation_loss()
        if self._current_columns is None:
            return self._criterion(self.mb_output, self.mb_y)
        if not self._replaying():
            logits = self.mb_output[:, self._current_columns]
            return self._criterion(logits, self._current_targets[self.mb_y])
        return self._mixed_task_loss()

    def _evaluation_loss(self) -> torch.Tensor:
        """The criterion over the classes the model can predict. A sample of a class it cannot predict yet counts
        as one more class at the sample's lowest logit (a finite loss of the size of a badly ranked class, not the
        ~1e4 of the unseen-class logit); before any training every class scores 0 (a loss of log C)."""
        out, y = self.mb_output.float(), self.mb_y
        known = self._known_columns(out)
        patterns, group = torch.unique(known, dim=0, return_inverse=True)
        parts = []
        for g, columns in enumerate(patterns):
            rows = group == g
            logits, labels = out[rows][:, columns], y[rows]
            if not columns.any():
                parts.append((torch.zeros_like(out[rows]), labels))
                continue
            position = torch.cumsum(columns.long(), 0) - 1  # a known label's index among the known columns
            seen = columns[labels]
            parts.append((logits[seen], position[labels[seen]]))
            lowest = logits[~seen].amin(dim=1, keepdim=True)
            parts.append((torch.cat([logits[~seen], lowest], dim=1),
                          torch.full_like(labels[~seen], logits.shape[1])))
        return self._criterion_over_parts(parts, y.numel())

    def _criterion_over_parts(self, parts: list, size: int) -> torch.Tensor:
        """The criterion over a batch of ``size`` samples scored in parts (``(logits, targets)`` on different
        columns), combined as its reduction would combine them: a size-weighted mean, or a sum."""
        total = torch.zeros((), dtype=torch.float32, device=self.mb_output.device)
        for logits, targets in parts:
            if targets.numel():
                loss = self._criterion(logits, targets)
                total = total + (loss * targets.numel() if self._reduction == "mean" else loss)
        return total / max(1, size) if self._reduction == "mean" else total

    def _replaying(self) -> bool:
        """Whether batches may hold samples of earlier tasks: a plugin (replay, GDumb, ...) swapped in a loader other
        than the one the strategy built over the experience's own data."""
        return self.dataloader is not self._own_loader

    def _mixed_task_loss(self) -> torch.Tensor:
        """The criterion over a batch that mixes tasks: each task's samples scored on their own task's columns."""
        inner = unwrap_model(self.model)
        y, out = self.mb_y, self.mb_output
        parts = []
        last = len(inner.task_classes) - 1
        for task, classes in enumerate(inner.task_classes):
            mask = torch.isin(y, torch.tensor(classes, device=out.device))
            if task == last:
                columns, targets = self._current_columns, self._current_targets[y[mask]]
            else:
                columns, targets = torch.tensor(classes, device=out.device), self._local_targets[y[mask]]
            parts.append((out[mask][:, columns], targets))
        return self._criterion_over_parts(parts, y.numel())

    def _after_training_exp(self, **kwargs: Any) -> None:
        # Close the task: the memory plugins see the trained branch live, then it is merged and the head frozen;
        # the other plugins (alignment, diagnostics, evaluation, ...) see the closed task.
        inner = unwrap_model(self.model)
        if inner.task_open:
            for plugin in self.plugins:
                if callable(getattr(plugin, "update_task_memory", None)):
                    plugin.update_task_memory(self)
            inner.finish_task()
        super()._after_training_exp(**kwargs)
        self._current_columns = None
        self._local_targets = self._current_targets = None
        self.optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=self.lr)  # frees Adam's state
        self.lr_scheduler = None

    # ----------------------------------------------------------------------------------------------- state
    def get_extra_state(self) -> dict:
        """The strategy's own state (the classes trained under each task label); the model, plugins and metrics
        keep theirs (see :mod:`inflora_avalanche.strategy_state`)."""
        return {"task_label_classes": {str(k): list(v) for k, v in self.task_label_classes.items()}}

    def set_extra_state(self, state: dict) -> None:
        self.task_label_classes = {int(k): list(v) for k, v in state.get("task_label_classes", {}).items()}

    def state_dict(self) -> dict:
        """Everything needed to continue this strategy mid-stream, between two experiences (see
        :mod:`inflora_avalanche.strategy_state`)."""
        from .strategy_state import strategy_state

        return strategy_state(self)

    def load_state_dict(self, state: dict) -> None:
        from .strategy_state import load_strategy_state

        load_strategy_state(self, state)


class InfLoRAStrategy(LowRankStrategy):
    """InfLoRA: per task, train low-rank branches (on the layers the model adapts) whose inputs avoid the old tasks'
    subspace. A :class:`LowRankStrategy` with a :class:`SubspaceUpdatePlugin` (designs each branch's ``down`` before
    the task, updates the memories when it closes), added unless one is passed in ``plugins``.

    Args:
        model: an :class:`~inflora_avalanche.model.InfLoRAViT`.
        rank, adapted_blocks: override the model's settings (only before its first task).
        lamb, lame, memory, num_tasks: the subspace memory settings of the default plugin (``num_tasks`` is read
            from the stream when omitted; a slice of a stream needs it).
        Other arguments: those of :class:`LowRankStrategy` (learning rates, optimiser and schedule, precision,
        input transform, compile, task labels) and of Avalanche's ``SupervisedTemplate``.
    """

    def __init__(
        self,
        *,
        model: InfLoRAViT,
        rank: Optional[int] = None,
        adapted_blocks: BlockSelection = None,
        lamb: float = 0.95,
        lame: float = 1.0,
        memory: str = "dualgpm",
        num_tasks: Optional[int] = None,
        plugins: Optional[Sequence[BasePlugin]] = None,
        **kwargs: Any,
    ) -> None:
        inner = unwrap_model(model)
        if not isinstance(inner, InfLoRAViT):
            raise TypeError(f"InfLoRAStrategy needs an InfLoRAViT model, got {type(inner).__name__}")
        if memory not in MEMORY_ALGORITHMS:
            raise ValueError(f"memory must be one of {MEMORY_ALGORITHMS}, got {memory!r}")
        validate_thresholds(lamb, lame)
        if rank is not None or adapted_blocks is not None:
            inner.configure(rank=rank, adapted_blocks=adapted_blocks)
        plugins = list(plugins or [])
        self.subspace_plugin = next((p for p in plugins if isinstance(p, SubspaceUpdatePlugin)), None)
        if self.subspace_plugin is None:
            self.subspace_plugin = SubspaceUpdatePlugin(lamb=lamb, lame=lame, memory=memory, num_tasks=num_tasks)
            plugins.insert(0, self.subspace_plugin)
        super().__init__(model=model, plugins=plugins, **kwargs)


class SDLoRAStrategy(LowRankStrategy):
    """SD-LoRA (Wu et al., ICLR 2025) as its official code trains it: per task, a new low-rank pair in every adapted
    layer (both factors trained), the magnitudes of every task so far (shared by all layers; the model resets them
    when a task starts unless told to keep them) and the task's head, with cross-entropy on the task's own head.
    A :class:`LowRankStrategy` on an :class:`~inflora_avalanche.sdlora.SDLoRAViT` with the official optimiser as
    its defaults: SGD with momentum 0.9, no weight decay, the rate multiplied by ``gamma`` at each of ``milestones``
    epochs (none: constant), rebuilt for every task.

    Args:
        model: an :class:`~inflora_avalanche.sdlora.SDLoRAViT`.
        fold_for_eval: evaluate with every branch folded into the weights (one plain linear per layer, however
            many tasks came before), restored bit for bit afterwards; training never sees folded weights.
        Other arguments: those of :class:`LowRankStrategy` and of Avalanche's ``SupervisedTemplate``.
    """

    def __init__(self, *, model: nn.Module, lr: float = 8e-3, optimizer: str = "sgd", momentum: Optional[float] = None,
                 lr_schedule: str = "step", milestones: Sequence[int] = (), gamma: float = 0.1,
                 fold_for_eval: bool = True, **kwargs: Any) -> None:
        from .sdlora import SDLoRAViT

        inner = unwrap_model(model)
        if not isinstance(inner, SDLoRAViT):
            raise TypeError(f"SDLoRAStrategy needs an SDLoRAViT model, got {type(inner).__name__}")
        self.fold_for_eval = bool(fold_for_eval)
        super().__init__(model=model, lr=lr, optimizer=optimizer, momentum=momentum, lr_schedule=lr_schedule,
                         milestones=milestones, gamma=gamma, **kwargs)

    def eval(self, *args: Any, **kwargs: Any) -> Any:
        if not self.fold_for_eval:
            return super().eval(*args, **kwargs)
        with unwrap_model(self.model).folded():
            return super().eval(*args, **kwargs)
