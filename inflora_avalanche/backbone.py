"""Timm backbones by name, with timm's pretrained weights or a local weights file of any common format, which is
recognised by its content; every unreadable, truncated or foreign file is refused in one line naming it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn


class WeightsUnavailableError(RuntimeError):
    """The backbone's pretrained weights could not be obtained."""


# The keys that mark a big_vision / AugReg .npz (timm reads those with ``VisionTransformer.load_pretrained``).
_BIG_VISION_ANCHORS = ("embedding/kernel", "opt/target/embedding/kernel", "params/embedding/kernel",
                       "params/img/embedding/kernel")
_STATE_DICT_WRAPPERS = ("state_dict", "model", "module")
WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def _weights_file_kind(path: Path) -> str:
    """What ``path`` holds, by its first bytes (not its name): ``"safetensors"``, ``"zip"`` (a PyTorch checkpoint or
    a NumPy ``.npz``), ``"pickle"`` (a legacy PyTorch checkpoint); anything else raises :class:`ValueError` naming
    the file and saying what it is."""
    if path.is_dir():
        try:
            inside = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHTS_SUFFIXES)
        except OSError:
            inside = []
        raise ValueError(f"weights file {path} is a folder, not a file" +
                         (f"; give the file inside it, e.g. {path / inside[0]}" if inside else ""))
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(512)
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file {path} does not exist; pass the path of a timm-named state "
                                "dict") from None
    except OSError as err:
        raise ValueError(f"cannot read weights file {path} ({err.strerror or err})") from None
    if size == 0:
        raise ValueError(f"weights file {path} is empty (0 bytes); it was not written completely: download or copy "
                         "it again")
    header = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if head[8:9] == b"{" and 2 <= header < 100 * 2**20:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    text = head.decode("utf-8", errors="replace")
    # text: no NUL byte, and every character printable (one replacement allowed: a character cut at byte 512)
    if b"\x00" not in head and text.count("\ufffd") <= 1 and all(c.isprintable() or c in "\r\n\t\ufffd" for c in text):
        first = " ".join(text.split())[:40]
        lfs = text.startswith("version https://git-lfs")
        hint = " (a Git LFS pointer: fetch the real file with `git lfs pull`)" if lfs else ""
        raise ValueError(f"weights file {path} is a text file (it starts with {first!r}), not a checkpoint{hint}; "
                         "expected .safetensors, a PyTorch checkpoint (.pth/.pt/.bin) or a NumPy .npz")
    raise ValueError(f"weights file {path} is not a checkpoint: its {size} bytes are neither safetensors, a PyTorch "
                     "checkpoint (.pth/.pt/.bin) nor a NumPy .npz archive")


def _npz_arrays(path: Path) -> dict:
    """The arrays of a NumPy ``.npz`` (no pickles); :class:`ValueError` naming the file when it is not one."""
    import numpy as np

    try:
        with np.load(str(path), allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an archive")
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"weights file {path} is a zip archive but neither a PyTorch checkpoint nor a readable NumPy "
                         f".npz ({' '.join(str(err).split())[:120]})") from None


def _is_big_vision_npz(path: Path) -> bool:
    import numpy as np

    try:
        with np.load(str(path), allow_pickle=False) as archive:
            return isinstance(archive, np.lib.npyio.NpzFile) and any(k in archive.files for k in _BIG_VISION_ANCHORS)
    except (OSError, ValueError, EOFError):
        return False


def _is_torch_zip(path: Path) -> bool:
    """Whether the zip archive ``path`` is a PyTorch checkpoint (it holds ``<name>/data.pkl``), not a NumPy .npz."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("data.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"weights file {path} is a damaged zip archive ({err})") from None


def _torch_state(path: Path) -> Any:
    import warnings

    try:
        with warnings.catch_warnings():  # e.g. "looks like a TorchScript archive": the error below says it in one line
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises RuntimeError, UnpicklingError, EOFError, KeyError, ...)
        text = " ".join(str(err).split())
        if "TorchScript" in text:
            why = "it is a TorchScript archive (torch.jit.save); save the model's state_dict() instead"
        elif "weights_only" in text or "Unsupported global" in text:
            why = ("it holds pickled Python objects besides tensors (a whole model or training state?); save "
                   "model.state_dict() with torch.save or safetensors instead")
        else:
            why = f"damaged or truncated: {type(err).__name__}: {text[:100] or 'no more data'}"
        raise ValueError(f"weights file {path} cannot be read as a PyTorch checkpoint ({why})") from None


def _load_state_file(path: Path, kind: Optional[str] = None) -> dict:
    """The tensors of the weights file ``path`` as ``{name: tensor}``, recognised by content, not by name:
    safetensors, a PyTorch checkpoint (read with ``weights_only=True``; a ``state_dict``/``model``/``module`` entry
    is unwrapped) or a NumPy ``.npz`` with timm key names. Anything else (empty, truncated, text, random bytes, a
    folder, no tensors) raises :class:`ValueError` that names the file and says what it is."""
    path = Path(path)
    kind = kind or _weights_file_kind(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"weights file {path} is a damaged or truncated safetensors file "
                             f"({' '.join(str(err).split())[:120]})") from None
    if kind == "zip" and not _is_torch_zip(path):
        state = {k: torch.from_numpy(v.copy()) for k, v in _npz_arrays(path).items() if v.dtype.kind in "fiub"}
        return _tensors_only(path, state, "NumPy archive")
    state = _torch_state(path)
    for key in _STATE_DICT_WRAPPERS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return _tensors_only(path, state, "PyTorch checkpoint")


def _tensors_only(path: Path, state: Any, what: str) -> dict:
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} is a {what} holding a {type(state).__name__}, not a state dict "
                         "(name -> tensor)")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = [str(k) for k in list(state)[:5]]
        raise ValueError(f"weights file {path} is a {what} without tensors (its entries: {keys}); expected a state "
                         f"dict, possibly under {', '.join(repr(k) for k in _STATE_DICT_WRAPPERS)}")
    return tensors


def _does_not_fit(path: Path, name: str, detail: str) -> ValueError:
    return ValueError(f"checkpoint {path} does not fit timm model {name!r} ({detail}); check the backbone name "
                      "matches the weights")


def create_backbone(
    name: str, pretrained: bool = False, checkpoint_path: Optional[Union[str, os.PathLike]] = None, **timm_kwargs: Any
) -> nn.Module:
    """Create a timm ViT by name without its classifier; weights from timm, from a local file, or random.

    A local ``checkpoint_path`` that is not a usable weights file (missing, a folder, empty, truncated, text, not a
    checkpoint, or one of another architecture) raises :class:`ValueError` (:class:`FileNotFoundError` when missing)
    whose one-line message names the file and says what it is.

    The model's ``weights_source`` says where its weights came from (:func:`weights_source`): timm keeps the
    published weights' tag and licence in ``pretrained_cfg`` also for a random or locally loaded model, and an
    export must not pass those off as its origin."""
    model = _backbone_with_weights(name, pretrained, checkpoint_path, timm_kwargs)
    model.weights_source = weights_source(name, model, pretrained, checkpoint_path)
    return model


def weights_source(name: str, model: nn.Module, pretrained: bool,
                   checkpoint_path: Optional[Union[str, os.PathLike]]) -> dict:
    """``{"kind": "file", "path", "size"}`` for a local weights file, ``{"kind": "pretrained", "name", "tag",
    "hf_hub_id", "license"}`` for timm's published weights, ``{"kind": "random init"}`` otherwise."""
    if checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser().resolve()
        return {"kind": "file", "path": str(path), "size": path.stat().st_size}
    if pretrained:
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        tag = cfg.get("tag")
        architecture = cfg.get("architecture") or name.split(".")[0]
        return {"kind": "pretrained", "name": f"{architecture}.{tag}" if tag else architecture, "tag": tag,
                "hf_hub_id": cfg.get("hf_hub_id"), "url": cfg.get("url"), "license": cfg.get("license")}
    return {"kind": "random init"}


def _backbone_with_weights(name: str, pretrained: bool, checkpoint_path: Optional[Union[str, os.PathLike]],
                           timm_kwargs: dict) -> nn.Module:
    import timm

    kwargs = dict(timm_kwargs)
    kwargs["num_classes"] = 0
    if checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a timm-named state dict")
        kind = _weights_file_kind(path)
        if kind == "zip" and _is_big_vision_npz(path):
            return _big_vision_backbone(name, path, kwargs)
        state = _load_state_file(path, kind)
        model = _create_model(name, kwargs)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        names = sorted(state)[:3]
        shared = bool(set(model.state_dict()) & set(state))
        # timm's own filter adapts checkpoints to the model (e.g. resamples position embeddings to img_size, renames
        # the keys of original DINOv2 or CLIP checkpoints).
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                state = filter_fn(state, model)
            except (RuntimeError, ValueError, KeyError, IndexError, TypeError, AssertionError) as err:
                if not shared:
                    raise _foreign(path, name, kind, names) from None
                raise _does_not_fit(path, name, " ".join(str(err).split())[:200]) from None
        if not set(model.state_dict()) & set(state):
            raise _foreign(path, name, kind, names)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
            raise _does_not_fit(path, name, detail) from None
        if missing or unexpected:
            raise _does_not_fit(path, name, f"{len(missing)} missing keys (e.g. {missing[:3]}) and {len(unexpected)} "
                                            f"unexpected keys (e.g. {unexpected[:3]})")
        return model
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"timm has no model named {name!r}; see timm.list_models('vit_*')") from None
        if pretrained:
            raise WeightsUnavailableError(_weights_help(name, err)) from None
        raise
    except OSError as err:  # huggingface_hub / urllib failures when offline
        if pretrained:
            raise WeightsUnavailableError(_weights_help(name, err)) from None
        raise


def _foreign(path: Path, name: str, kind: str, names: list) -> ValueError:
    """The error for a weights file none of whose tensor names belongs to the model."""
    if kind == "zip" and not _is_torch_zip(path):
        return ValueError(f"weights file {path} is a NumPy .npz of arrays {names}, neither a big_vision / AugReg ViT "
                          "checkpoint nor a state dict with timm key names")
    return _does_not_fit(path, name, f"none of its tensor names is a parameter of the model, e.g. {names}: not a "
                                     "checkpoint of this kind of network")


def _create_model(name: str, kwargs: dict) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"timm has no model named {name!r}; see timm.list_models('vit_*')") from None
        raise


def _big_vision_backbone(name: str, path: Path, kwargs: dict) -> nn.Module:
    """A timm model with the weights of a big_vision / AugReg ``.npz`` (timm's ``load_pretrained`` reads those)."""
    model = _create_model(name, kwargs)
    load = getattr(model, "load_pretrained", None)
    if load is None:
        raise ValueError(f"checkpoint {path} is a big_vision .npz, which timm reads only into VisionTransformer "
                         f"models, not {type(model).__name__} ({name!r}); convert it to a state dict")
    try:
        with torch.no_grad():
            load(str(path))
    except (KeyError, RuntimeError, ValueError, IndexError) as err:
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        detail = ("missing " if isinstance(err, KeyError) else "") + " ".join(text.split())[:200]
        raise _does_not_fit(path, name, detail) from None
    return model


def _weights_help(name: str, err: BaseException) -> str:
    return (
        f"could not download pretrained weights for {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
        f"Either download them once with network access (they are cached under ~/.cache/huggingface), or pass "
        f"checkpoint_path=/path/to/weights (.safetensors, .pth or .npz with timm key names)"
    )
