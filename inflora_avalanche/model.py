"""``InfLoRAViT``: a timm Vision Transformer with InfLoRA branches on ``attn.qkv`` and one linear head per task."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .lora import InfLoRAQKV

BlockSelection = Union[None, int, Sequence[int]]
UNSEEN_CLASS_LOGIT = -1.0e4  # logit of classes no head covers yet: finite, so evaluation losses stay finite


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
    whose one-line message names the file and says what it is."""
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


def _attention_source(attn: nn.Module) -> Optional[str]:
    try:
        return inspect.getsource(type(attn).forward)
    except (OSError, TypeError):  # built without source files: the adapter's guard reports a bypass at run time
        return None


def qkv_problem(block: nn.Module, index: int) -> Optional[str]:
    """Why InfLoRA cannot adapt ``block``'s attention; ``None`` when it can.

    InfLoRA replaces ``attn.qkv`` by an :class:`InfLoRAQKV`, which adds the branch when it is called. The attention
    must therefore have a fused ``qkv`` ``nn.Linear`` (queries, keys, values stacked in that order) and call it as a
    module. timm's BEiT and EVA attentions with a separate q/v bias call ``F.linear(x, qkv.weight, bias)`` instead;
    they are adapted by switching on their own ``qkv_bias_separate`` path (``qkv(x)`` plus the bias, the same sum).
    """
    attn = getattr(block, "attn", None)
    qkv = getattr(attn, "qkv", None)
    qkv = qkv.qkv if isinstance(qkv, InfLoRAQKV) else qkv
    if not isinstance(qkv, nn.Linear):
        if attn is None:
            kind = "no attention"
        elif getattr(attn, "k_proj", None) is not None:
            kind = f"{type(attn).__name__} with separate q/k/v projections, not a fused qkv nn.Linear"
        else:
            kind = f"{type(attn).__name__} without a fused qkv nn.Linear"
        return f"block {index} ({type(block).__name__}) has {kind}"
    if qkv.out_features % 3 != 0:
        return f"block {index}: attn.qkv has {qkv.out_features} outputs, not 3 x an attention width"
    source = _attention_source(attn)
    if source is None:
        return None
    if "self.qkv(" not in source:
        return f"block {index}: {type(attn).__name__}.forward never calls attn.qkv(x) (it reads its weight directly)"
    if "qkv.weight" in source and getattr(attn, "q_bias", None) is not None and not hasattr(attn, "qkv_bias_separate"):
        return (
            f"block {index}: {type(attn).__name__} adds its q/v bias through F.linear(x, qkv.weight, ...), "
            "bypassing attn.qkv(x)"
        )
    return None


def _resolve_blocks(selection: BlockSelection, depth: int) -> list[int]:
    if selection is None:
        return list(range(depth))
    if isinstance(selection, int):
        if not 1 <= selection <= depth:
            raise ValueError(f"adapted_blocks={selection} must be between 1 and the backbone depth {depth}")
        return list(range(selection))
    blocks = sorted(set(int(b) for b in selection))
    if not blocks or blocks[0] < 0 or blocks[-1] >= depth:
        raise ValueError(f"adapted_blocks={list(selection)} must be indices in [0, {depth - 1}]")
    return blocks


def _wrap_qkv(attn: nn.Module, name: str) -> None:
    adapter = InfLoRAQKV(attn.qkv)
    adapter.layer_name = name
    # BEiT / EVA: make the attention call qkv(x) and add its q/v bias after it (its own alternative path).
    if getattr(attn, "q_bias", None) is not None and getattr(attn, "qkv_bias_separate", True) is False:
        attn.qkv_bias_separate = True
        adapter.restore_bias_separate = False
    attn.qkv = adapter


def _unwrap_qkv(attn: nn.Module) -> None:
    adapter = attn.qkv
    if getattr(adapter, "restore_bias_separate", None) is not None:
        attn.qkv_bias_separate = adapter.restore_bias_separate
    attn.qkv = adapter.qkv


class InfLoRAViT(nn.Module):
    """A frozen timm ViT with per-task InfLoRA branches on ``attn.qkv`` and per-task linear heads.

    Args:
        backbone: a timm model name (e.g. ``"vit_base_patch16_224.augreg_in21k"``) or a timm ViT instance.
        rank: rank of each task's branches.
        adapted_blocks: ``None`` for all blocks, ``N`` for the first N blocks (the paper's "b5" is 5), or indices.
        pretrained: load timm's pretrained weights (downloads them unless cached).
        checkpoint_path: a local weights file to load instead (works offline).
        num_classes: width of the output (classes are indexed by their dataset label). ``None`` grows it to the
            largest label seen; the strategy fills it in from the benchmark when it can.
        **timm_kwargs: passed to ``timm.create_model`` (``img_size``, ``dynamic_img_size``, ...).

    The output is one logit per dataset label: each head writes its classes' columns; labels no head covers get a
    very low logit, so an argmax over the output is the class-incremental prediction.

    Like a timm model it has ``forward_features(x)`` (the backbone's token features), ``forward_head(features,
    pre_logits=False)`` (pooling, then the heads; ``forward(x)`` is the two in turn), ``num_features`` and
    ``pretrained_cfg`` / ``default_cfg`` (the backbone's: ``timm.data.resolve_model_data_config(model)`` gives its
    input size, mean and std).
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module],
        rank: int = 10,
        adapted_blocks: BlockSelection = None,
        pretrained: bool = False,
        checkpoint_path: Optional[Union[str, os.PathLike]] = None,
        num_classes: Optional[int] = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        self.timm_kwargs: dict[str, Any] = dict(timm_kwargs)  # to rebuild the architecture (e.g. for export)
        if isinstance(backbone, str):
            self.backbone_name = backbone
            backbone = create_backbone(backbone, pretrained=pretrained, checkpoint_path=checkpoint_path, **timm_kwargs)
        else:
            cfg = getattr(backbone, "pretrained_cfg", None)
            self.backbone_name = (cfg.get("architecture") if isinstance(cfg, dict) else None) or type(backbone).__name__
            if hasattr(backbone, "reset_classifier"):
                backbone.reset_classifier(0)
        blocks = getattr(backbone, "blocks", None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks):
            raise ValueError(
                f"backbone {self.backbone_name!r} has no list of transformer blocks with a fused attn.qkv nn.Linear; "
                "InfLoRA needs a timm ViT such as vit_base_patch16_224 or vit_small_patch14_dinov2"
            )
        problem = next(filter(None, (qkv_problem(b, i) for i, b in enumerate(blocks))), None)
        if problem:
            raise ValueError(
                f"backbone {self.backbone_name!r} is not supported: {problem}; InfLoRA needs a fused attn.qkv "
                "nn.Linear called as a module in every block (timm ViT, DeiT, DINOv2, EVA-02 tiny/small, BEiT, ...)"
            )
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        width = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
        if not isinstance(width, int):
            raise ValueError(f"backbone {self.backbone_name!r} has no num_features or embed_dim (its feature width)")
        self.feature_dim = int(width)
        self.adapted_blocks: list[int] = []
        self.rank = rank
        self.heads = nn.ModuleList()
        self.configure(rank=rank, adapted_blocks=adapted_blocks, _all_blocks=adapted_blocks is None)
        self.task_classes: list[list[int]] = []
        self.num_classes = num_classes
        self.register_buffer("_class_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.backbone.eval()

    # ----------------------------------------------------------------------------------------------- structure
    def configure(
        self, rank: Optional[int] = None, adapted_blocks: BlockSelection = None, _all_blocks: bool = False
    ) -> None:
        """Change the rank or the adapted blocks; only before the first task."""
        if self.num_tasks:
            raise ValueError("rank and adapted_blocks can only change before the first task is learned")
        blocks = self.backbone.blocks
        if adapted_blocks is not None or _all_blocks:
            wanted = _resolve_blocks(adapted_blocks, len(blocks))
            for i, block in enumerate(blocks):
                if isinstance(block.attn.qkv, InfLoRAQKV) and i not in wanted:
                    _unwrap_qkv(block.attn)
                elif not isinstance(block.attn.qkv, InfLoRAQKV) and i in wanted:
                    _wrap_qkv(block.attn, f"blocks.{i}.attn.qkv")
            self.adapted_blocks = wanted
        if rank is not None:
            min_width = min(blocks[i].attn.qkv.in_features for i in self.adapted_blocks)
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < min_width:
                raise ValueError(
                    f"rank must be an integer in [1, {min_width - 1}] (below the width {min_width}), got {rank}"
                )
            self.rank = rank

    def adapters(self) -> Iterator[tuple[str, InfLoRAQKV]]:
        """``(name, adapter)`` for every adapted ``qkv``, in block order."""
        for i in self.adapted_blocks:
            yield f"blocks.{i}.attn.qkv", self.backbone.blocks[i].attn.qkv

    @property
    def num_tasks(self) -> int:
        """Tasks with a head, the current one included."""
        return len(self.heads)

    @property
    def task_open(self) -> bool:
        return any(a.rank for _, a in self.adapters())

    @property
    def seen_classes(self) -> list[int]:
        return [c for classes in self.task_classes for c in classes]

    @property
    def output_width(self) -> int:
        seen = max(self.seen_classes, default=-1) + 1
        return max(self.num_classes or 0, seen)

    def start_task(self, classes: Sequence[int]) -> int:
        """Add a head for ``classes`` and open a zero branch (to be designed) in every adapted layer."""
        classes = [int(c) for c in classes]
        if not classes:
            raise ValueError("an experience with no classes cannot be learned: the experience is empty")
        overlap = set(classes) & set(self.seen_classes)
        if overlap:
            raise ValueError(
                f"classes {sorted(overlap)} were already learned in an earlier task; InfLoRA is class-incremental "
                "and needs disjoint classes per experience"
            )
        if self.task_open:
            raise RuntimeError("the previous task is still open; call finish_task() first")
        weight = next(self.backbone.parameters())
        head = nn.Linear(self.feature_dim, len(classes)).to(device=weight.device)
        self.heads.append(head)
        self.task_classes.append(classes)
        self._refresh_class_index()
        for _, adapter in self.adapters():
            adapter.start_branch(self.rank)
        return len(self.heads) - 1

    def finish_task(self) -> None:
        """Freeze the current task: merge its branches into ``qkv`` and stop its head's training."""
        for _, adapter in self.adapters():
            adapter.finish_branch()
        for param in self.heads.parameters():
            param.requires_grad_(False)
            param.grad = None  # free the finished task's training state

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The current task's up-projections and head: the only parameters InfLoRA trains."""
        if not self.task_open:
            return []
        params = [adapter.up for _, adapter in self.adapters()]
        return params + list(self.heads[-1].parameters())

    def merge(self) -> None:
        for _, adapter in self.adapters():
            adapter.merge()

    def unmerge(self) -> None:
        for _, adapter in self.adapters():
            adapter.unmerge()

    def _refresh_class_index(self) -> None:
        device = self._class_index.device
        self._class_index = torch.tensor(self.seen_classes, dtype=torch.long, device=device)

    # ----------------------------------------------------------------------------------------------- forward
    def train(self, mode: bool = True) -> "InfLoRAViT":
        # The backbone always runs in eval mode (no dropout or drop-path), as in the reference.
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def pretrained_cfg(self) -> dict:
        """The backbone's timm ``pretrained_cfg`` (input size, mean, std, interpolation, ...), as timm keeps it."""
        return dict(getattr(self.backbone, "pretrained_cfg", None) or {})

    @property
    def default_cfg(self) -> dict:
        """timm's older name for :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    @property
    def num_features(self) -> int:
        """Width of the pooled feature the heads read (timm's name)."""
        return self.feature_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's ``forward_features``: its token features after the final norm, before pooling (timm's
        meaning; ``(B, tokens, d)`` for a ViT)."""
        if hasattr(self.backbone, "forward_features"):
            return self.backbone.forward_features(x)
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's ``forward_head``: pool ``forward_features``' output, then (unless ``pre_logits``) the heads.

        ``pre_logits=True`` gives the pooled ``(B, num_features)`` feature the heads read; otherwise the output has
        one column per dataset label (see the class docs), as ``forward`` returns it.
        """
        pooled = self.backbone.forward_head(features) if hasattr(self.backbone, "forward_head") else features
        if pre_logits:
            return pooled
        logits = self.forward_heads(pooled).float()
        out = logits.new_full((pooled.shape[0], self.output_width), UNSEEN_CLASS_LOGIT)
        if logits.shape[1]:
            out[:, self._class_index] = logits
        return out

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-head feature ``(B, num_features)``: ``forward_head(forward_features(x), pre_logits=True)``."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward_heads(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of every head on pooled ``features``, concatenated in task order (column i is class
        ``seen_classes[i]``)."""
        if not self.heads:
            return features.new_zeros(features.shape[0], 0)
        return torch.cat([head(features) for head in self.heads], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def export_timm(self, path: Union[str, os.PathLike], **kwargs: Any) -> Any:
        """Write a timm model folder (``model.safetensors`` + ``config.json``, all branches merged, one head) that
        ``timm.create_model("local-dir:<path>", pretrained=True)`` loads; see ``export.export_timm_checkpoint``."""
        from .export import export_timm_checkpoint

        return export_timm_checkpoint(self, path, **kwargs)

    # ----------------------------------------------------------------------------------------------- state
    def get_extra_state(self) -> Any:
        return {
            "backbone": self.backbone_name,
            "rank": self.rank,
            "adapted_blocks": list(self.adapted_blocks),
            "task_classes": [list(c) for c in self.task_classes],
            "num_classes": self.num_classes,
            "task_open": self.task_open,
        }

    def set_extra_state(self, state: Any) -> None:
        # Runs before the children load, so the heads the checkpoint holds are created here first.
        if list(state["adapted_blocks"]) != list(self.adapted_blocks):
            raise ValueError(
                f"checkpoint adapts blocks {state['adapted_blocks']} but this model adapts {self.adapted_blocks}"
            )
        self.rank = int(state["rank"])
        self.num_classes = state["num_classes"]
        weight = next(self.backbone.parameters())
        self.heads = nn.ModuleList(
            nn.Linear(self.feature_dim, len(c)).to(device=weight.device) for c in state["task_classes"]
        )
        self.task_classes = [list(c) for c in state["task_classes"]]
        for i, head in enumerate(self.heads):
            head.requires_grad_(bool(state["task_open"]) and i == len(self.heads) - 1)
        self._refresh_class_index()
