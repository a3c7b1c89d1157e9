"""InfLoRA (Interference-Free Low-Rank Adaptation, CVPR 2024) for Avalanche.

Names are imported on first use, so that command-line tools can validate their arguments before paying for the
import of Avalanche and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

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
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
