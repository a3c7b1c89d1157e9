"""``InfLoRAViT``: a timm Vision Transformer with InfLoRA branches on ``attn.qkv`` and one linear head per task."""

from __future__ import annotations

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


def _load_state_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def create_backbone(
    name: str, pretrained: bool = False, checkpoint_path: Optional[Union[str, os.PathLike]] = None, **timm_kwargs: Any
) -> nn.Module:
    """Create a timm ViT by name without its classifier; weights from timm, from a local file, or random."""
    import timm

    kwargs = dict(timm_kwargs)
    kwargs["num_classes"] = 0
    if checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a timm-named state dict")
        if path.suffix == ".npz":  # big_vision / augreg checkpoints: timm knows how to read them
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        model = timm.create_model(name, pretrained=False, **kwargs)
        state = {k: v.float() if v.is_floating_point() else v for k, v in _load_state_file(path).items()}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        # timm's own filter adapts checkpoints to the model (e.g. resamples position embeddings to img_size).
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
            raise ValueError(
                f"checkpoint {path} does not fit timm model {name!r} ({detail}); check the backbone name matches the weights"
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not fit timm model {name!r}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}) and {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); "
                "check the backbone name matches the weights"
            )
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


def _weights_help(name: str, err: BaseException) -> str:
    return (
        f"could not download pretrained weights for {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
        f"Either download them once with network access (they are cached under ~/.cache/huggingface), or pass "
        f"checkpoint_path=/path/to/weights (.safetensors, .pth or .npz with timm key names)"
    )


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
        if blocks is None or not all(isinstance(getattr(getattr(b, "attn", None), "qkv", None), nn.Linear) for b in blocks):
            raise ValueError(
                f"backbone {self.backbone_name!r} has no fused attn.qkv nn.Linear in every block; InfLoRA needs a "
                "timm ViT such as vit_base_patch16_224 or vit_small_patch14_dinov2"
            )
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.feature_dim = int(getattr(backbone, "num_features", getattr(backbone, "embed_dim")))
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
                    block.attn.qkv = block.attn.qkv.qkv
                elif not isinstance(block.attn.qkv, InfLoRAQKV) and i in wanted:
                    block.attn.qkv = InfLoRAQKV(block.attn.qkv)
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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-head feature: the backbone's pooled (CLS) token after the final norm."""
        return self.backbone(x)

    def forward_heads(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of every head, concatenated in task order (column i is class ``seen_classes[i]``)."""
        if not self.heads:
            return features.new_zeros(features.shape[0], 0)
        return torch.cat([head(features) for head in self.heads], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_heads(self.forward_features(x)).float()
        out = logits.new_full((x.shape[0], self.output_width), UNSEEN_CLASS_LOGIT)
        if logits.shape[1]:
            out[:, self._class_index] = logits
        return out

    def export_timm(self, path: Union[str, os.PathLike], **kwargs: Any) -> Any:
        """Write a plain timm checkpoint (all branches merged, one head); see ``export.export_timm_checkpoint``."""
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
