"""Save and restore a strategy mid-stream, between two experiences: model, memory, heads, plugin states, clock,
evaluator history and RNG, so that continuing after a restore equals not stopping (bit for bit on the CPU).

    state = strategy.state_dict()             # or save_strategy(strategy, "ckpt.safetensors")
    ...                                        # a new process: build the same model and strategy, then
    strategy.load_state_dict(state)           # or load_strategy(strategy, "ckpt.safetensors")

InfLoRA models store only what InfLoRA changes (heads, branches, merged ``qkv`` weights); other models are stored
whole, with the state of Avalanche's EWC and LwF plugins. The optimiser is not stored: it is rebuilt per experience.
Works for any ``SupervisedTemplate`` whose optimiser is rebuilt per experience (every method of this package).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path
from typing import Any, Union

import torch

from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def inner_model(model: Any) -> Any:
    """The model inside a ``DistributedDataParallel`` wrapper (any model: baselines have no ``InfLoRAViT``)."""
    return getattr(model, "module", model)


def _is_inflora(model: Any) -> bool:
    return hasattr(inner_model(model), "adapters")


def _model_state(model: Any) -> dict:
    state = inner_model(model).state_dict()
    if not _is_inflora(model):
        return state
    return {k: v for k, v in state.items() if not k.startswith("backbone.") or ".attn.qkv." in k}


def _own_plugins(strategy: Any) -> dict[str, Any]:
    """This package's plugins of ``strategy`` that have ``state_dict``/``load_state_dict``, by a stable key."""
    out = {}
    for i, plugin in enumerate(strategy.plugins):
        if type(plugin).__module__.startswith("inflora_avalanche") and callable(getattr(plugin, "state_dict", None)) \
                and callable(getattr(plugin, "load_state_dict", None)):
            out[f"{i}:{type(plugin).__name__}"] = plugin
    return out


def _avalanche_plugin_states(strategy: Any) -> dict:
    """EWC's saved parameters and importances, LwF's previous model and classes."""
    from avalanche.training.plugins import EWCPlugin, LwFPlugin

    out: dict = {}
    for plugin in strategy.plugins:
        if isinstance(plugin, EWCPlugin):
            out["ewc"] = {
                "saved_params": {exp: {k: p.data for k, p in params.items()} for exp, params in plugin.saved_params.items()},
                "importances": {exp: {k: p.data for k, p in params.items()} for exp, params in plugin.importances.items()},
            }
        if isinstance(plugin, LwFPlugin) and plugin.lwf.prev_model is not None:
            lwf = plugin.lwf
            out["lwf"] = {"prev_model": lwf.prev_model.state_dict(), "expcount": lwf.expcount,
                          "prev_classes_by_task": {t: sorted(int(c) for c in cs)
                                                   for t, cs in lwf.prev_classes_by_task.items()}}
    return out


def _load_avalanche_plugin_states(strategy: Any, state: dict) -> None:
    from avalanche.training.plugins import EWCPlugin, LwFPlugin
    from avalanche.training.utils import ParamData

    device = torch.device(strategy.device)
    for plugin in strategy.plugins:
        if isinstance(plugin, EWCPlugin) and "ewc" in state:
            for attr in ("saved_params", "importances"):
                table = defaultdict(dict)
                for exp, params in state["ewc"][attr].items():
                    table[int(exp)] = {k: ParamData(k, init_tensor=t.to(device), device=device) for k, t in params.items()}
                setattr(plugin, attr, table)
        if isinstance(plugin, LwFPlugin) and "lwf" in state:
            lwf, saved = plugin.lwf, state["lwf"]
            lwf.prev_model = copy.deepcopy(strategy.model)
            lwf.prev_model.load_state_dict(saved["prev_model"])
            lwf.expcount = int(saved["expcount"])
            lwf.prev_classes_by_task = defaultdict(set, {t: set(cs) for t, cs in saved["prev_classes_by_task"].items()})


def _forgetting_metrics(strategy: Any) -> list:
    from avalanche.evaluation.metrics.forgetting_bwt import GenericExperienceForgetting

    return [m for m in strategy.evaluator.metrics if isinstance(m, GenericExperienceForgetting)]


def _task_aware_metrics(strategy: Any) -> list:
    from .run.metrics import TaskAwareAccuracy

    return [m for m in strategy.evaluator.metrics if isinstance(m, TaskAwareAccuracy)]


def check_saveable(strategy: Any) -> None:
    """Refuse plugins whose state this module cannot store: a restored run would silently differ."""
    for plugin in strategy.plugins:
        if hasattr(plugin, "storage_policy"):  # ReplayPlugin and the other buffer-based plugins
            raise ValueError(
                f"{type(plugin).__name__}'s buffer of past samples cannot be saved with the strategy: a restored run "
                "would start with an empty buffer. Keep the process running, or save your own copy of the buffer"
            )


def strategy_state(strategy: Any) -> dict:
    """What a resumed run needs from ``strategy`` between two experiences."""
    check_saveable(strategy)
    return {
        "model": _model_state(strategy.model),
        "plugins": {key: plugin.state_dict() for key, plugin in _own_plugins(strategy).items()},
        "avalanche_plugins": _avalanche_plugin_states(strategy),
        "clock": {k: v for k, v in vars(strategy.clock).items() if isinstance(v, int) and not isinstance(v, bool)},
        "forgetting": [{"initial": dict(m.forgetting.initial), "last": dict(m.forgetting.last)}
                       for m in _forgetting_metrics(strategy)],
        "trained_classes": [m.trained_classes for m in _task_aware_metrics(strategy)],
        "task_label_classes": dict(getattr(strategy, "task_label_classes", {})),
        "trained_classes_of_strategy": sorted(getattr(strategy, "trained_classes", set())),  # L2P's evaluation mask
    }


def load_strategy_state(strategy: Any, state: dict) -> None:
    """Restore :func:`strategy_state` into a freshly built strategy of the same config."""
    model = inner_model(strategy.model)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if _is_inflora(model):
        missing = [k for k in missing if not k.startswith("backbone.") or ".attn.qkv." in k]
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint's model does not fit this model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); resume with the settings of the run that wrote it")
    plugins = _own_plugins(strategy)
    if set(plugins) != set(state["plugins"]):
        raise CheckpointError(f"the checkpoint holds plugin states {sorted(state['plugins'])} but this run has "
                              f"{sorted(plugins)}; resume with the settings of the run that wrote it")
    device = torch.device(strategy.device)
    for key, plugin in plugins.items():
        try:
            plugin.load_state_dict(state["plugins"][key])
        except ValueError as err:
            raise CheckpointError(f"cannot restore {key.split(':', 1)[1]}: {err}") from None
        if callable(getattr(plugin, "to", None)):
            plugin.to(device)
    _load_avalanche_plugin_states(strategy, state.get("avalanche_plugins", {}))
    for key, value in state["clock"].items():
        setattr(strategy.clock, key, value)
    for metric, saved in zip(_forgetting_metrics(strategy), state["forgetting"]):
        metric.forgetting.initial = {int(k): float(v) for k, v in saved["initial"].items()}
        metric.forgetting.last = {int(k): float(v) for k, v in saved["last"].items()}
    for metric, saved in zip(_task_aware_metrics(strategy), state.get("trained_classes", [])):
        metric.trained_classes = [list(c) for c in saved]
    if isinstance(getattr(strategy, "trained_classes", None), set):
        strategy.trained_classes = {int(c) for c in state.get("trained_classes_of_strategy", [])}
    if hasattr(strategy, "task_label_classes"):
        strategy.task_label_classes = {int(k): list(v) for k, v in state.get("task_label_classes", {}).items()}


def save_strategy(strategy: Any, path: Union[str, Path], include_rng: bool = True) -> None:
    """Write :func:`strategy_state` (and the RNG states) to ``path`` atomically (safetensors + JSON, no pickle)."""
    state = {"strategy": strategy_state(strategy)}
    if include_rng:
        state["rng"] = rng_state()
    save_checkpoint(path, state)


def load_strategy(strategy: Any, path: Union[str, Path]) -> None:
    """Restore a :func:`save_strategy` file into a freshly built strategy of the same settings (RNG included)."""
    state = load_checkpoint(path)
    if "strategy" not in state:
        raise CheckpointError(f"{path} holds no strategy state (it was not written by save_strategy)")
    load_strategy_state(strategy, state["strategy"])
    if "rng" in state:
        set_rng_state(state["rng"])
