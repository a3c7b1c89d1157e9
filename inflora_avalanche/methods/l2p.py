"""Make Avalanche's ``LearningToPrompt`` (L2P) work with timm 1.x and with ``class_incremental_benchmark`` streams.

Avalanche 0.6.0's L2P breaks in two places, and this module adapts both without touching site-packages:

1. **Construction.** ``LearningToPrompt.__init__`` builds its model through ``avalanche.models.vit.create_model``,
   which indexes timm's ``PretrainedCfg`` like a dict (``'PretrainedCfg' object is not subscriptable`` on timm
   1.x); it can also only build ViT-Ti/S/B/L variants by name, with downloaded weights and a 768-wide head.
   :class:`PromptedViT` instead wraps *any* timm ``VisionTransformer`` instance (the same backbone, weights and
   resolution the other methods get) and inserts the prompts selected from Avalanche's own
   :class:`avalanche.models.Prompt` pool after the position embedding. :class:`L2PCompat` subclasses
   ``LearningToPrompt`` and replaces only its constructor; the loss (cross-entropy minus the key-query
   similarity term) and the per-experience optimiser reset are inherited unchanged.
2. **Training mask.** ``LearningToPrompt.forward`` masks the logits of classes outside the experience with
   ``np.setdiff1d(np.arange(num_classes), experience.classes_in_this_experience)``. New-API experiences give
   that as a Python ``set``; numpy turns a set into a 0-d object array, nothing is removed, every logit becomes
   ``-inf`` and the loss is NaN. :meth:`L2PCompat.forward` builds the mask from a sorted list.

Prompt tokens carry no position embedding (they are inserted after it), as in the PyTorch L2P / DualPrompt
re-implementations; Avalanche's ``ViTWithPrompt`` instead widens ``pos_embed`` with copies of the class token's.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from avalanche.core import BasePlugin
from avalanche.models import Prompt
from avalanche.training import LearningToPrompt
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

REQUIRED_VIT_PARTS = ("patch_embed", "_pos_embed", "blocks", "norm", "num_prefix_tokens", "forward_head")


class BackboneNotSupported(ValueError):
    """The backbone lacks what a method needs (e.g. L2P needs a timm VisionTransformer)."""


def check_prompt_backbone(backbone: nn.Module) -> None:
    """Raise :class:`BackboneNotSupported` unless ``backbone`` is a timm ViT prompts can be inserted into."""
    missing = [part for part in REQUIRED_VIT_PARTS if not hasattr(backbone, part)]
    if missing:
        raise BackboneNotSupported(
            f"L2P needs a timm VisionTransformer (patch embedding, position embedding, blocks); "
            f"{type(backbone).__name__} lacks {', '.join(missing)}"
        )
    if getattr(backbone, "attn_pool", None) is not None:
        raise BackboneNotSupported("L2P needs a token-pooled ViT; this backbone uses attention pooling")


class PromptedViT(nn.Module):
    """A frozen timm ViT with an L2P prompt pool and a linear head, speaking ``ViTWithPrompt``'s interface.

    ``forward(x, task_id, cls_features, train)`` returns a dict with ``logits``, ``reduce_sim`` (the key-query
    similarity of the selected prompts), ``pre_logits`` and ``prompt_idx``, as Avalanche's L2P strategy expects.
    The query feature is the frozen backbone's pooled pre-logits feature of the un-prompted image.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_k: int = 5,
        embedding_key: str = "cls",
        prompt_init: str = "uniform",
        prompt_key: bool = True,
        batchwise_prompt: bool = False,
        head_type: str = "prompt",
    ) -> None:
        super().__init__()
        check_prompt_backbone(backbone)
        if head_type not in ("prompt", "token", "token+prompt"):
            raise ValueError(f"head_type must be 'prompt', 'token' or 'token+prompt', got {head_type!r}")
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be in [1, pool_size={pool_size}], got {top_k}")
        if hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        backbone.requires_grad_(False)
        self.backbone = backbone
        self.embed_dim = int(backbone.embed_dim)
        self.head_type = head_type
        self.prompt = Prompt(
            length=prompt_length,
            embed_dim=self.embed_dim,
            embedding_key=embedding_key,
            prompt_init=prompt_init,
            prompt_pool=True,
            prompt_key=prompt_key,
            pool_size=pool_size,
            top_k=top_k,
            batchwise_prompt=batchwise_prompt,
        )
        self.head = nn.Linear(self.embed_dim, num_classes)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "PromptedViT":
        super().train(mode)
        self.backbone.eval()  # frozen backbone: no dropout / drop-path, as the other methods
        return self

    @torch.no_grad()
    def query_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen, un-prompted pooled feature used to pick prompts (L2P's query function)."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(
        self,
        x: torch.Tensor,
        task_id: Any = -1,
        cls_features: Optional[torch.Tensor] = None,
        train: bool = False,
    ) -> dict:
        vit = self.backbone
        if cls_features is None:
            cls_features = self.query_features(x)
        tokens = vit._pos_embed(vit.patch_embed(x))
        prefix = int(vit.num_prefix_tokens)
        selected = self.prompt(tokens[:, prefix:], cls_features=cls_features)
        num_prompt = int(selected["total_prompt_len"])
        # Prompt's output is [prompts, patches]; the class (and register) tokens go back in front.
        tokens = torch.cat([tokens[:, :prefix], selected["prompted_embedding"]], dim=1)
        tokens = vit.norm_pre(vit.patch_drop(tokens)) if hasattr(vit, "patch_drop") else vit.norm_pre(tokens)
        tokens = vit.norm(vit.blocks(tokens))
        if self.head_type == "prompt":
            pooled = tokens[:, prefix : prefix + num_prompt].mean(dim=1)
        elif self.head_type == "token":
            pooled = tokens[:, 0]
        else:
            pooled = tokens[:, : prefix + num_prompt].mean(dim=1)
        return {
            "logits": self.head(pooled),
            "pre_logits": pooled,
            "reduce_sim": selected["reduce_sim"],
            "prompt_idx": selected["prompt_idx"],
        }


class _QueryFunction(nn.Module):
    """Stands in for L2P's ``original_vit``: the frozen backbone's features, in a ``{"pre_logits": ...}`` dict.

    It shares the prompted model's frozen backbone instead of holding a second copy of the weights.
    """

    def __init__(self, prompted: PromptedViT) -> None:
        super().__init__()
        self._prompted = [prompted]  # a list: not registered as a submodule, so no duplicate parameters

    def forward(self, x: torch.Tensor) -> dict:
        return {"pre_logits": self._prompted[0].query_features(x)}


class L2PCompat(LearningToPrompt):
    """Avalanche's ``LearningToPrompt`` on any timm ViT, working with timm 1.x and new-API benchmark streams.

    Args:
        backbone: a timm ``VisionTransformer`` instance (pretrained weights already loaded); it is frozen.
        num_classes: width of the single classification head (all classes of the stream).
        pool_size, prompt_length, top_k: the prompt pool (L2P paper: 10, 5, 5).
        lr: Adam learning rate of the prompts, keys and head (L2P: 0.03 x batch / 256).
        sim_coefficient: weight of the key-query similarity term in the loss.
        use_mask: train only the current experience's classes' logits (L2P's default).
        Other keyword arguments are those of ``SupervisedTemplate``.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_classes: int,
        criterion: nn.Module = nn.CrossEntropyLoss(),
        train_mb_size: int = 16,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = 16,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[Sequence[BasePlugin]] = None,
        evaluator: Any = default_evaluator,
        eval_every: int = -1,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_k: int = 5,
        lr: float = 0.03,
        sim_coefficient: float = 0.1,
        embedding_key: str = "cls",
        prompt_init: str = "uniform",
        batchwise_prompt: bool = False,
        head_type: str = "prompt",
        use_mask: bool = True,
        **kwargs: Any,
    ) -> None:
        model = PromptedViT(
            backbone,
            num_classes,
            pool_size=pool_size,
            prompt_length=prompt_length,
            top_k=top_k,
            embedding_key=embedding_key,
            prompt_init=prompt_init,
            batchwise_prompt=batchwise_prompt,
            head_type=head_type,
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, betas=(0.9, 0.999), lr=lr)
        # LearningToPrompt.__init__ is the part that fails on timm 1.x: initialise its base class directly and set
        # the attributes its forward / criterion / _before_training_exp read.
        SupervisedTemplate.__init__(
            self,
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=list(plugins or []),
            evaluator=evaluator,
            eval_every=eval_every,
            **kwargs,
        )
        self.num_classes = num_classes
        self.lr = lr
        self.sim_coefficient = sim_coefficient
        self._criterion = criterion
        self.use_cls_features = True
        self.train_prompt_mask = False
        self.use_mask = use_mask
        self.use_vit = True
        self.original_vit = _QueryFunction(model)
        self.trained_classes: set[int] = set()  # labels of the experiences trained so far (masked in at evaluation)

    def _before_training_exp(self, **kwargs: Any) -> None:
        # L2P restarts Adam at every experience; only the trainable tensors go in (the backbone never updates).
        SupervisedTemplate._before_training_exp(self, **kwargs)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, betas=(0.9, 0.999), lr=self.lr)

    def forward(self) -> torch.Tensor:
        assert self.experience is not None
        cls_features = self.original_vit(self.mb_x)["pre_logits"]
        self.res = self.model(
            x=self.mb_x, task_id=self.mb_task_id, cls_features=cls_features, train=self.train_prompt_mask
        )
        logits = self.res["logits"]
        if self.use_mask and self.is_training:
            current = torch.tensor(sorted(int(c) for c in self.experience.classes_in_this_experience))
            keep = torch.zeros(logits.shape[1], dtype=torch.bool)
            keep[current] = True
            not_mask = torch.nonzero(~keep).flatten().to(logits.device)
            logits = logits.index_fill(dim=1, index=not_mask, value=float("-inf"))
        elif not self.is_training:
            # classes no experience has trained yet keep their random initial logits: they must not be predicted
            # (the other methods' heads mask them too)
            seen = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            if self.trained_classes:
                seen[torch.tensor(sorted(self.trained_classes), device=logits.device)] = True
            logits = logits.masked_fill(~seen, -1.0e4)
        return logits

    def _after_training_exp(self, **kwargs: Any) -> None:
        self.trained_classes |= {int(c) for c in self.experience.classes_in_this_experience}
        super()._after_training_exp(**kwargs)

    def get_extra_state(self) -> dict:
        """The labels trained so far (masked in at evaluation), for an exact resume."""
        return {"trained_classes": sorted(self.trained_classes)}

    def set_extra_state(self, state: dict) -> None:
        self.trained_classes = {int(c) for c in state.get("trained_classes", [])}


def l2p_strategy(config: dict, backbone: nn.Module, info: Any, evaluator: Any, plugins: list, device: str,
                 seed: int) -> Any:
    """L2P on the same backbone as the other methods (it wraps it with a prompt pool and one head over all
    ``num_classes`` labels of the stream); its lr is the configured one (scaled: see ``scaled_lr``)."""
    from . import MethodNotApplicable, scaled_lr
    from .settings import check_plain_training
    from .finetune import common_kwargs

    check_plain_training(config)
    try:
        return L2PCompat(
            backbone=backbone,
            num_classes=info.num_classes,
            criterion=nn.CrossEntropyLoss(),
            lr=scaled_lr(config, "lr"),
            pool_size=config["l2p_pool_size"],
            prompt_length=config["l2p_prompt_length"],
            top_k=config["l2p_top_k"],
            sim_coefficient=config["l2p_sim_coefficient"],
            **common_kwargs(config, evaluator, plugins, device),
        )
    except BackboneNotSupported as err:
        raise MethodNotApplicable(str(err)) from None


__all__ = ["BackboneNotSupported", "L2PCompat", "PromptedViT", "l2p_strategy", "check_prompt_backbone"]
