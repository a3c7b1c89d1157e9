"""Exact resume between experiences: what a checkpoint holds of a strategy, and which runs it may continue.

InfLoRA methods store only what InfLoRA changes (heads, branches, merged ``qkv`` weights); the other methods store
their whole model and the state of Avalanche's EWC and LwF plugins. The optimiser is not stored: every method here
rebuilds it per experience.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError
from ..streams import StreamInfo
from .config import RESUME_FREE_KEYS, RESUME_IDENTITY_KEYS

CHECKPOINT_NAME = "checkpoint.safetensors"
STREAM_KEYS = ("name", "num_classes", "n_experiences", "class_order", "train_size", "test_size")


def _inner(model: Any) -> Any:
    return getattr(model, "module", model)  # DistributedDataParallel


def _is_inflora(model: Any) -> bool:
    return hasattr(_inner(model), "adapters")


def backbone_fingerprint(model: Any) -> float:
    """A float64 sum of the frozen backbone's parameters outside the adapted ``qkv`` layers (which InfLoRA changes),
    taken on the fresh model: tells whether a checkpoint was made on the same backbone weights."""
    inner = _inner(model)
    backbone = getattr(inner, "backbone", inner)
    total = torch.zeros((), dtype=torch.float64)
    for name, param in backbone.named_parameters():
        if ".attn.qkv." not in name:
            total += param.detach().to("cpu", torch.float64).sum()
    return float(total)


def _model_state(model: Any) -> dict:
    state = _inner(model).state_dict()
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
    from .metrics import TaskAwareAccuracy

    return [m for m in strategy.evaluator.metrics if isinstance(m, TaskAwareAccuracy)]


def strategy_state(strategy: Any) -> dict:
    """What a resumed run needs from ``strategy`` between two experiences."""
    return {
        "model": _model_state(strategy.model),
        "plugins": {key: plugin.state_dict() for key, plugin in _own_plugins(strategy).items()},
        "avalanche_plugins": _avalanche_plugin_states(strategy),
        "clock": {k: v for k, v in vars(strategy.clock).items() if isinstance(v, int) and not isinstance(v, bool)},
        "forgetting": [{"initial": dict(m.forgetting.initial), "last": dict(m.forgetting.last)}
                       for m in _forgetting_metrics(strategy)],
        "trained_classes": [m.trained_classes for m in _task_aware_metrics(strategy)],
    }


def load_strategy_state(strategy: Any, state: dict) -> None:
    """Restore :func:`strategy_state` into a freshly built strategy of the same config."""
    model = _inner(strategy.model)
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


def check_resume(config: dict, info: StreamInfo, checkpoint: dict, path: Path) -> dict:
    """Refuse a checkpoint of another method, preset, backbone, stream or model; returns the other settings that
    changed (``{key: (checkpoint's, this run's)}``)."""
    saved = checkpoint["config"]
    identity = ["method", "preset", "backbone", "benchmark"]
    identity += sorted(RESUME_IDENTITY_KEYS - set(identity))
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (tuples = lists)
    for key in identity:
        if not same(saved.get(key), config.get(key)):
            raise CheckpointError(
                f"the checkpoint {path} was made with {key}={saved.get(key)!r} but this run has {key}={config.get(key)!r}; "
                "resume with the same settings, or choose another --out (or --overwrite) to start anew")
    stream = {k: v for k, v in info.to_dict().items() if k in STREAM_KEYS}
    for key in STREAM_KEYS:
        if not same(checkpoint["stream"].get(key), stream.get(key)):
            raise CheckpointError(
                f"the data stream differs from the checkpoint's ({key}: {checkpoint['stream'].get(key)!r} there, "
                f"{stream.get(key)!r} now); resume on the same data, or choose another --out")
    return {k: (saved.get(k), config.get(k)) for k in sorted(set(saved) | set(config))
            if k not in RESUME_FREE_KEYS and k not in identity and not same(saved.get(k), config.get(k))}
