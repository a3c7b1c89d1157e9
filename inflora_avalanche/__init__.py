"""InfLoRA (Interference-Free Low-Rank Adaptation, CVPR 2024) for Avalanche."""

from .lora import InfLoRAQKV
from .model import InfLoRAViT, WeightsUnavailableError, create_backbone
from .plugins import SubspaceUpdatePlugin
from .strategy import InfLoRAStrategy
from .subspace import CovarianceAccumulator, LayerMemory, design_down_projection, energy_threshold, update_memory

__all__ = [
    "InfLoRAQKV",
    "InfLoRAViT",
    "InfLoRAStrategy",
    "SubspaceUpdatePlugin",
    "CovarianceAccumulator",
    "LayerMemory",
    "WeightsUnavailableError",
    "create_backbone",
    "design_down_projection",
    "energy_threshold",
    "update_memory",
]
__version__ = "0.1.0"
