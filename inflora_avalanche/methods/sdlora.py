"""SD-LoRA as a method of the runner (``--method sd_lora``): the official code's model, optimiser and magnitudes on
the low-rank core; presets choose the official settings or InfLoRA's backbone and budget (``docs/sdlora.md``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..schema import ConfigError
from .inflora import backbone_kwargs, low_rank_strategy_kwargs, model_errors


def build_model(config: dict, info: Any = None) -> Any:
    """The :class:`~inflora_avalanche.sdlora.SDLoRAViT` of ``config``: timm backbone (local ``weights``, timm's
    pretrained or random), rank (or the rank-reduction schedule), adapted blocks and layers, magnitudes."""
    from ..sdlora import RANK_REDUCTION, SDLoRAViT

    weights = Path(config["weights"]).expanduser() if config["weights"] else None
    with model_errors(config):
        return SDLoRAViT(
            config["backbone"],
            rank=config["rank"],
            adapted_blocks=config["adapted_blocks"],
            target_modules=config["target_modules"],
            qkv_rows=config["qkv_rows"],
            reset_magnitudes=config["reset_magnitudes"],
            magnitude_init=config["magnitude_init"],
            rank_schedule=RANK_REDUCTION if config["rank_reduction"] else None,
            pretrained=bool(config["pretrained"]) and weights is None,
            checkpoint_path=weights,
            num_classes=None if info is None else info.num_classes,
            **backbone_kwargs(config),
        )


def sd_lora_strategy(config: dict, model: Any, info: Any, evaluator: Any, plugins: list, device: str,
                     seed: int = 0) -> Any:
    """The :class:`~inflora_avalanche.strategy.SDLoRAStrategy` of ``config`` on ``model``."""
    from ..strategy import SDLoRAStrategy

    try:
        return SDLoRAStrategy(model=model, **low_rank_strategy_kwargs(config, evaluator, plugins, device))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid strategy settings: {err}") from None
