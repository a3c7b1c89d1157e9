"""Run checkpoints: one safetensors file holding every tensor, with the rest of the state as JSON in its metadata.

The strategy is never pickled (Avalanche's ``save_checkpoint`` fails on current torch): the runner collects
state_dicts (model branches and heads, plugin states, RNG states, results so far) into one nested dict, and
:func:`save_checkpoint` splits it into tensors and JSON. Writing goes to a temporary file in the same folder that is
then renamed over the old checkpoint, so a crash at any moment leaves either the old or the new checkpoint whole.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .io import atomic_write

FORMAT = "inflora-avalanche-checkpoint/1"
_TENSOR = "__tensor__"
_ITEMS = "__items__"
_TUPLE = "__tuple__"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run; the message says what to do."""


def _split(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``obj`` as JSON-able data; tensors moved into ``tensors`` under their path in ``obj``."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        # Non-string keys (e.g. class labels) keep their type through a list of pairs.
        return {_ITEMS: [[k, _split(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {path!r} in a checkpoint")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_ITEMS}:
            return {k: _join(v, tensors) for k, v in obj[_ITEMS]}
        if set(obj) == {_TUPLE}:
            return tuple(_join(v, tensors) for v in obj[_TUPLE])
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: PathLike, state: dict) -> None:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) to ``path`` atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    data = _split(state, tensors, "")
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT, "state": json.dumps(data)}))


def load_checkpoint(path: PathLike) -> dict:
    """The state saved by :func:`save_checkpoint` (tensors on the CPU)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__}: {err}); "
                              "start afresh with --overwrite or another --out") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an inflora-avalanche checkpoint (format {metadata.get('format')!r})")
    return _join(json.loads(metadata["state"]), tensors)


# --------------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's global generators (CUDA's too, when present)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
