"""The fine-tuning baselines: linear probe, Naive, EWC, LwF and Joint, each Avalanche's own strategy on a timm
backbone under one class-incremental linear head, with a backbone and a head learning rate and a fresh Adam per
experience (as InfLoRA restarts its optimiser per task)."""

from __future__ import annotations

import copy
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import IncrementalClassifier
from avalanche.training import JointTraining, Naive
from avalanche.training.plugins import EWCPlugin, LwFPlugin
from avalanche.training.utils import ParamData
from torch import nn

from ..schema import ConfigError
from .settings import check_plain_training
from ..training import autocast, uses_bf16
from . import scaled_lr


class LinearHeadViT(nn.Module):
    """A timm backbone (pooled pre-logits feature) followed by Avalanche's ``IncrementalClassifier``.

    The head is created at the full width of the stream (``num_classes``) with masking on: a class's logit is
    ``-1000`` until an experience with that class has been trained, so evaluation on any experience is well
    defined and all baselines share exactly the same head. With ``freeze_backbone`` only the head trains (the
    linear probe) and the backbone runs in eval mode.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, freeze_backbone: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        self.backbone = backbone
        self.feature_dim = int(getattr(backbone, "num_features", getattr(backbone, "embed_dim", 0)))
        if self.feature_dim < 1:
            raise ValueError(f"cannot tell the feature width of backbone {type(backbone).__name__}")
        self.frozen_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.head = IncrementalClassifier(self.feature_dim, initial_out_features=num_classes, masking=True)

    def train(self, mode: bool = True) -> "LinearHeadViT":
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.frozen_backbone:
            with torch.no_grad():
                features = self.backbone(x)
        else:
            features = self.backbone(x)
        return self.head(features)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]


def build_backbone(config: dict, info: Any = None) -> nn.Module:
    """The plain timm backbone of ``config`` (no classifier): the same weights InfLoRA starts from."""
    from ..backbone import create_backbone
    from .inflora import backbone_kwargs, model_errors

    weights = Path(config["weights"]).expanduser() if config["weights"] else None
    with model_errors(config):
        return create_backbone(config["backbone"], pretrained=bool(config["pretrained"]) and weights is None,
                               checkpoint_path=weights, **backbone_kwargs(config))


class AutocastPlugin(SupervisedPlugin):
    """Runs every forward (training and evaluation) under bf16 autocast, as InfLoRA's ``precision="bf16"``."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self._context: Any = nullcontext()

    def _enter(self) -> None:
        self._context = autocast("bf16", self.device_type)
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


class _FreshAdamPerExperience:
    """Mixin for Avalanche strategies: an Adam with a backbone and a head learning rate, rebuilt from the trainable
    tensors per experience (Avalanche's default ``make_optimizer`` supports one parameter group only and puts frozen
    tensors in it)."""

    def __init__(self, *, backbone_lr: float, head_lr: float, **kwargs: Any) -> None:
        self.backbone_lr, self.head_lr = backbone_lr, head_lr
        placeholder = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # replaced by make_optimizer
        super().__init__(optimizer=placeholder, **kwargs)  # type: ignore[call-arg]

    def make_optimizer(self, **kwargs: Any) -> None:
        model: LinearHeadViT = self.model  # type: ignore[attr-defined]
        groups = [{"params": model.head_parameters(), "lr": self.head_lr}]
        backbone = model.backbone_parameters()
        if backbone:
            groups.append({"params": backbone, "lr": self.backbone_lr})
        self.optimizer = torch.optim.Adam(groups)  # type: ignore[attr-defined]
        self.optimized_param_id = {}  # Avalanche's incremental optimiser bookkeeping is not used


class SaveableEWCPlugin(EWCPlugin):
    """Avalanche's ``EWCPlugin`` that saves and restores its own state (the parameters and importances it keeps
    per experience), so that a run with it resumes exactly."""

    def state_dict(self) -> dict:
        return {attr: {exp: {k: p.data.detach().cpu() for k, p in params.items()}
                       for exp, params in getattr(self, attr).items()}
                for attr in ("saved_params", "importances")}

    def load_state_dict(self, state: dict) -> None:
        for attr in ("saved_params", "importances"):
            table = defaultdict(dict)
            for exp, params in state[attr].items():
                table[int(exp)] = {k: ParamData(k, init_tensor=t, device=t.device) for k, t in params.items()}
            setattr(self, attr, table)

    def to(self, device: Any) -> "SaveableEWCPlugin":
        """Move the kept tensors to ``device`` (where the strategy trains)."""
        for attr in ("saved_params", "importances"):
            for params in getattr(self, attr).values():
                for k, p in params.items():
                    params[k] = ParamData(k, init_tensor=p.data.to(device), device=device)
        return self


class SaveableLwFPlugin(LwFPlugin):
    """Avalanche's ``LwFPlugin`` that saves and restores its own state (the previous model's weights, the count of
    experiences and the classes of each task), so that a run with it resumes exactly. The previous model is rebuilt
    from the strategy's model when training resumes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restored: Optional[dict] = None

    def state_dict(self) -> dict:
        if self._restored is not None:  # restored, not applied yet (training has not resumed)
            return dict(self._restored)
        lwf = self.lwf
        if lwf.prev_model is None:
            return {}
        return {"prev_model": lwf.prev_model.state_dict(), "expcount": lwf.expcount,
                "prev_classes_by_task": {t: sorted(int(c) for c in cs) for t, cs in lwf.prev_classes_by_task.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._restored = dict(state) or None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._restored is not None:
            saved, self._restored, lwf = self._restored, None, self.lwf
            lwf.prev_model = copy.deepcopy(strategy.model)
            lwf.prev_model.load_state_dict(saved["prev_model"])
            lwf.expcount = int(saved["expcount"])
            lwf.prev_classes_by_task = defaultdict(set, {int(t): set(cs)
                                                         for t, cs in saved["prev_classes_by_task"].items()})


class NaiveFineTuning(_FreshAdamPerExperience, Naive):
    """Avalanche's ``Naive`` (also the linear probe when the backbone is frozen) with two learning rates; EWC and
    LwF are this strategy with their (saveable) plugin, as Avalanche's own ``EWC`` and ``LwF`` strategies are
    ``Naive`` with theirs."""


class JointFineTuning(_FreshAdamPerExperience, JointTraining):
    """Avalanche's ``JointTraining`` (all experiences at once: the upper bound) with two learning rates."""


def common_kwargs(config: dict, evaluator: Any, plugins: list, device: str) -> dict:
    """Strategy arguments every baseline shares; bf16 autocast as a plugin when asked for."""
    plugins = list(plugins)
    if uses_bf16(config["precision"], device):
        plugins.append(AutocastPlugin(torch.device(device).type))
    return dict(train_mb_size=config["batch_size"], train_epochs=config["epochs"],
                eval_mb_size=config["eval_batch_size"] or config["batch_size"], device=device, evaluator=evaluator,
                plugins=plugins)


def head_model(config: dict, info: Any) -> LinearHeadViT:
    """The backbone under one linear head over all classes of the stream, everything trainable."""
    return LinearHeadViT(build_backbone(config), info.num_classes)


def frozen_head_model(config: dict, info: Any) -> LinearHeadViT:
    """The linear probe's model: only the head trains."""
    return LinearHeadViT(build_backbone(config), info.num_classes, freeze_backbone=True)


def _finetune(cls: type, config: dict, model: LinearHeadViT, evaluator: Any, plugins: list, device: str,
              extra_plugins: Sequence[Any] = ()) -> Any:
    check_plain_training(config)
    head_lr = scaled_lr(config, "head_lr") or scaled_lr(config, "lr")
    backbone_lr = 0.0 if model.frozen_backbone else scaled_lr(config, "backbone_lr")
    if backbone_lr is None:
        raise ConfigError(f"{config['method']} trains the backbone: set --backbone-lr")
    kwargs = common_kwargs(config, evaluator, plugins, device)
    kwargs["plugins"] += list(extra_plugins)  # after the others, where Avalanche's EWC and LwF strategies put theirs
    return cls(model=model, criterion=nn.CrossEntropyLoss(), backbone_lr=backbone_lr, head_lr=head_lr, **kwargs)


def naive_strategy(config: dict, model: Any, info: Any, evaluator: Any, plugins: list, device: str,
                   seed: int) -> Any:
    """Naive fine-tuning, or the linear probe when the model's backbone is frozen."""
    return _finetune(NaiveFineTuning, config, model, evaluator, plugins, device)


def ewc_strategy(config: dict, model: Any, info: Any, evaluator: Any, plugins: list, device: str,
                 seed: int) -> Any:
    ewc = SaveableEWCPlugin(ewc_lambda=config["ewc_lambda"], mode=config["ewc_mode"])
    return _finetune(NaiveFineTuning, config, model, evaluator, plugins, device, extra_plugins=[ewc])


def lwf_strategy(config: dict, model: Any, info: Any, evaluator: Any, plugins: list, device: str,
                 seed: int) -> Any:
    lwf = SaveableLwFPlugin(alpha=config["lwf_alpha"], temperature=config["lwf_temperature"])
    return _finetune(NaiveFineTuning, config, model, evaluator, plugins, device, extra_plugins=[lwf])


def joint_strategy(config: dict, model: Any, info: Any, evaluator: Any, plugins: list, device: str,
                   seed: int) -> Any:
    return _finetune(JointFineTuning, config, model, evaluator, plugins, device)
