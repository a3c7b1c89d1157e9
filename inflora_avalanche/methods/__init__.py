"""The methods the runner knows: a registered name, a builder, and a preset file of hyper-parameters.

Each method is one entry of :data:`REGISTRY` (its builder is imported only when the method runs) and one file
``presets/methods/<name>.json`` (its label and hyper-parameters). Building takes two steps, on the seed the runner
has already set: ``make_model(config, stream_info) -> model`` (checked against a checkpoint before any logger
opens its files), then ``make_strategy(config, model, info, evaluator, plugins, device, seed) -> strategy``.
Torch-free, so the command line can list and check methods before any heavy import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Method:
    """What the runner needs to know about a method besides how to build it.

    ``inflora``: its model is an ``InfLoRAViT`` (export to timm, subspace diagnostics and torchrun apply);
    ``joint``: it trains on the whole stream at once (the upper bound), evaluated once at the end.
    """

    name: str
    model: str  # "module:function" inside this package
    strategy: str
    inflora: bool = False
    joint: bool = False

    def make_model(self, config: dict, info: Any) -> Any:
        return _function(self.model)(config, info)

    def make_strategy(self, config: dict, model: Any, info: Any, evaluator: Any, plugins: list, device: str,
                      seed: int) -> Any:
        return _function(self.strategy)(config, model, info, evaluator, plugins, device, seed)


def _function(path: str) -> Callable[..., Any]:
    module, function = path.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("inflora", "inflora:build_model", "inflora:inflora_strategy", inflora=True),
        Method("inflora_b5", "inflora:build_model", "inflora:inflora_strategy", inflora=True),
        Method("inflora_ca", "inflora:build_model", "inflora:inflora_strategy", inflora=True),
        Method("seq_lora", "inflora:build_model", "inflora:seq_lora_strategy", inflora=True),
        Method("linear_probe", "finetune:frozen_head_model", "finetune:naive_strategy"),
        Method("naive", "finetune:head_model", "finetune:naive_strategy"),
        Method("ewc", "finetune:head_model", "finetune:ewc_strategy"),
        Method("lwf", "finetune:head_model", "finetune:lwf_strategy"),
        Method("l2p", "finetune:build_backbone", "l2p:l2p_strategy"),
        Method("joint", "finetune:head_model", "finetune:joint_strategy", joint=True),
    )
}
METHODS: tuple[str, ...] = tuple(REGISTRY)


class MethodNotApplicable(ValueError):
    """The method cannot run on this backbone or with these settings; the message says why."""


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return REGISTRY[name]


def scaled_lr(config: dict, key: str) -> Any:
    """A learning-rate setting with ``lr_scale`` and the linear scaling rule (``lr_reference_batch``) applied."""
    value = config[key]
    if value is None:
        return None
    value = value * config["lr_scale"]
    if config["lr_reference_batch"]:
        value = value * config["batch_size"] / config["lr_reference_batch"]
    return value
