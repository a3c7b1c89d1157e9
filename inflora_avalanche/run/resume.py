"""Exact resume between experiences: which checkpoints a run may continue (the strategy's own state is
:mod:`inflora_avalanche.strategy_state`), and the checksum of the backbone weights.

The settings check needs no torch: :func:`checkpoint_config` reads the checkpoint's config from the safetensors
header, so that ``--resume`` with other settings is refused before the heavy imports.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..schema import ConfigError
from .config import DEFAULTS, FIELD_BY_NAME, RESUME_FREE_KEYS, RESUME_IDENTITY_KEYS

if TYPE_CHECKING:
    from ..streams import StreamInfo

CHECKPOINT_NAME = "checkpoint.safetensors"
STREAM_KEYS = ("name", "num_classes", "n_experiences", "class_order", "train_size", "test_size")
IDENTITY_ORDER = ["method", "preset", "backbone", "benchmark"] + sorted(
    RESUME_IDENTITY_KEYS - {"method", "preset", "backbone", "benchmark"})


def backbone_fingerprint(model: Any) -> float:
    """A float64 sum of the frozen backbone's parameters outside the adapted layers (whose weights InfLoRA changes:
    ``is_trained_parameter``), taken on the fresh model: tells whether a checkpoint was made on the same backbone
    weights."""
    import torch

    from ..strategy_state import inner_model

    inner = inner_model(model)
    backbone = getattr(inner, "backbone", inner)
    trained = getattr(inner, "is_trained_parameter", lambda name: False)
    total = torch.zeros((), dtype=torch.float64)
    for name, param in backbone.named_parameters():
        if not trained(name):
            total += param.detach().to("cpu", torch.float64).sum()
    return float(total)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # tuples = lists


def with_schema_defaults(saved: dict) -> dict:
    """A checkpoint's config with the settings added to the schema after it was written, at their defaults (the run
    used them then)."""
    return {**{k: v for k, v in DEFAULTS.items() if k not in RESUME_FREE_KEYS}, **saved}


def _as_trained(config: dict) -> dict:
    """Settings as they act: Adam's betas left to the optimiser are the reference's (0.9, 0.999), which is how
    checkpoints from before betas became optional recorded them."""
    if config.get("optimizer") == "adam" and config.get("betas") is None:
        return {**config, "betas": [0.9, 0.999]}
    return config


def checkpoint_header_state(path: Path) -> Optional[dict]:
    """The JSON state stored in the checkpoint at ``path`` (its config, position, results; not the tensors), read from
    its safetensors header without torch; ``None`` when the file cannot be read that way (loading it later says
    why)."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(handle.read(size))
        state = json.loads(header["__metadata__"]["state"])
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return state if isinstance(state, dict) else None


def checkpoint_config(path: Path) -> Optional[dict]:
    """The config stored in the checkpoint at ``path``, read from its safetensors header without torch; ``None``
    when the file cannot be read that way (loading it later says why)."""
    config = (checkpoint_header_state(path) or {}).get("config")
    return config if isinstance(config, dict) else None


def finished_run_note(state: dict, config: dict, out: Path) -> Optional[str]:
    """Why ``--resume`` has nothing to do in ``out``, or ``None``: the checkpoint (its header ``state``) holds the last
    experience of the last seed of ``config`` and ``results.json`` holds every seed (a run stopped between its last
    checkpoint and writing ``results.json`` is not finished: resuming it writes the results)."""
    from ..methods import JOINT, get_method

    try:
        steps = 1 if get_method(config["method"]).has(JOINT) else int(config["n_experiences"])
        seed_index, done = int(state["seed_index"]), int(state["experiences_done"])
    except (KeyError, TypeError, ValueError):
        return None
    if seed_index < len(config["seeds"]) - 1 or done < steps:
        return None
    results = out / "results.json"
    try:
        seeds = json.loads(results.read_text(encoding="utf-8"))["seeds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(seeds, list) or len(seeds) < len(config["seeds"]):
        return None
    return (f"the run in {out} is finished (seeds {list(config['seeds'])}, {done} of {steps} experience"
            f"{'' if steps == 1 else 's'}): its results are in {results}; nothing to resume")


def _show(changes: dict) -> str:
    return ", ".join(f"{FIELD_BY_NAME[k].flag if k in FIELD_BY_NAME else k} {a!r} there, {b!r} now"
                     for k, (a, b) in changes.items())


def check_same_run(saved: dict, config: dict, path: Path, error: type = ConfigError) -> None:
    """Refuse a checkpoint of another method, preset, backbone or model (``saved``: its config)."""
    saved = with_schema_defaults(saved)
    for key in IDENTITY_ORDER:
        if not _same(saved.get(key), config.get(key)):
            raise error(
                f"the checkpoint {path} was made with {key}={saved.get(key)!r} but this run has "
                f"{key}={config.get(key)!r}; resume with the same settings, or choose another --out (or --overwrite) "
                "to start anew")


def check_resume_settings(saved: dict, config: dict, path: Path, error: type = ConfigError,
                          suggest_config: bool = True) -> dict:
    """Refuse a checkpoint of another method, preset, backbone or model; and, unless ``resume_with_changes``, one
    trained with other settings (results would claim settings that earlier experiences never had). Returns the
    settings that changed (``{key: (checkpoint's, this run's)}``). ``suggest_config=False`` (``compare``, which
    refuses a config file naming a method) leaves the run's written ``config.yaml`` out of the advice."""
    saved, config = _as_trained(with_schema_defaults(saved)), _as_trained(config)
    check_same_run(saved, config, path, error)
    compared = sorted((set(saved) | set(config)) - RESUME_FREE_KEYS - RESUME_IDENTITY_KEYS)
    changed = {k: (saved.get(k), config.get(k)) for k in compared if not _same(saved.get(k), config.get(k))}
    if changed and not config.get("resume_with_changes"):
        out = Path(path).parent
        latest = next((out / n for n in ("config_resumed.yaml", "config.yaml") if (out / n).is_file()), None)
        latest = latest if suggest_config else None
        how = f"`--config {latest} --resume`, or drop those flags" if latest else "drop those flags"
        raise error(
            f"the checkpoint {path} was trained with other settings ({_show(changed)}); resume with the "
            f"checkpoint's settings ({how}), or start anew in "
            "another --out; --resume-with-changes continues with the new settings and records which experiences "
            "used which in results.json")
    return changed


def check_resume(config: dict, info: "StreamInfo", checkpoint: dict, path: Path) -> dict:
    """:func:`check_resume_settings` on a loaded checkpoint, and its data stream (classes, order, sizes); returns
    the settings that changed."""
    from ..checkpoint import CheckpointError

    changed = check_resume_settings(checkpoint["config"], config, path, CheckpointError)
    stream = {k: v for k, v in info.to_dict().items() if k in STREAM_KEYS}
    for key in STREAM_KEYS:
        if not _same(checkpoint["stream"].get(key), stream.get(key)):
            raise CheckpointError(
                f"the data stream differs from the checkpoint's ({key}: {checkpoint['stream'].get(key)!r} there, "
                f"{stream.get(key)!r} now); resume on the same data, or choose another --out")
    return changed
