"""Export an :class:`InfLoRAViT` (or any ``LowRankViT``) as a timm model folder: branches merged into their layers,
one linear head.

The folder holds ``model.safetensors`` (timm's key names) and ``config.json`` (timm's hub format: architecture,
``model_args``, ``pretrained_cfg`` with the input size, mean and std, ``label_names``), so timm alone loads it::

    net = timm.create_model("local-dir:/path/to/folder", pretrained=True)

and it costs exactly what the plain backbone costs. Output column ``j`` is dataset label ``config["column_labels"][j]``
(with the default ``columns="labels"``, label ``j``). The other loading idioms are in ``docs/export.md``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .io import atomic_write, atomic_write_json, current_umask  # atomic_write: also this module's public name
from .model import UNSEEN_CLASS_LOGIT, LowRankViT

EXPORT_FORMAT = "inflora-avalanche-timm-export/2"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
COLUMN_MODES = ("labels", "seen")
ClassNames = Union[Sequence[str], Mapping[int, str], None]
# pretrained_cfg fields that say where the backbone's own weights came from; an export is its own source.
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")
# pretrained_cfg fields that describe the published weights (their tag, licence, paper): true of an export only when
# its backbone started from those weights.
_PROVENANCE_KEYS = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes")
# Null fields timm keeps in a pretrained_cfg (timm.models._pretrained.filter_pretrained_cfg does the same).
_KEEP_NULL = ("pool_size", "first_conv", "classifier")


def timm_state_dict(model: LowRankViT) -> dict[str, torch.Tensor]:
    """The backbone's state dict under plain timm names, every adapted layer replaced by its base layer with all
    branches (finished and open) folded in (:meth:`InfLoRALinear.effective_weight`: the same delta and rounding as an
    in-place merge), on the CPU, without a classifier."""
    adapters = dict(model.adapters())
    state: dict[str, torch.Tensor] = {}
    for key, value in model.backbone.state_dict().items():
        if any(key.startswith(name + ".") for name in adapters):
            continue
        if isinstance(value, torch.Tensor):
            state[key] = value.detach().cpu().clone()
    for name, adapter in adapters.items():
        state[f"{name}.weight"] = adapter.effective_weight().cpu()
        if adapter.base_layer.bias is not None:
            state[f"{name}.bias"] = adapter.base_layer.bias.detach().cpu().clone()
    return state


@torch.no_grad()
def merged_head(model: LowRankViT, columns: str = "labels") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
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


def _classifier_names(cfg: Mapping[str, Any]) -> list[str]:
    """The classifier modules timm's ``pretrained_cfg`` names (``head``; ``head.fc``; DeiT-distilled: two)."""
    names = cfg.get("classifier") or "head"
    return [names] if isinstance(names, str) else list(names)


def _input_size(model: LowRankViT, cfg: Mapping[str, Any], kwargs: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(channels, height, width)`` the backbone was built for (timm's ``pretrained_cfg`` keeps the size of the
    weights it came from, e.g. 518 for DINOv2 even when built with ``img_size=56``)."""
    source = tuple(cfg.get("input_size") or (3, 224, 224))
    channels = int(kwargs.get("in_chans", source[0]))
    size = getattr(getattr(model.backbone, "patch_embed", None), "img_size", None)
    if size is None:
        size = kwargs.get("img_size") or source[1:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (channels, int(size[0]), int(size[1]))


DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")


def timm_config(
    model: LowRankViT, architecture: str, kwargs: Mapping[str, Any], num_classes: int, label_names: Optional[list],
    data_config: Optional[Mapping[str, Any]] = None,
) -> dict:
    """The timm part of ``config.json``: what ``timm.create_model("local-dir:...")`` reads. ``data_config``
    (``mean``, ``std``, ``crop_pct``, ``interpolation``, ...) replaces the backbone's preprocessing where the model
    was trained on other inputs (e.g. [0, 1] pixels without normalisation, as in the paper)."""
    bad = sorted(set(data_config or {}) - set(DATA_CONFIG_KEYS))
    if bad:
        raise ValueError(f"data_config keys must be among {DATA_CONFIG_KEYS}, got {bad}")
    published = getattr(model.backbone, "weights_source", {}).get("kind") == "pretrained"
    cfg = {
        k: v
        for k, v in model.pretrained_cfg.items()
        if k not in _SOURCE_KEYS and k != "architecture" and (v is not None or k in _KEEP_NULL)
        and (published or k not in _PROVENANCE_KEYS)
    }
    cfg.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in (data_config or {}).items()})
    input_size = _input_size(model, cfg, kwargs)
    if tuple(cfg.get("input_size") or ()) != input_size:
        for key in ("test_input_size", "pool_size", "test_pool_size"):
            cfg.pop(key, None)
        cfg["input_size"] = input_size
    if kwargs.get("dynamic_img_size"):
        cfg["fixed_input_size"] = False
    cfg["custom_load"] = False  # a native timm state dict
    cfg["num_classes"] = num_classes
    cfg["classifier"] = cfg.get("classifier") or "head"
    for key in ("label_names", "label_descriptions", "label_offset"):  # those of the backbone's own classifier
        cfg.pop(key, None)
    config: dict[str, Any] = {"architecture": architecture, "num_classes": num_classes}
    config["num_features"] = model.num_features
    pool = getattr(model.backbone, "global_pool", None)
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    config["model_args"] = dict(kwargs)
    if label_names is not None:
        config["label_names"] = label_names
    config["pretrained_cfg"] = cfg
    config["backbone_weights"] = backbone_weights(model)
    return config


def backbone_weights(model: LowRankViT) -> dict:
    """Where the exported backbone's weights came from, before training: timm's published weights (name, tag, hub
    id, licence), a local file (path, size and SHA-256, read now), random initialisation, or ``unknown`` (a backbone
    passed in as a module: its ``pretrained_cfg`` names the architecture's default weights whether or not it holds
    them, so neither their tag nor their licence is claimed)."""
    source = dict(getattr(model.backbone, "weights_source", None) or {"kind": "unknown"})
    if source["kind"] == "file":
        source["sha256"] = _sha256(source["path"], source.get("size"))
    return source


def _sha256(path: str, size: Optional[int]) -> Optional[str]:
    """The file's SHA-256, or ``None`` when it is gone or no longer the size it had when it was loaded; computed once
    per file version (a run exports after every experience)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    if size is not None and stat.st_size != size:
        return None
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> Optional[str]:
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


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


def _write_folder(folder: Path, state: dict, config: dict) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` so that no reader ever sees half a file or new
    weights under an old config. A new folder is filled under a temporary name next to it and renamed into place
    (an interrupted export leaves nothing); in an existing folder the old ``config.json`` goes first, then each file
    is written atomically, ``config.json`` last."""
    from safetensors.torch import save_file

    def write(target: Path) -> None:
        atomic_write(target / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write_json(target / CONFIG_NAME, config)

    if folder.is_dir():
        (folder / CONFIG_NAME).unlink(missing_ok=True)
        write(folder)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        write(stage)
        os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp makes 0700; a plain mkdir gives this
        os.rename(stage, folder)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def export_timm_checkpoint(
    model: nn.Module,
    path: Union[str, os.PathLike],
    class_names: ClassNames = None,
    timm_kwargs: Optional[Mapping[str, Any]] = None,
    architecture: Optional[str] = None,
    columns: str = "labels",
    overwrite: bool = False,
    verify: bool = True,
    data_config: Optional[Mapping[str, Any]] = None,
) -> dict:
    """Write ``model`` as a timm model folder ``path``: ``model.safetensors`` and ``config.json``.

    Every InfLoRA branch is folded into its layer's weight (on a copy: the live model is not touched) and the heads
    become timm's classifier (see :func:`merged_head` for ``columns``). ``config.json`` is timm's hub format, so
    ``timm.create_model("local-dir:<path>", pretrained=True)`` rebuilds the network with its weights, classifier
    and preprocessing (``pretrained_cfg``: input size, mean, std) without this package. It also records
    ``column_labels`` (dataset label of each output column), ``class_order`` (labels in the order they were
    learned), ``class_names`` / ``label_names`` (per column, when given) and ``task_classes``.

    Args:
        model: an :class:`InfLoRAViT` or another ``LowRankViT`` (possibly wrapped, e.g. by DistributedDataParallel).
        path: the folder to write (created; an existing folder may hold other files).
        class_names: names indexed by dataset label (a list, or a ``{label: name}`` dict).
        timm_kwargs: the keyword arguments the backbone was created with (``img_size``, ``dynamic_img_size``, ...);
            defaults to ``model.timm_kwargs`` when the model records them, else none.
        architecture: the timm model name; defaults to ``model.backbone_name`` (without its pretrained tag).
        overwrite: replace an existing export in ``path``; otherwise an existing ``model.safetensors`` or
            ``config.json`` there is an error.
        verify: rebuild the timm model (on the ``meta`` device) and load the weights strictly before writing.
        data_config: the preprocessing the model was trained with, when it differs from the backbone's own
            (``mean``, ``std``, ``crop_pct``, ``interpolation``, ``input_size``): what
            ``timm.data.resolve_data_config`` will then give users of the export.

    Returns the content of ``config.json``.
    """
    inner = getattr(model, "module", model)
    if not isinstance(inner, LowRankViT):
        raise TypeError(f"export needs an InfLoRAViT or SDLoRAViT model, got {type(inner).__name__}")
    folder = Path(path).expanduser()
    if folder.suffix == ".safetensors":
        raise ValueError(
            f"export path {str(folder)!r} names a file; the export is a folder (model.safetensors and config.json "
            f"that timm loads with timm.create_model('local-dir:<folder>')): pass e.g. {str(folder.with_suffix(''))!r}"
        )
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; the export needs a folder path")
    if not overwrite:
        for existing in (folder / WEIGHTS_NAME, folder / CONFIG_NAME):
            if existing.exists():
                raise ValueError(f"{existing} already exists; choose another folder or pass overwrite=True")
    architecture = (architecture or inner.backbone_name).split(".")[0]  # timm names carry no dot but the tag's
    if timm_kwargs is None:
        timm_kwargs = getattr(inner, "timm_kwargs", None) or {}
    kwargs = {k: v for k, v in dict(timm_kwargs).items() if k not in ("num_classes", "pretrained")}
    try:
        json.dumps(kwargs)
    except TypeError:
        raise ValueError(f"timm_kwargs must be JSON-serialisable (numbers, strings, lists), got {kwargs}") from None

    head_weight, head_bias, column_labels = merged_head(inner, columns)
    state = timm_state_dict(inner)
    for name in _classifier_names(inner.pretrained_cfg):  # DeiT-distilled averages two equal heads: same logits
        state[f"{name}.weight"] = head_weight.clone()
        state[f"{name}.bias"] = head_bias.clone()
    num_classes = len(column_labels)
    if verify:
        _check_loads(architecture, num_classes, kwargs, state)

    seen = inner.seen_classes
    names = _column_names(class_names, column_labels, set(seen))
    config = timm_config(inner, architecture, kwargs, num_classes, names, data_config)
    config.update(
        {
            "format": EXPORT_FORMAT,
            "columns": columns,
            "column_labels": column_labels,
            "class_order": list(seen),
            "class_names": names,
            "task_classes": [list(c) for c in inner.task_classes],
            "unseen_class_logit": UNSEEN_CLASS_LOGIT if columns == "labels" else None,
            "inflora": {
                "rank": inner.rank,
                "adapted_blocks": list(inner.adapted_blocks),
                "tasks": inner.num_tasks,
                "task_open": inner.task_open,
            },
        }
    )
    config = json.loads(json.dumps(config))  # exactly what config.json holds (tuples become lists)
    _write_folder(folder, state, config)
    return config


def load_exported(path: Union[str, os.PathLike]) -> tuple[nn.Module, dict]:
    """An exported folder rebuilt by timm alone, ``(model in eval mode, config.json's content)``; this is
    ``timm.create_model("local-dir:<path>", pretrained=True)``, which deployment code can call directly.

    A file exported by earlier versions (``x.safetensors`` with ``x.json`` next to it) loads too."""
    import timm

    path = Path(path).expanduser().resolve()
    if path.is_file() and path.suffix == ".safetensors":
        return _load_single_file_export(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist; pass the folder export_timm_checkpoint wrote")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    net = timm.create_model(f"local-dir:{path}", pretrained=True)
    return net.eval(), config


def _load_single_file_export(path: Path) -> tuple[nn.Module, dict]:
    import timm
    from safetensors.torch import load_file

    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    kwargs = meta["timm_kwargs"]
    net = timm.create_model(meta["architecture"], pretrained=False, num_classes=meta["num_classes"], **kwargs)
    net.load_state_dict(load_file(str(path)))
    return net.eval(), meta
