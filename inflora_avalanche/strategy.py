"""``InfLoRAStrategy``: InfLoRA as an Avalanche ``SupervisedTemplate``."""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

import torch
from avalanche.benchmarks.utils.data_loader import collate_from_data_or_kwargs
from avalanche.core import BasePlugin
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from . import distributed as ddp
from .model import UNSEEN_CLASS_LOGIT, BlockSelection, InfLoRAViT
from .plugins import SubspaceUpdatePlugin, unwrap_model
from .subspace import MEMORY_ALGORITHMS, validate_thresholds

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", "annealing", "step", "constant")
PRECISIONS = ("auto", "bf16", "fp32")


def reference_cosine_factor(epoch: int, num_epochs: int) -> float:
    """The reference's per-epoch factor ``cos(99 pi e / (200 (E - 1)))``: from 1 down to cos(0.495 pi) ~ 0.016."""
    if num_epochs <= 1:
        return 1.0
    return math.cos(99.0 * math.pi * epoch / (200.0 * (num_epochs - 1)))


def cosine_annealing_factor(epoch: int, num_epochs: int) -> float:
    """torch's ``CosineAnnealingLR(T_max=E)`` stepped once per epoch: ``(1 + cos(pi e / E)) / 2`` (the reference's
    InfLoRA+CA on ImageNet-R)."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs))


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


def _silent_default_evaluator() -> EvaluationPlugin:
    """Avalanche's default metrics without loggers (for ranks other than 0)."""
    return EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        loggers=[],
    )


class InfLoRAStrategy(SupervisedTemplate):
    """InfLoRA: per task, train low-rank key/value branches whose inputs avoid the old tasks' subspace.

    Only the current task's up-projections and head are trained, on the current task's logits. Evaluation uses
    every seen head. A :class:`SubspaceUpdatePlugin` (designs branches, updates the memory, merges) is added unless
    one is passed in ``plugins``.

    Args:
        model: an :class:`InfLoRAViT`.
        lr: learning rate of the up-projections (and of the head unless ``head_lr`` is set).
        optimizer: ``"adam"`` (reference default, betas ``betas``) or ``"sgd"`` (``momentum``).
        lr_schedule: ``"cosine"`` (the reference's per-epoch cosine), ``"annealing"`` (torch's
            ``CosineAnnealingLR`` over the epochs, as the reference's InfLoRA+CA on ImageNet-R), ``"step"`` (x ``gamma`` at each of
            ``milestones`` epochs) or ``"constant"``.
        rank, adapted_blocks: override the model's settings (only before its first task).
        lamb, lame, memory, num_tasks: the subspace memory settings of the default plugin.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"bf16"`` or ``"fp32"``.
        input_transform: ``f(x, training) -> x`` applied to each minibatch on the device before the model (batched
            augmentation on the accelerator); the covariance passes use it with ``training=True``.
        compile: run training and evaluation forwards through ``torch.compile``; if compiling fails, a warning is
            given and the eager model is used from then on. Covariance passes always run eagerly.
        Other keyword arguments are those of ``SupervisedTemplate``.

    Under ``torch.distributed`` (e.g. ``torchrun``), ``train_mb_size`` and ``eval_mb_size`` stay global batch sizes:
    each rank takes its share, trains through ``DistributedDataParallel`` and sees the gathered evaluation outputs,
    so metrics and results do not depend on the number of processes.
    """

    def __init__(
        self,
        *,
        model: InfLoRAViT,
        lr: float = 5e-4,
        optimizer: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        head_lr: Optional[float] = None,
        lr_schedule: str = "cosine",
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        rank: Optional[int] = None,
        adapted_blocks: BlockSelection = None,
        lamb: float = 0.95,
        lame: float = 1.0,
        memory: str = "dualgpm",
        num_tasks: Optional[int] = None,
        precision: str = "auto",
        input_transform: Optional[Callable[[torch.Tensor, bool], torch.Tensor]] = None,
        compile: bool = False,
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
        inner = unwrap_model(model)
        if not lr > 0 or (head_lr is not None and not head_lr > 0):
            raise ValueError(f"learning rates must be positive, got lr={lr}, head_lr={head_lr}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if memory not in MEMORY_ALGORITHMS:
            raise ValueError(f"memory must be one of {MEMORY_ALGORITHMS}, got {memory!r}")
        validate_thresholds(lamb, lame)
        if train_mb_size < 1 or train_epochs < 1:
            raise ValueError(f"train_mb_size and train_epochs must be >= 1, got {train_mb_size}, {train_epochs}")
        if train_mb_size % ddp.world_size():
            raise ValueError(
                f"train_mb_size={train_mb_size} must divide by the number of processes ({ddp.world_size()}): "
                "it is the global batch, split evenly across ranks"
            )
        if rank is not None or adapted_blocks is not None:
            inner.configure(rank=rank, adapted_blocks=adapted_blocks)

        plugins = list(plugins or [])
        self.subspace_plugin = next((p for p in plugins if isinstance(p, SubspaceUpdatePlugin)), None)
        if self.subspace_plugin is None:
            self.subspace_plugin = SubspaceUpdatePlugin(lamb=lamb, lame=lame, memory=memory, num_tasks=num_tasks)
            plugins.insert(0, self.subspace_plugin)

        self.lr = lr
        self.head_lr = head_lr if head_lr is not None else lr
        self.optimizer_name = optimizer
        self.betas = tuple(betas)
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        self.precision = precision
        self.input_transform = input_transform
        self.compile = compile
        self._compiled: Optional[nn.Module] = None
        self.lr_scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self._local_targets: Optional[torch.Tensor] = None
        self._current_columns: Optional[torch.Tensor] = None
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

    # ----------------------------------------------------------------------------------------------- precision
    @property
    def use_bf16(self) -> bool:
        device_type = torch.device(self.device).type
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")

    def autocast(self) -> ContextManager:
        """The autocast context of forwards (bf16 by default on CUDA)."""
        if not self.use_bf16:
            return nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    # ----------------------------------------------------------------------------------------------- adaptation
    def _before_training_exp(self, **kwargs: Any) -> None:
        if len(self.experience.dataset) == 0:
            raise ValueError(
                f"experience {self.experience.current_experience} has no training samples; remove it from the stream"
            )
        super()._before_training_exp(**kwargs)

    def model_adaptation(self, model: Optional[nn.Module] = None) -> nn.Module:
        model = self.model if model is None else model
        inner = unwrap_model(model)
        if self.is_training:
            classes = sorted(int(c) for c in self.experience.classes_in_this_experience)
            if inner.num_classes is None:
                inner.num_classes = infer_num_classes(self.experience)
            inner.start_task(classes)
            width = inner.output_width
            local = torch.full((width,), -100, dtype=torch.long)
            local[torch.tensor(classes)] = torch.arange(len(classes))
            self._local_targets = local.to(self.device)
            self._current_columns = torch.tensor(classes, dtype=torch.long, device=self.device)
            if ddp.is_distributed():
                # Re-wrapped per task: the trainable parameters are new. Wrapping broadcasts rank 0's weights.
                inner.to(self.device)
                device_ids = [self.device] if torch.device(self.device).type == "cuda" else None
                return DistributedDataParallel(inner, device_ids=device_ids, forward_sync_buffers=False)
        return model.to(self.device)

    def make_optimizer(self, **kwargs: Any) -> None:
        inner = unwrap_model(self.model)
        self.optimized_param_id = {}  # the optimiser is rebuilt per task; Avalanche's bookkeeping is not used
        if not inner.task_open:
            return
        ups = [adapter.up for _, adapter in inner.adapters()]
        head = list(inner.heads[-1].parameters())
        groups = [{"params": ups, "lr": self.lr}, {"params": head, "lr": self.head_lr}]
        fused = True if torch.device(self.device).type == "cuda" else None
        if self.optimizer_name == "adam":
            self.optimizer = torch.optim.Adam(groups, betas=self.betas, weight_decay=self.weight_decay, fused=fused)
        else:
            self.optimizer = torch.optim.SGD(
                groups, momentum=self.momentum, weight_decay=self.weight_decay, fused=fused
            )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    # ----------------------------------------------------------------------------------------------- data
    def make_train_dataloader(
        self, num_workers: int = 0, shuffle: bool = True, pin_memory: Optional[bool] = None,
        persistent_workers: bool = False, drop_last: bool = False, **kwargs: Any,
    ) -> None:
        if not ddp.is_distributed():
            return super().make_train_dataloader(
                num_workers=num_workers, shuffle=shuffle, pin_memory=pin_memory,
                persistent_workers=persistent_workers, drop_last=drop_last, **kwargs,
            )
        sampler = DistributedSampler(self.adapted_dataset, shuffle=shuffle, drop_last=drop_last)
        self.dataloader = self._distributed_loader(
            sampler, self.train_mb_size, num_workers, pin_memory, persistent_workers, drop_last
        )

    def make_eval_dataloader(
        self, num_workers: int = 0, pin_memory: Optional[bool] = None, persistent_workers: bool = False, **kwargs: Any
    ) -> None:
        if not ddp.is_distributed():
            return super().make_eval_dataloader(
                num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers, **kwargs
            )
        # Padded, unshuffled shards: equal batch counts on every rank; the padding is dropped after gathering.
        sampler = DistributedSampler(self.adapted_dataset, shuffle=False, drop_last=False)
        self._eval_seen, self._eval_size = 0, len(self.adapted_dataset)
        self.dataloader = self._distributed_loader(
            sampler, self.eval_mb_size, num_workers, pin_memory, persistent_workers, False
        )

    def _distributed_loader(
        self, sampler: DistributedSampler, global_batch: int, num_workers: int, pin_memory: Optional[bool],
        persistent_workers: bool, drop_last: bool,
    ) -> DataLoader:
        args: dict[str, Any] = {}
        collate_from_data_or_kwargs(self.adapted_dataset, args)
        return DataLoader(
            self.adapted_dataset,
            batch_size=max(1, global_batch // ddp.world_size()),
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=torch.device(self.device).type == "cuda" if pin_memory is None else pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            drop_last=drop_last,
            **args,
        )

    def _before_training_epoch(self, **kwargs: Any) -> None:
        sampler = getattr(self.dataloader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.clock.train_exp_epochs)
        super()._before_training_epoch(**kwargs)

    def _lr_factor(self, epoch: int) -> float:
        if self.lr_schedule == "cosine":
            return reference_cosine_factor(epoch, self.train_epochs)
        if self.lr_schedule == "annealing":
            return cosine_annealing_factor(epoch, self.train_epochs)
        if self.lr_schedule == "step":
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        return 1.0

    def _after_training_epoch(self, **kwargs: Any) -> None:
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        super()._after_training_epoch(**kwargs)

    # ----------------------------------------------------------------------------------------------- step
    def prepare_input(self, x: torch.Tensor, training: bool = True) -> torch.Tensor:
        """The minibatch as the model sees it (after ``input_transform``, if any)."""
        return x if self.input_transform is None else self.input_transform(x, training)

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
        if unwrap_model(self.model).num_classes is None:
            # The model does not know the stream's label range: widen with unseen-class logits.
            missing = int(self.mb_y.max()) + 1 - out.shape[1]
            if missing > 0:
                out = torch.cat([out, out.new_full((out.shape[0], missing), UNSEEN_CLASS_LOGIT)], dim=1)
        return out

    def _gather_eval_batch(self, out: torch.Tensor) -> torch.Tensor:
        """Every rank's outputs and labels of this batch, in dataset order, without the sampler's padding."""
        local = out.shape[0]
        world = ddp.world_size()
        positions = (self._eval_seen + torch.arange(local, device=out.device)).repeat_interleave(world) * world
        positions += torch.arange(world, device=out.device).repeat(local)
        keep = positions < self._eval_size
        self._eval_seen += local
        gathered = ddp.gather_interleaved(out)[keep]
        self.mbatch[1] = ddp.gather_interleaved(self.mbatch[1])[keep]
        self.mbatch[-1] = ddp.gather_interleaved(self.mbatch[-1])[keep]
        return gathered

    def criterion(self) -> torch.Tensor:
        if self.is_training and self._current_columns is not None:
            logits = self.mb_output[:, self._current_columns]
            return self._criterion(logits, self._local_targets[self.mb_y])
        return self._criterion(self.mb_output, self.mb_y)

    def _after_training_exp(self, **kwargs: Any) -> None:
        super()._after_training_exp(**kwargs)
        self._current_columns = None
        self._local_targets = None
        self.optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=self.lr)  # frees Adam's state
        self.lr_scheduler = None
