"""Save and restore a strategy mid-stream, between two experiences: model, plugin states, metric states, clock and
RNG, so that continuing after a restore equals not stopping (bit for bit on the CPU).

    state = strategy.state_dict()             # or save_strategy(strategy, "ckpt.safetensors")
    ...                                        # a new process: build the same model and strategy, then
    strategy.load_state_dict(state)           # or load_strategy(strategy, "ckpt.safetensors")

Each component keeps its own state; this module only collects it:
- the model: ``trained_state_dict()`` / ``load_trained_state_dict()`` where it has them (an ``InfLoRAViT`` stores
  only what learning changes: heads and adapted layers, whatever the targets), else its whole ``state_dict()``;
- every plugin and every evaluator metric with ``state_dict()`` / ``load_state_dict()`` (the memory plugin,
  classifier alignment, diagnostics, the baselines' EWC and LwF plugins, the runner's metrics, your own);
- the strategy's ``get_extra_state()`` / ``set_extra_state()`` where it has them (e.g. InfLoRA's task-label map);
- Avalanche's forgetting metrics and the training clock, which have no state methods of their own.

The optimiser is not stored: it is rebuilt per experience. Plugins whose state cannot be stored (replay buffers,
Avalanche's own EWC and LwF plugins) are refused by :func:`check_saveable` rather than silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch

from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state


def inner_model(model: Any) -> Any:
    """The model inside a ``DistributedDataParallel`` wrapper (any model: baselines have no ``InfLoRAViT``)."""
    return getattr(model, "module", model)


def _has_state(component: Any) -> bool:
    return callable(getattr(component, "state_dict", None)) and callable(getattr(component, "load_state_dict", None))


def _plugins_with_state(strategy: Any) -> dict[str, Any]:
    """The plugins of ``strategy`` that keep their own state, by a stable key (position and class)."""
    return {f"{i}:{type(p).__name__}": p for i, p in enumerate(strategy.plugins)
            if _has_state(p) and p is not getattr(strategy, "evaluator", None)}


def _metrics(strategy: Any) -> list:
    evaluator = getattr(strategy, "evaluator", None)
    return list(getattr(evaluator, "metrics", []) or [])


def _metrics_with_state(strategy: Any) -> dict[str, Any]:
    return {f"{i}:{type(m).__name__}": m for i, m in enumerate(_metrics(strategy)) if _has_state(m)}


def _forgetting_metrics(strategy: Any) -> list:
    from avalanche.evaluation.metrics.forgetting_bwt import GenericExperienceForgetting

    return [m for m in _metrics(strategy) if isinstance(m, GenericExperienceForgetting)]


def check_saveable(strategy: Any) -> None:
    """Refuse plugins whose state would be lost: a restored run would silently differ."""
    from avalanche.training.plugins import EWCPlugin, LwFPlugin

    for plugin in strategy.plugins:
        if hasattr(plugin, "storage_policy"):  # ReplayPlugin and the other buffer-based plugins
            raise ValueError(
                f"{type(plugin).__name__}'s buffer of past samples cannot be saved with the strategy: a restored run "
                "would start with an empty buffer. Keep the process running, or save your own copy of the buffer"
            )
        if isinstance(plugin, (EWCPlugin, LwFPlugin)) and not _has_state(plugin):
            kind = "EWC" if isinstance(plugin, EWCPlugin) else "LwF"
            raise ValueError(
                f"Avalanche's {type(plugin).__name__} keeps its state in private attributes that cannot be saved: use "
                f"inflora_avalanche.methods.finetune.Saveable{kind}Plugin (the same plugin with state_dict) instead"
            )


def strategy_state(strategy: Any) -> dict:
    """What a resumed run needs from ``strategy`` between two experiences."""
    check_saveable(strategy)
    model = inner_model(strategy.model)
    own = getattr(strategy, "get_extra_state", None)
    return {
        "model": model.trained_state_dict() if callable(getattr(model, "trained_state_dict", None))
        else model.state_dict(),
        "plugins": {key: plugin.state_dict() for key, plugin in _plugins_with_state(strategy).items()},
        "metrics": {key: metric.state_dict() for key, metric in _metrics_with_state(strategy).items()},
        "strategy": own() if callable(own) else {},
        "clock": {k: v for k, v in vars(strategy.clock).items() if isinstance(v, int) and not isinstance(v, bool)},
        "forgetting": [{"initial": dict(m.forgetting.initial), "last": dict(m.forgetting.last)}
                       for m in _forgetting_metrics(strategy)],
    }


def _load_components(kind: str, components: dict[str, Any], saved: dict, device: torch.device) -> None:
    if set(components) != set(saved):
        raise CheckpointError(f"the checkpoint holds {kind} states {sorted(saved)} but this run has "
                              f"{sorted(components)}; resume with the settings of the run that wrote it")
    for key, component in components.items():
        try:
            component.load_state_dict(saved[key])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"cannot restore {key.split(':', 1)[1]}: {err}") from None
        if callable(getattr(component, "to", None)) and not isinstance(component, torch.nn.Module):
            component.to(device)


def load_strategy_state(strategy: Any, state: dict) -> None:
    """Restore :func:`strategy_state` into a freshly built strategy of the same config."""
    if "metrics" not in state:
        raise CheckpointError("the checkpoint was written by inflora-avalanche 0.2, whose strategy state this version "
                              "cannot continue exactly; start the run anew (another --out, or --overwrite)")
    model = inner_model(strategy.model)
    try:
        if callable(getattr(model, "load_trained_state_dict", None)):
            model.load_trained_state_dict(state["model"])
        else:
            model.load_state_dict(state["model"])
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{str(err).splitlines()[0]}; resume with the settings of the run that wrote it") from None
    device = torch.device(strategy.device)
    _load_components("plugin", _plugins_with_state(strategy), state["plugins"], device)
    _load_components("metric", _metrics_with_state(strategy), state.get("metrics", {}), device)
    own = getattr(strategy, "set_extra_state", None)
    if callable(own):
        own(state.get("strategy", {}))
    for key, value in state["clock"].items():
        setattr(strategy.clock, key, value)
    for metric, saved in zip(_forgetting_metrics(strategy), state["forgetting"]):
        metric.forgetting.initial = {int(k): float(v) for k, v in saved["initial"].items()}
        metric.forgetting.last = {int(k): float(v) for k, v in saved["last"].items()}


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
