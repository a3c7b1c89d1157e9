"""InfLoRA (Interference-Free Low-Rank Adaptation, CVPR 2024) for Avalanche.

Names are imported on first use, so that command-line tools can validate their arguments before paying for the
import of Avalanche and timm.
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "InfLoRALinear": "lora",
    "InfLoRAViT": "model",
    "WeightsUnavailableError": "backbone",
    "create_backbone": "backbone",
    "SubspaceUpdatePlugin": "plugins",
    "InfLoRAStrategy": "strategy",
    "LowRankStrategy": "strategy",
    "SDLoRAStrategy": "strategy",
    "SDLoRAViT": "sdlora",
    "SDLoRALinear": "sdlora",
    "LowRankViT": "model",
    "CovarianceAccumulator": "subspace",
    "LayerMemory": "subspace",
    "design_down_projection": "subspace",
    "energy_threshold": "subspace",
    "update_memory": "subspace",
    "ClassifierAlignmentPlugin": "alignment",
    "SubspaceDiagnosticsPlugin": "diagnostics",
    "export_timm_checkpoint": "export",
    "save_strategy": "strategy_state",
    "load_strategy": "strategy_state",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
