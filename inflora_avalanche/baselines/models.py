"""Models of the non-InfLoRA baselines: a timm backbone under one class-incremental linear head."""

from __future__ import annotations

from typing import Any

import torch
from avalanche.models import IncrementalClassifier
from torch import nn


class LinearHeadViT(nn.Module):
    """A timm backbone (pooled pre-logits feature) followed by Avalanche's ``IncrementalClassifier``.

    The head is created at the full width of the stream (``num_classes``) with masking on: a class's logit is
    ``-1000`` until an experience with that class has been trained, so evaluation on any experience is well
    defined and all baselines share exactly the same head. With ``freeze_backbone`` only the head trains (the
    linear probe) and the backbone runs in eval mode.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, freeze_backbone: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)
        self.backbone = backbone
        self.feature_dim = int(getattr(backbone, "num_features", getattr(backbone, "embed_dim", 0)))
        if self.feature_dim < 1:
            raise ValueError(f"cannot tell the feature width of backbone {type(backbone).__name__}")
        self.frozen_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.head = IncrementalClassifier(self.feature_dim, initial_out_features=num_classes, masking=True)

    def train(self, mode: bool = True) -> "LinearHeadViT":
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.frozen_backbone:
            with torch.no_grad():
                features = self.backbone(x)
        else:
            features = self.backbone(x)
        return self.head(features)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]
