"""``InfLoRAViT``: a timm Vision Transformer with InfLoRA branches on ``attn.qkv`` and one linear head per task."""

from __future__ import annotations

import inspect
import os
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .backbone import create_backbone
from .lora import InfLoRAQKV

BlockSelection = Union[None, int, Sequence[int]]
UNSEEN_CLASS_LOGIT = -1.0e4  # logit of classes no head covers yet: finite, so evaluation losses stay finite


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
