"""Export an :class:`InfLoRAViT` as a plain timm checkpoint: branches merged into ``qkv``, one linear head.

The result loads without this package::

    meta = json.load(open("model.json"))
    net = timm.create_model(meta["architecture"], pretrained=False, num_classes=meta["num_classes"], **meta["timm_kwargs"])
    net.load_state_dict(safetensors.torch.load_file("model.safetensors"))

and costs exactly what the plain backbone costs. Output column ``j`` is dataset label ``meta["column_labels"][j]``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .lora import InfLoRAQKV
from .model import UNSEEN_CLASS_LOGIT, InfLoRAViT

EXPORT_FORMAT = "inflora-avalanche-timm-export/1"
COLUMN_MODES = ("labels", "seen")
ClassNames = Union[Sequence[str], Mapping[int, str], None]


def metadata_path(path: Union[str, os.PathLike]) -> Path:
    """The JSON written next to the checkpoint ``path`` (``model.safetensors`` -> ``model.json``)."""
    return Path(path).with_suffix(".json")


@torch.no_grad()
def merged_qkv_weight(adapter: InfLoRAQKV) -> torch.Tensor:
    """The ``qkv`` weight with every branch (finished and open) folded in, on the CPU; the adapter is not modified."""
    weight = adapter.qkv.weight.detach()
    unmerged_past = not adapter.merged and adapter.num_finished > 0
    if not adapter.rank and not unmerged_past:
        return weight.cpu().clone()  # bit-identical to what the live model multiplies with
    delta = torch.zeros(2 * adapter.attn_dim, adapter.in_features, dtype=torch.float64)
    if unmerged_past:
        delta += adapter.past_up.detach().cpu().double() @ adapter.past_down.detach().cpu().double()
    if adapter.rank:
        delta += adapter.up.detach().cpu().double() @ adapter.down.detach().cpu().double()
    merged = weight.cpu().double().clone()
    merged[adapter.attn_dim :] += delta
    return merged.to(weight.dtype)


def timm_state_dict(model: InfLoRAViT) -> dict[str, torch.Tensor]:
    """The backbone's state dict under plain timm names, every adapter replaced by its merged ``qkv`` (CPU)."""
    adapters = dict(model.adapters())
    state: dict[str, torch.Tensor] = {}
    for key, value in model.backbone.state_dict().items():
        if any(key.startswith(name + ".") for name in adapters):
            continue
        if isinstance(value, torch.Tensor):
            state[key] = value.detach().cpu().clone()
    for name, adapter in adapters.items():
        state[f"{name}.weight"] = merged_qkv_weight(adapter)
        if adapter.qkv.bias is not None:
            state[f"{name}.bias"] = adapter.qkv.bias.detach().cpu().clone()
    return state


@torch.no_grad()
def merged_head(model: InfLoRAViT, columns: str = "labels") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One linear head over every task's head: ``(weight, bias, column_labels)``.

    ``columns="labels"``: column ``j`` is dataset label ``j`` for ``j < model.output_width``; labels no head covers get
    zero weights and the model's unseen-class logit as bias, so the logits equal the model's output.
    ``columns="seen"``: one column per seen class, in the order the classes were learned (``model.seen_classes``).
    """
    if columns not in COLUMN_MODES:
        raise ValueError(f"columns must be one of {COLUMN_MODES}, got {columns!r}")
    if not model.heads:
        raise ValueError("the model has learned no task yet: train at least one experience before exporting")
    weight = torch.cat([h.weight.detach().cpu() for h in model.heads], dim=0)
    bias = torch.cat([h.bias.detach().cpu() for h in model.heads], dim=0)
    seen = model.seen_classes
    if columns == "seen":
        return weight.clone(), bias.clone(), list(seen)
    width = model.output_width
    full_weight = weight.new_zeros(width, weight.shape[1])
    full_bias = bias.new_full((width,), UNSEEN_CLASS_LOGIT)
    index = torch.tensor(seen, dtype=torch.long)
    full_weight[index] = weight
    full_bias[index] = bias
    return full_weight, full_bias, list(range(width))


def _column_names(names: ClassNames, column_labels: list[int], seen: set[int]) -> Optional[list[Optional[str]]]:
    if names is None:
        return None
    lookup = dict(names) if isinstance(names, Mapping) else dict(enumerate(names))
    missing = sorted(c for c in seen if c not in lookup)
    if missing:
        raise ValueError(
            f"class_names has no name for learned labels {missing[:10]}; pass a list indexed by label or a "
            "{label: name} dict covering every seen class"
        )
    return [None if lookup.get(c) is None else str(lookup[c]) for c in column_labels]


def _check_loads(architecture: str, num_classes: int, kwargs: dict, state: dict) -> None:
    import timm

    if not timm.is_model(architecture):
        raise ValueError(
            f"timm has no model named {architecture!r}; pass architecture= the timm name the backbone was built from"
        )
    try:
        with torch.device("meta"):  # shapes and names only: no memory, no weight initialisation
            net = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ValueError(f"timm.create_model({architecture!r}, **{kwargs}) failed ({err}); fix timm_kwargs") from None
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(
            f"the exported weights do not fit timm.create_model({architecture!r}, **{kwargs}) ({first[:200]}); pass "
            "timm_kwargs= the keyword arguments the backbone was built with (e.g. img_size=...)"
        ) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Create ``path`` by ``write(temporary path)`` in the same folder and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_timm_checkpoint(
    model: nn.Module,
    path: Union[str, os.PathLike],
    class_names: ClassNames = None,
    timm_kwargs: Optional[Mapping[str, Any]] = None,
    architecture: Optional[str] = None,
    columns: str = "labels",
    overwrite: bool = False,
    verify: bool = True,
) -> dict:
    """Write ``model`` as a plain timm checkpoint (``path``, ``.safetensors``) plus a JSON next to it.

    Every InfLoRA branch is folded into its ``qkv`` weight (on a copy: the live model is not touched), and the heads
    become one ``head`` linear (see :func:`merged_head` for ``columns``). The JSON records the timm architecture and
    the ``timm_kwargs`` that rebuild it, ``num_classes``, ``column_labels`` (dataset label of each output column),
    ``class_order`` (labels in the order they were learned) and ``class_names`` (per column, when given).

    Args:
        model: an :class:`InfLoRAViT` (possibly wrapped, e.g. by DistributedDataParallel).
        class_names: names indexed by dataset label (a list, or a ``{label: name}`` dict).
        timm_kwargs: the keyword arguments the backbone was created with (``img_size``, ``dynamic_img_size``, ...);
            defaults to ``model.timm_kwargs`` when the model records them, else none.
        architecture: the timm model name; defaults to ``model.backbone_name``.
        overwrite: replace existing files; otherwise an existing checkpoint or JSON is an error.
        verify: rebuild the timm model from the JSON and load the weights strictly before writing.

    Returns the metadata written to the JSON.
    """
    inner = getattr(model, "module", model)
    if not isinstance(inner, InfLoRAViT):
        raise TypeError(f"export needs an InfLoRAViT model, got {type(inner).__name__}")
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors, got {str(path)!r}")
    meta_path = metadata_path(path)
    if not overwrite:
        for existing in (path, meta_path):
            if existing.exists():
                raise ValueError(f"{existing} already exists; choose another path or pass overwrite=True")
    architecture = architecture or inner.backbone_name
    if timm_kwargs is None:
        timm_kwargs = getattr(inner, "timm_kwargs", None) or {}
    kwargs = {k: v for k, v in dict(timm_kwargs).items() if k not in ("num_classes", "pretrained")}
    try:
        json.dumps(kwargs)
    except TypeError:
        raise ValueError(f"timm_kwargs must be JSON-serialisable (numbers, strings, lists), got {kwargs}") from None

    head_weight, head_bias, column_labels = merged_head(inner, columns)
    state = timm_state_dict(inner)
    state["head.weight"] = head_weight.contiguous()
    state["head.bias"] = head_bias.contiguous()
    if verify:
        _check_loads(architecture, len(column_labels), kwargs, state)

    seen = inner.seen_classes
    metadata = {
        "format": EXPORT_FORMAT,
        "architecture": architecture,
        "timm_kwargs": kwargs,
        "num_classes": len(column_labels),
        "columns": columns,
        "column_labels": column_labels,
        "class_order": list(seen),
        "class_names": _column_names(class_names, column_labels, set(seen)),
        "task_classes": [list(c) for c in inner.task_classes],
        "unseen_class_logit": UNSEEN_CLASS_LOGIT if columns == "labels" else None,
        "weights": path.name,
        "inflora": {
            "rank": inner.rank,
            "adapted_blocks": list(inner.adapted_blocks),
            "tasks": inner.num_tasks,
            "task_open": inner.task_open,
        },
    }

    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(metadata, handle, indent=2)
            handle.write("\n")

    atomic_write(meta_path, write_json)
    return metadata


def load_exported(path: Union[str, os.PathLike]) -> tuple[nn.Module, dict]:
    """Rebuild an exported checkpoint with timm alone: ``(model in eval mode, metadata)`` (a convenience for tests
    and scripts; deployment code can copy its four lines and need not import this package)."""
    import timm
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    with open(metadata_path(path), encoding="utf-8") as handle:
        meta = json.load(handle)
    net = timm.create_model(meta["architecture"], pretrained=False, num_classes=meta["num_classes"], **meta["timm_kwargs"])
    net.load_state_dict(load_file(str(path)))
    return net.eval(), meta
