"""The methods the runner knows: a registered name, a builder, what it can do, its own settings, and a preset file
of hyper-parameters.

Each method is one entry of :data:`REGISTRY` (its builder is imported only when the method runs) and one file
``presets/methods/<name>.json`` (its label and hyper-parameters). An entry declares

* its **capabilities** (:data:`CAPABILITIES`): what the runner may do with it beyond training and evaluating, asked
  for by name (``method.has(EXPORT)``), so that a flag a method cannot serve is refused in one line that names the
  methods that can;
* its **settings** (:class:`Settings` groups of :class:`~inflora_avalanche.schema.Field`): the flags only it reads.
  The runner's schema is the common settings plus every method's own; ``run --help`` shows the chosen method's.

Building takes two steps, on the seed the runner has already set: ``make_model(config, stream_info) -> model``
(checked against a checkpoint before any logger opens its files), then
``make_strategy(config, model, info, evaluator, plugins, device, seed) -> strategy``.
Torch-free, so the command line can list and check methods before any heavy import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .settings import (EWC_SETTINGS, FINETUNE, INFLORA, L2P_SETTINGS, LOW_RANK, LWF_SETTINGS, OPTIMISER, SDLORA,
                       SUBSPACE_MEMORY, Settings)

# ------------------------------------------------------------------------------------------------- capabilities
RESUME = "resume"  # its strategy's state goes into the checkpoint after every experience: --resume continues exactly
EXPORT = "export"  # its trained model merges into a plain timm model: --export
DIAGNOSTICS = "diagnostics"  # subspace diagnostics per layer and task: --diagnostics
TORCHRUN = "torchrun"  # trains data-parallel in several processes under torchrun
SCHEDULES = "schedules"  # any --optimizer, --lr-schedule, warmup (the others train with a constant-rate Adam)
JOINT = "joint"  # trains on the whole stream at once (the upper bound), evaluated once at the end
CAPABILITIES = {
    RESUME: "--resume",
    EXPORT: "--export",
    DIAGNOSTICS: "--diagnostics",
    TORCHRUN: "torchrun",
    SCHEDULES: "--optimizer/--lr-schedule other than adam/constant, --warmup-epochs",
    JOINT: "joint training",
}
INFLORA_FAMILY = frozenset({RESUME, EXPORT, DIAGNOSTICS, TORCHRUN, SCHEDULES})
BASELINE = frozenset({RESUME})


@dataclass(frozen=True)
class Method:
    """What the runner needs to know about a method besides how to build it: ``capabilities`` (names of
    :data:`CAPABILITIES`) and ``settings`` (the method's own setting groups; one group may serve several methods)."""

    name: str
    model: str  # "module:function" inside this package
    strategy: str
    capabilities: frozenset = BASELINE
    settings: tuple[Settings, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.capabilities) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"method {self.name}: unknown capabilities {sorted(unknown)}")

    def has(self, capability: str) -> bool:
        return capability in self.capabilities

    @property
    def fields(self) -> Iterator:
        """The method's own settings (:class:`~inflora_avalanche.schema.Field`), group by group."""
        for group in self.settings:
            yield from group.fields

    def make_model(self, config: dict, info: Any) -> Any:
        return _function(self.model)(config, info)

    def make_strategy(self, config: dict, model: Any, info: Any, evaluator: Any, plugins: list, device: str,
                      seed: int) -> Any:
        return _function(self.strategy)(config, model, info, evaluator, plugins, device, seed)


def _function(path: str) -> Callable[..., Any]:
    module, function = path.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


_INFLORA_SETTINGS = (LOW_RANK, INFLORA, SUBSPACE_MEMORY, OPTIMISER)
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("inflora", "inflora:build_model", "inflora:inflora_strategy", INFLORA_FAMILY, _INFLORA_SETTINGS),
        Method("inflora_b5", "inflora:build_model", "inflora:inflora_strategy", INFLORA_FAMILY, _INFLORA_SETTINGS),
        Method("inflora_ca", "inflora:build_model", "inflora:inflora_strategy", INFLORA_FAMILY, _INFLORA_SETTINGS),
        Method("seq_lora", "inflora:build_model", "inflora:seq_lora_strategy", INFLORA_FAMILY,
               (LOW_RANK, INFLORA, OPTIMISER)),
        Method("sd_lora", "sdlora:build_model", "sdlora:sd_lora_strategy", frozenset({RESUME, EXPORT, TORCHRUN,
               SCHEDULES}), (LOW_RANK, SDLORA, OPTIMISER)),
        Method("linear_probe", "finetune:frozen_head_model", "finetune:naive_strategy"),
        Method("naive", "finetune:head_model", "finetune:naive_strategy", settings=(FINETUNE,)),
        Method("ewc", "finetune:head_model", "finetune:ewc_strategy", settings=(FINETUNE, EWC_SETTINGS)),
        Method("lwf", "finetune:head_model", "finetune:lwf_strategy", settings=(FINETUNE, LWF_SETTINGS)),
        Method("l2p", "finetune:build_backbone", "l2p:l2p_strategy", settings=(L2P_SETTINGS,)),
        Method("joint", "finetune:head_model", "finetune:joint_strategy", BASELINE | {JOINT}, (FINETUNE,)),
    )
}
METHODS: tuple[str, ...] = tuple(REGISTRY)


class MethodNotApplicable(ValueError):
    """The method cannot run on this backbone or with these settings; the message says why."""


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return REGISTRY[name]


def methods_with(capability: str) -> list[str]:
    """The registered methods that have ``capability``, in registry order."""
    return [name for name, method in REGISTRY.items() if method.has(capability)]


def setting_groups() -> list[Settings]:
    """Every method's setting groups, each once, in registry order."""
    groups: list[Settings] = []
    for method in REGISTRY.values():
        groups += [g for g in method.settings if all(g is not seen for seen in groups)]
    return groups


def owners(group: Settings) -> list[str]:
    """The methods whose settings include ``group``."""
    return [name for name, method in REGISTRY.items() if any(g is group for g in method.settings)]


def setting_owners(key: str) -> Optional[list[str]]:
    """The methods that read the method setting ``key``; ``None`` for a setting of the common schema."""
    found = [g for g in setting_groups() if any(f.name == key for f in g.fields)]
    return [name for g in found for name in owners(g)] if found else None


def scaled_lr(config: dict, key: str) -> Any:
    """A learning-rate setting with ``lr_scale`` and the linear scaling rule (``lr_reference_batch``) applied."""
    value = config[key]
    if value is None:
        return None
    value = value * config["lr_scale"]
    if config["lr_reference_batch"]:
        value = value * config["batch_size"] / config["lr_reference_batch"]
    return value
