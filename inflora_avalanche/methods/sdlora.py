"""SD-LoRA as a method of the runner (``--method sd_lora``): the official code's model, optimiser and magnitudes on
the low-rank core; presets choose the official settings or InfLoRA's backbone and budget (``docs/sdlora.md``)."""

from __future__ import annotations

from typing import Any

from ..schema import ConfigError
from .inflora import low_rank_model, low_rank_strategy_kwargs


def build_model(config: dict, info: Any = None) -> Any:
    """The :class:`~inflora_avalanche.sdlora.SDLoRAViT` of ``config`` (:func:`~.inflora.low_rank_model`) with its
    magnitudes and, for SD-LoRA-RR, the rank-reduction schedule."""
    from ..sdlora import RANK_REDUCTION, SDLoRAViT

    return low_rank_model(SDLoRAViT, config, info, reset_magnitudes=config["reset_magnitudes"],
                          magnitude_init=config["magnitude_init"],
                          rank_schedule=RANK_REDUCTION if config["rank_reduction"] else None)


def sd_lora_strategy(config: dict, model: Any, info: Any, evaluator: Any, plugins: list, device: str,
                     seed: int = 0) -> Any:
    """The :class:`~inflora_avalanche.strategy.SDLoRAStrategy` of ``config`` on ``model``."""
    from ..strategy import SDLoRAStrategy

    try:
        return SDLoRAStrategy(model=model, **low_rank_strategy_kwargs(config, evaluator, plugins, device))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid strategy settings: {err}") from None
