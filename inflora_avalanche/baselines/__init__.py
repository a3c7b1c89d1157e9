"""Baselines for a fair comparison with InfLoRA: every method is an Avalanche strategy on the same backbone.

``methods`` builds the strategies, ``l2p_compat`` makes Avalanche's L2P work with timm 1.x and new-API streams,
``seq_lora`` is the random-subspace ablation, ``runner`` trains and measures one method, ``table`` aggregates.
"""

from .l2p_compat import BackboneNotSupported, L2PCompat, PromptedViT
from .methods import DEFAULT_HPARAMS, METHOD_LABELS, METHODS, MethodNotApplicable, Settings, build_strategy
from .models import LinearHeadViT
from .seq_lora import RandomSubspacePlugin, random_down_projection

__all__ = [
    "BackboneNotSupported",
    "DEFAULT_HPARAMS",
    "L2PCompat",
    "LinearHeadViT",
    "METHODS",
    "METHOD_LABELS",
    "MethodNotApplicable",
    "PromptedViT",
    "RandomSubspacePlugin",
    "Settings",
    "build_strategy",
    "random_down_projection",
]
