"""Exact resume between experiences: which checkpoints a run may continue (the strategy's own state is
:mod:`inflora_avalanche.strategy_state`), and the checksum of the backbone weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError
from ..strategy_state import inner_model
from ..streams import StreamInfo
from .config import RESUME_FREE_KEYS, RESUME_IDENTITY_KEYS

CHECKPOINT_NAME = "checkpoint.safetensors"
STREAM_KEYS = ("name", "num_classes", "n_experiences", "class_order", "train_size", "test_size")


def backbone_fingerprint(model: Any) -> float:
    """A float64 sum of the frozen backbone's parameters outside the adapted layers (whose weights InfLoRA changes:
    ``is_trained_parameter``), taken on the fresh model: tells whether a checkpoint was made on the same backbone
    weights."""
    inner = inner_model(model)
    backbone = getattr(inner, "backbone", inner)
    trained = getattr(inner, "is_trained_parameter", lambda name: False)
    total = torch.zeros((), dtype=torch.float64)
    for name, param in backbone.named_parameters():
        if not trained(name):
            total += param.detach().to("cpu", torch.float64).sum()
    return float(total)


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
