"""``LowRankViT``: a timm Vision Transformer with per-task low-rank branches on chosen linear layers of its blocks and
one linear head per task; ``InfLoRAViT``: InfLoRA's (by default on the key and value rows of ``attn.qkv``)."""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .backbone import create_backbone
from .lora import InfLoRALinear, LowRankLinear, qkv_row_ranges
from .targets import (DEFAULT_TARGET_MODULES, TargetModules, is_fused_qkv, normalize_qkv_rows,
                      normalize_target_modules, qkv_problem, resolve_targets, target_problem, unwrap_layer, wrap_layer)

BlockSelection = Union[None, int, Sequence[int]]
UNSEEN_CLASS_LOGIT = -1.0e4  # logit of classes no head covers yet: finite, so evaluation losses stay finite


def _check_rank(rank: Any, min_width: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank < min_width:
        raise ValueError(f"rank must be an integer in [1, {min_width - 1}] (below the width {min_width}), got {rank}")


def _summary(names: Sequence[str], shown: int = 4) -> str:
    names = list(names)
    return str(names) if len(names) <= shown else f"{names[:shown]} ... ({len(names)} layers)"


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


class LowRankViT(nn.Module):
    """A frozen timm ViT with per-task low-rank branches on chosen linear layers and per-task linear heads: what the
    low-rank continual methods share (:class:`InfLoRAViT`, :class:`~inflora_avalanche.sdlora.SDLoRAViT`). A subclass
    names its adapter (``adapter_class``, a :class:`~inflora_avalanche.lora.LowRankLinear` with ``start_branch(rank)``,
    ``finish_branch()``, ``rank`` and ``trainable_parameters()``) and its default qkv rows.

    Args:
        backbone: a timm model name (e.g. ``"vit_base_patch16_224.augreg_in21k"``) or a timm ViT instance.
        rank: rank of each task's branches.
        adapted_blocks: ``None`` for all blocks, ``N`` for the first N blocks (the paper's "b5" is 5), or indices.
        target_modules: the linear layers of each adapted block that get branches, by their name in the block as
            in PEFT (``"attn.qkv"``, ``"attn.proj"``, ``"mlp.fc1"``, ``"mlp.fc2"``; a name also matches a module
            whose name ends with ``"." + name``), or ``"all-linear"``. Default: ``("attn.qkv",)``, the reference's.
            A name that matches no module, or a module that is not an ``nn.Linear`` or is not called as a module, is
            refused here in one line.
        qkv_rows: the rows of a fused ``qkv`` target that get branches: any of ``"q"``, ``"k"``, ``"v"``. Default:
            the method's (``default_qkv_rows``); other targets get branches on all their rows.
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

    adapter_class: type = LowRankLinear  # set by each method's model
    default_qkv_rows: tuple[str, ...] = ("k", "v")
    join_qkv_rows = True  # adjacent qkv parts share one branch (InfLoRA's k|v); False: one branch per projection

    def __init__(
        self,
        backbone: Union[str, nn.Module],
        rank: int = 10,
        adapted_blocks: BlockSelection = None,
        target_modules: Optional[TargetModules] = None,
        qkv_rows: Optional[Sequence[str]] = None,
        pretrained: bool = False,
        checkpoint_path: Optional[Union[str, os.PathLike]] = None,
        num_classes: Optional[int] = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        self.timm_kwargs: dict[str, Any] = dict(timm_kwargs)  # to rebuild the architecture (e.g. for export)
        if self.adapter_class is LowRankLinear:
            raise TypeError(f"{type(self).__name__} is a base class: build an InfLoRAViT or an SDLoRAViT")
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
                "these methods need a timm ViT such as vit_base_patch16_224 or vit_small_patch14_dinov2"
            )
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        width = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
        if not isinstance(width, int):
            raise ValueError(f"backbone {self.backbone_name!r} has no num_features or embed_dim (its feature width)")
        self.feature_dim = int(width)
        self.adapted_blocks: list[int] = []
        self.target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
        self.qkv_rows: tuple[str, ...] = self.default_qkv_rows
        self.adapted_layers: list[str] = []  # names relative to the backbone, e.g. "blocks.3.attn.qkv"
        self.rank = rank
        self.heads = nn.ModuleList()
        self.configure(rank=rank, adapted_blocks=adapted_blocks, target_modules=target_modules, qkv_rows=qkv_rows,
                       _all_blocks=adapted_blocks is None)
        self.task_classes: list[list[int]] = []
        self.num_classes = num_classes
        self.register_buffer("_class_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.backbone.eval()

    # ----------------------------------------------------------------------------------------------- structure
    def configure(
        self,
        rank: Optional[int] = None,
        adapted_blocks: BlockSelection = None,
        target_modules: Optional[TargetModules] = None,
        qkv_rows: Optional[Sequence[str]] = None,
        _all_blocks: bool = False,
    ) -> None:
        """Change the rank, the adapted blocks, the target modules or the adapted qkv rows; only before the first
        task. Everything is checked before anything changes."""
        if self.num_tasks:
            raise ValueError("rank, adapted_blocks, target_modules and qkv_rows can only change before the first task "
                             "is learned")
        blocks = self.backbone.blocks
        structure = adapted_blocks is not None or _all_blocks or target_modules is not None or qkv_rows is not None
        widths = [adapter.in_features for _, adapter in self.adapters()]
        if structure:
            wanted = (_resolve_blocks(adapted_blocks, len(blocks)) if adapted_blocks is not None or _all_blocks
                      else self.adapted_blocks)
            targets = self.target_modules if target_modules is None else normalize_target_modules(target_modules)
            rows = self.qkv_rows if qkv_rows is None else normalize_qkv_rows(qkv_rows)
            plan = {i: self._targets_of_block(blocks[i], i, targets) for i in wanted}
            has_qkv = any(is_fused_qkv(n) for names in plan.values() for n in names)
            if rows != self.default_qkv_rows and not has_qkv:
                raise ValueError(f"qkv_rows={list(rows)} applies to a fused qkv layer, but target_modules="
                                 f"{list(targets)} selects none; add 'attn.qkv' or leave qkv_rows at its default")
            widths = []
            for i, names in plan.items():  # the rows and widths of every planned layer, checked before any change
                for name in names:
                    layer = blocks[i].get_submodule(name)
                    layer = layer.base_layer if isinstance(layer, LowRankLinear) else layer
                    if is_fused_qkv(name):
                        qkv_row_ranges(layer.out_features, rows, self.join_qkv_rows)
                    widths.append(layer.in_features)
            _check_rank(self.rank if rank is None else rank, min(widths))
            for name in list(self.adapted_layers):
                index, _, relative = name[len("blocks."):].partition(".")
                unwrap_layer(blocks[int(index)], relative)
            self.adapted_layers = []
            for i, names in plan.items():
                for name in names:
                    wrap_layer(blocks[i], name, f"blocks.{i}.{name}", rows, self.adapter_class, self.join_qkv_rows)
                    self.adapted_layers.append(f"blocks.{i}.{name}")
            self.adapted_blocks, self.target_modules, self.qkv_rows = wanted, targets, rows
        if rank is not None:
            _check_rank(rank, min(widths))
            self.rank = rank

    def _targets_of_block(self, block: nn.Module, index: int, targets: Sequence[str]) -> list[str]:
        """The layers of ``block`` that ``targets`` select, each checked to carry a branch (else ``ValueError``)."""
        qkv_hint = ("the attn.qkv target needs a fused attn.qkv nn.Linear called as a module in every adapted "
                    "block (timm ViT, DeiT, DINOv2, EVA-02 tiny/small, BEiT, ...)")
        problem = qkv_problem(block, index) if "attn.qkv" in targets else None
        if problem:
            raise ValueError(f"backbone {self.backbone_name!r} is not supported: {problem}; {qkv_hint}")
        try:
            names = resolve_targets(block, index, targets)
        except ValueError as err:
            raise ValueError(f"backbone {self.backbone_name!r}: {err}") from None
        for name in names:
            problem = target_problem(block, index, name)
            if problem:
                hint = qkv_hint if name == "attn.qkv" else f"remove {name} from target_modules"
                raise ValueError(f"backbone {self.backbone_name!r} is not supported: {problem}; {hint}")
        return names

    def adapters(self) -> Iterator[tuple[str, LowRankLinear]]:
        """``(name, adapter)`` for every adapted layer, in block order, then in module order within a block (names
        relative to the backbone, e.g. ``"blocks.3.attn.qkv"``)."""
        for name in self.adapted_layers:
            yield name, self.backbone.get_submodule(name)

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
        """Add a head for ``classes`` and open a new branch of rank ``rank`` in every adapted layer (how it starts is
        the adapter's: InfLoRA's is zero and designed next, SD-LoRA's is initialised to train)."""
        classes = [int(c) for c in classes]
        if not classes:
            raise ValueError("an experience with no classes cannot be learned: the experience is empty")
        overlap = set(classes) & set(self.seen_classes)
        if overlap:
            raise ValueError(
                f"classes {sorted(overlap)} were already learned in an earlier task; these methods are class-incremental "
                "and needs disjoint classes per experience"
            )
        if self.task_open:
            raise RuntimeError("the previous task is still open; call finish_task() first")
        weight = next(self.backbone.parameters())
        head = nn.Linear(self.feature_dim, len(classes)).to(device=weight.device)
        self.heads.append(head)
        self.task_classes.append(classes)
        self._refresh_class_index()
        task = len(self.heads) - 1
        for _, adapter in self.adapters():
            adapter.start_branch(self.branch_rank(task))
        return task

    def branch_rank(self, task: int) -> int:
        """The rank of task ``task``'s branches (``rank``; a method may schedule it)."""
        return self.rank

    def finish_task(self) -> None:
        """Close the current task: every adapter finishes its branch (InfLoRA merges it into the layer) and the
        task's head stops training."""
        for _, adapter in self.adapters():
            adapter.finish_branch()
        for param in self.heads.parameters():
            param.requires_grad_(False)
            param.grad = None  # free the finished task's training state

    def trainable_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters trained for the open task, by group: ``"branches"`` (what every adapted layer trains: its
        ``trainable_parameters()``) and ``"head"`` (the task's head); subclasses may add groups. Empty lists when no
        task is open."""
        if not self.task_open:
            return {"branches": [], "head": []}
        branches = [p for _, adapter in self.adapters() for p in adapter.trainable_parameters()]
        return {"branches": branches, "head": list(self.heads[-1].parameters())}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter trained for the open task (all groups)."""
        return [p for group in self.trainable_parameter_groups().values() for p in group]

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The part of ``state_dict()`` that learning changes: the heads, and every adapted layer whole (its
        branches and its base weight, which holds the merged ones). Selected by the adapters' own keys, whatever
        the targets; with the frozen backbone it rebuilds the model (:meth:`load_trained_state_dict`)."""
        prefixes = tuple(f"backbone.{name}." for name in self.adapted_layers)
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.") or k.startswith(prefixes)}

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`trained_state_dict` into a model of the same settings (the frozen backbone stays as built).
        A state that does not fit this model raises ``ValueError`` naming the first keys that differ."""
        result = self.load_state_dict(state, strict=False)
        prefixes = tuple(f"backbone.{name}." for name in self.adapted_layers)
        missing = [k for k in result.missing_keys if not k.startswith("backbone.") or k.startswith(prefixes)]
        if missing or result.unexpected_keys:
            raise ValueError(f"the saved model does not fit this model (missing {missing[:3]}, unexpected "
                             f"{result.unexpected_keys[:3]})")

    def is_trained_parameter(self, name: str) -> bool:
        """Whether the backbone parameter ``name`` (relative to the backbone) belongs to an adapted layer, whose
        weight learning changes (merges)."""
        return any(name.startswith(layer + ".") for layer in self.adapted_layers)

    def _refresh_class_index(self) -> None:
        device = self._class_index.device
        self._class_index = torch.tensor(self.seen_classes, dtype=torch.long, device=device)

    # ----------------------------------------------------------------------------------------------- forward
    def train(self, mode: bool = True) -> "LowRankViT":
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

    # timm's model interface, so timm's optimiser factory, layer decay and training scripts work on the wrapper.
    def get_classifier(self) -> nn.ModuleList:
        """The classifier: one head per task (timm's name)."""
        return self.heads

    def reset_classifier(self, num_classes: Optional[int] = None, global_pool: Optional[str] = None) -> None:
        """timm's ``reset_classifier`` before the first task: set the output width (``num_classes``; ``0`` or
        ``None`` grows it with the stream) and the backbone's ``global_pool``. The heads are created per task, so
        after training there is no single classifier to replace: that is refused."""
        if self.heads:
            raise ValueError(f"reset_classifier after {self.num_tasks} task(s) would drop the per-task heads their "
                             "branches were trained with; build a new model for a new label space, or read features "
                             "with forward_pooled")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 0):
            raise ValueError(f"num_classes must be a non-negative integer or None, got {num_classes!r}")
        if global_pool is not None:
            if not hasattr(self.backbone, "reset_classifier"):
                raise ValueError(f"{type(self.backbone).__name__} has no reset_classifier to set global_pool with")
            self.backbone.reset_classifier(0, global_pool)
        self.num_classes = num_classes or None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (the backbone's own
        timm switch; the adapters sit inside the blocks, so they are recomputed too)."""
        if not hasattr(self.backbone, "set_grad_checkpointing"):
            raise ValueError(f"{type(self.backbone).__name__} has no gradient checkpointing (set_grad_checkpointing)")
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names timm's optimiser factory keeps out of weight decay: the backbone's (position embedding,
        class token, ...), under this wrapper's ``backbone.`` prefix."""
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{name}" for name in names}

    def group_matcher(self, coarse: bool = False) -> dict:
        """The backbone's layer groups (for timm's layer-wise learning-rate decay) under the ``backbone.`` prefix;
        the heads match no group, so timm puts them in the last, undecayed one."""
        if not hasattr(self.backbone, "group_matcher"):
            raise ValueError(f"{type(self.backbone).__name__} has no group_matcher for layer-wise decay")

        def prefixed(pattern: str) -> str:
            return "|".join(f"^backbone\\.{p.lstrip('^')}" for p in pattern.split("|"))

        groups = {}
        for key, value in self.backbone.group_matcher(coarse).items():
            if isinstance(value, str):
                groups[key] = prefixed(value)
            else:
                groups[key] = [(prefixed(pattern), order) for pattern, order in value]
        return groups

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

    # ----------------------------------------------------------------------------------------------- state
    def get_extra_state(self) -> Any:
        return {
            "backbone": self.backbone_name,
            "rank": self.rank,
            "adapted_blocks": list(self.adapted_blocks),
            "adapted_layers": list(self.adapted_layers),
            "target_modules": list(self.target_modules),
            "qkv_rows": list(self.qkv_rows),
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
        saved_layers = state.get("adapted_layers", [f"blocks.{i}.attn.qkv" for i in state["adapted_blocks"]])
        if list(saved_layers) != self.adapted_layers:
            raise ValueError(f"checkpoint adapts the layers {_summary(saved_layers)} but this model adapts "
                             f"{_summary(self.adapted_layers)} (other target_modules?)")
        if int(state["rank"]) != self.rank:
            raise ValueError(f"checkpoint was trained with rank {state['rank']} but this model has rank {self.rank}; "
                             f"build the model with rank={state['rank']}")
        self.num_classes = state["num_classes"]
        weight = next(self.backbone.parameters())
        self.heads = nn.ModuleList(
            nn.Linear(self.feature_dim, len(c)).to(device=weight.device) for c in state["task_classes"]
        )
        self.task_classes = [list(c) for c in state["task_classes"]]
        for i, head in enumerate(self.heads):
            head.requires_grad_(bool(state["task_open"]) and i == len(self.heads) - 1)
        self._refresh_class_index()


class InfLoRAViT(LowRankViT):
    """InfLoRA's model: a :class:`LowRankViT` whose adapters are :class:`~inflora_avalanche.lora.InfLoRALinear`
    (a designed, frozen ``down`` and a trained ``up`` per task, merged into the layer when the task ends), by default
    on the key and value rows of every block's ``attn.qkv`` (the reference's). Arguments: see :class:`LowRankViT`."""

    adapter_class = InfLoRALinear
    default_qkv_rows = ("k", "v")

    def merge(self) -> None:
        """Fold every finished branch into its layer (the default state)."""
        for _, adapter in self.adapters():
            adapter.merge()

    def unmerge(self) -> None:
        """Take the finished branches out of the layers; the forward then re-sums them (the reference's way)."""
        for _, adapter in self.adapters():
            adapter.unmerge()
