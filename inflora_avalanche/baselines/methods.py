"""One builder per compared method: every method is an Avalanche strategy on the same backbone.

``build_strategy(name, backbone, settings)`` returns a ready strategy. All methods but InfLoRA's own variants use
:class:`~inflora_avalanche.baselines.models.LinearHeadViT` (one ``IncrementalClassifier`` over all classes of the
stream, unseen classes masked), and every method restarts its optimiser at each experience, as InfLoRA does.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import EWC, JointTraining, LwF, Naive
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from ..model import InfLoRAViT
from ..strategy import InfLoRAStrategy
from .l2p_compat import BackboneNotSupported, L2PCompat
from .models import LinearHeadViT
from .seq_lora import RandomSubspacePlugin


class MethodNotApplicable(ValueError):
    """The method cannot run on this backbone or in this environment; the reason goes in the results table."""


@dataclass
class Settings:
    """Training settings shared by all methods, plus each method's own hyper-parameters.

    ``hparams`` overrides entries of :data:`DEFAULT_HPARAMS` per method, e.g. ``{"ewc": {"ewc_lambda": 100}}``.
    """

    num_classes: int
    num_experiences: int
    epochs: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    device: str = "cpu"
    precision: str = "fp32"
    seed: int = 0
    hparams: dict = field(default_factory=dict)
    lr_scale: float = 1.0

    def method_hparams(self, method: str) -> dict:
        """The method's hyper-parameters: defaults, overrides, then every learning rate times ``lr_scale``."""
        merged = dict(DEFAULT_HPARAMS[method])
        merged.update(self.hparams.get(method, {}))
        for key in LR_KEYS & set(merged):
            merged[key] = merged[key] * self.lr_scale
        return merged


#: Hyper-parameters per method. InfLoRA's are the paper's CIFAR-100 presets; the full fine-tuning methods train the
#: backbone 50x slower than the head; L2P uses its paper's Adam lr 0.03 scaled by batch / 256.
DEFAULT_HPARAMS: dict[str, dict[str, Any]] = {
    "inflora": {"lr": 5e-4, "rank": 10, "memory": "dualgpm", "lamb": 0.95, "lame": 1.0},
    "inflora_b5": {"lr": 1e-3, "rank": 10, "adapted_blocks": 5, "memory": "gpm", "lamb": 0.95, "lame": 1.0},
    "inflora_ca": {
        "lr": 1e-3, "head_lr": 1e-2, "weight_decay": 1e-3, "rank": 5, "memory": "gpm", "lamb": 0.95, "lame": 1.0,
        "step_at": 0.9,
    },
    "seq_lora": {"lr": 5e-4, "rank": 10},
    "linear_probe": {"head_lr": 5e-4},
    "naive": {"backbone_lr": 1e-5, "head_lr": 5e-4},
    "ewc": {"backbone_lr": 1e-5, "head_lr": 5e-4, "ewc_lambda": 1e4, "mode": "separate"},
    "lwf": {"backbone_lr": 1e-5, "head_lr": 5e-4, "alpha": 1.0, "temperature": 2.0},
    "l2p": {"lr_per_256": 0.03, "pool_size": 10, "prompt_length": 5, "top_k": 5, "sim_coefficient": 0.1},
    "joint": {"backbone_lr": 1e-5, "head_lr": 5e-4},
}

#: The learning-rate entries of the hyper-parameters (what ``Settings.lr_scale`` multiplies).
LR_KEYS = frozenset({"lr", "head_lr", "backbone_lr", "lr_per_256"})

#: Display names, in table order.
METHOD_LABELS: dict[str, str] = {
    "inflora": "InfLoRA",
    "inflora_b5": "InfLoRA-b5",
    "inflora_ca": "InfLoRA+CA",
    "seq_lora": "Sequential LoRA (random subspace, no memory)",
    "linear_probe": "Linear probe (frozen backbone)",
    "naive": "Naive (full fine-tuning)",
    "ewc": "EWC",
    "lwf": "LwF",
    "l2p": "L2P",
    "joint": "Joint (upper bound)",
}
METHODS: tuple[str, ...] = tuple(METHOD_LABELS)
JOINT_METHODS = frozenset({"joint"})


# --------------------------------------------------------------------------------------------------- plugins
class AutocastPlugin(SupervisedPlugin):
    """Runs every forward (training and evaluation) under bf16 autocast, as InfLoRA's ``precision="bf16"``."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self._context: Any = nullcontext()

    def _enter(self) -> None:
        self._context = torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)
        self._context.__enter__()

    def _exit(self) -> None:
        self._context.__exit__(None, None, None)
        self._context = nullcontext()

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        self._enter()

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        self._exit()

    def before_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        self._enter()

    def after_eval_forward(self, strategy: Any, **kwargs: Any) -> None:
        self._exit()


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


# --------------------------------------------------------------------------------------------------- strategies
class _FreshAdamPerExperience:
    """Mixin: an Adam with a backbone and a head learning rate, rebuilt from the trainable tensors per experience.

    Avalanche's default ``make_optimizer`` supports one parameter group only and puts frozen tensors in it.
    """

    backbone_lr: float
    head_lr: float

    def make_optimizer(self, **kwargs: Any) -> None:
        model: LinearHeadViT = self.model  # type: ignore[attr-defined]
        groups = [{"params": model.head_parameters(), "lr": self.head_lr}]
        backbone = model.backbone_parameters()
        if backbone:
            groups.append({"params": backbone, "lr": self.backbone_lr})
        self.optimizer = torch.optim.Adam(groups)  # type: ignore[attr-defined]
        self.optimized_param_id = {}  # Avalanche's incremental optimiser bookkeeping is not used


def _placeholder_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # replaced by make_optimizer


class NaiveFineTuning(_FreshAdamPerExperience, Naive):
    """Avalanche's ``Naive`` (also the linear probe when the backbone is frozen) with two learning rates."""

    def __init__(self, *, backbone_lr: float, head_lr: float, **kwargs: Any) -> None:
        self.backbone_lr, self.head_lr = backbone_lr, head_lr
        super().__init__(optimizer=_placeholder_optimizer(), **kwargs)


class EWCFineTuning(_FreshAdamPerExperience, EWC):
    """Avalanche's ``EWC`` with two learning rates."""

    def __init__(self, *, backbone_lr: float, head_lr: float, **kwargs: Any) -> None:
        self.backbone_lr, self.head_lr = backbone_lr, head_lr
        super().__init__(optimizer=_placeholder_optimizer(), **kwargs)


class LwFFineTuning(_FreshAdamPerExperience, LwF):
    """Avalanche's ``LwF`` with two learning rates."""

    def __init__(self, *, backbone_lr: float, head_lr: float, **kwargs: Any) -> None:
        self.backbone_lr, self.head_lr = backbone_lr, head_lr
        super().__init__(optimizer=_placeholder_optimizer(), **kwargs)


class JointFineTuning(_FreshAdamPerExperience, JointTraining):
    """Avalanche's ``JointTraining`` (all experiences at once: the upper bound) with two learning rates."""

    def __init__(self, *, backbone_lr: float, head_lr: float, **kwargs: Any) -> None:
        self.backbone_lr, self.head_lr = backbone_lr, head_lr
        super().__init__(optimizer=_placeholder_optimizer(), **kwargs)


# --------------------------------------------------------------------------------------------------- builders
def _common(settings: Settings, evaluator: Any, plugins: list) -> dict:
    return dict(
        train_mb_size=settings.batch_size,
        train_epochs=settings.epochs,
        eval_mb_size=settings.eval_batch_size,
        device=settings.device,
        evaluator=evaluator,
        plugins=plugins,
    )


def _inflora_model(backbone: nn.Module, settings: Settings, hp: dict) -> InfLoRAViT:
    try:
        return InfLoRAViT(
            backbone, rank=hp["rank"], adapted_blocks=hp.get("adapted_blocks"), num_classes=settings.num_classes
        )
    except ValueError as err:
        raise MethodNotApplicable(str(err)) from None


def _inflora(name: str, backbone: nn.Module, settings: Settings, evaluator: Any, plugins: list) -> SupervisedTemplate:
    hp = settings.method_hparams(name)
    model = _inflora_model(backbone, settings, hp)
    extra: dict[str, Any] = {}
    if name == "inflora_ca":
        try:
            from ..alignment import ClassifierAlignmentPlugin
        except ImportError as err:
            raise MethodNotApplicable(f"classifier alignment is not available ({err})") from None
        step = max(1, round(hp["step_at"] * settings.epochs))
        extra = dict(
            optimizer="sgd", head_lr=hp["head_lr"], weight_decay=hp["weight_decay"], lr_schedule="step",
            milestones=[step] if step < settings.epochs else [],
        )
        plugins = plugins + [ClassifierAlignmentPlugin(seed=settings.seed)]
        for plugin in plugins:
            if isinstance(plugin, UpdatedParameterCounter):
                plugin.also_updated = _aligned_heads
    if name == "seq_lora":
        plugins = [RandomSubspacePlugin(seed=settings.seed)] + plugins
    return InfLoRAStrategy(
        model=model,
        lr=hp["lr"],
        memory=hp.get("memory", "dualgpm"),
        lamb=hp.get("lamb", 0.95),
        lame=hp.get("lame", 1.0),
        num_tasks=settings.num_experiences,
        precision="bf16" if settings.precision == "bf16" else "fp32",
        **extra,
        **_common(settings, evaluator, plugins),
    )


def _aligned_heads(strategy: Any) -> list[torch.Tensor]:
    """Classifier alignment retrains every seen task's head from the second experience on."""
    heads = strategy.model.heads
    return [p for head in heads for p in head.parameters()] if len(heads) > 1 else []


def _head_model(backbone: nn.Module, settings: Settings, frozen: bool) -> LinearHeadViT:
    return LinearHeadViT(backbone, settings.num_classes, freeze_backbone=frozen)


def build_strategy(
    name: str,
    backbone: nn.Module,
    settings: Settings,
    evaluator: Any,
    plugins: Optional[list] = None,
) -> SupervisedTemplate:
    """The Avalanche strategy of method ``name`` on ``backbone`` (a fresh timm model, consumed by the method).

    Raises :class:`MethodNotApplicable` when the method cannot run on this backbone.
    """
    if name not in DEFAULT_HPARAMS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    plugins = list(plugins or [])
    if settings.precision == "bf16" and not name.startswith("inflora") and name != "seq_lora":
        plugins.append(AutocastPlugin(torch.device(settings.device).type))
    if name.startswith("inflora") or name == "seq_lora":
        return _inflora(name, backbone, settings, evaluator, plugins)
    hp = settings.method_hparams(name)
    common = _common(settings, evaluator, plugins)
    criterion = nn.CrossEntropyLoss()
    if name == "l2p":
        try:
            return L2PCompat(
                backbone=backbone,
                num_classes=settings.num_classes,
                criterion=criterion,
                lr=hp["lr_per_256"] * settings.batch_size / 256,
                pool_size=hp["pool_size"],
                prompt_length=hp["prompt_length"],
                top_k=hp["top_k"],
                sim_coefficient=hp["sim_coefficient"],
                **common,
            )
        except BackboneNotSupported as err:
            raise MethodNotApplicable(str(err)) from None
    if name == "linear_probe":
        model = _head_model(backbone, settings, frozen=True)
        return NaiveFineTuning(model=model, criterion=criterion, backbone_lr=0.0, head_lr=hp["head_lr"], **common)
    model = _head_model(backbone, settings, frozen=False)
    lrs = dict(backbone_lr=hp["backbone_lr"], head_lr=hp["head_lr"])
    if name == "naive":
        return NaiveFineTuning(model=model, criterion=criterion, **lrs, **common)
    if name == "ewc":
        return EWCFineTuning(
            model=model, criterion=criterion, ewc_lambda=hp["ewc_lambda"], mode=hp["mode"], **lrs, **common
        )
    if name == "lwf":
        return LwFFineTuning(
            model=model, criterion=criterion, alpha=hp["alpha"], temperature=hp["temperature"], **lrs, **common
        )
    assert name == "joint"
    return JointFineTuning(model=model, criterion=criterion, **lrs, **common)

