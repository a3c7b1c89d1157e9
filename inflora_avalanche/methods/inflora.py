"""InfLoRA and its variants as methods of the runner: InfLoRA, InfLoRA-b5, InfLoRA+CA and sequential LoRA.

The variants differ only in their hyper-parameters (``presets/methods/<name>.json``): adapted blocks, memory kind,
optimiser, and for InfLoRA+CA a fresh final LayerNorm and the classifier-alignment plugin. Sequential LoRA is the
ablation with a random down-projection and no memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..backbone import WeightsUnavailableError
from ..model import InfLoRAViT
from ..schema import ConfigError
from . import scaled_lr


def backbone_kwargs(config: dict) -> dict:
    """``backbone_kwargs`` with the input size of the stream (unless the backbone takes any size)."""
    kwargs = dict(config["backbone_kwargs"])
    if "img_size" not in kwargs and not kwargs.get("dynamic_img_size"):
        kwargs["img_size"] = config["resolution"]
    return kwargs


@contextmanager
def model_errors(config: dict) -> Iterator[None]:
    """Turn timm's errors for a wrong name, size or weights file into one-line :class:`ConfigError`s."""
    try:
        yield
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        raise ConfigError(
            f"the weights do not fit {config['backbone']} at resolution {config['resolution']} "
            f"({str(err).splitlines()[-1].strip()[:160]}); set backbone_kwargs.dynamic_img_size=true to keep the "
            "checkpoint's position embeddings"
        ) from None
    except (TypeError, ValueError) as err:
        if isinstance(err, WeightsUnavailableError):
            raise
        raise ConfigError(f"cannot build the model: {err}") from None


def low_rank_model(model_class: type, config: dict, info: Any = None, **method_kwargs: Any) -> Any:
    """The ``LowRankViT`` subclass ``model_class`` of ``config`` for the stream ``info`` (its number of classes): timm
    backbone (local ``weights``, timm's pretrained or random), rank, adapted blocks, the adapted layers
    (``target_modules``) and rows of a fused qkv (``qkv_rows``), plus the method's own ``method_kwargs``."""
    weights = Path(config["weights"]).expanduser() if config["weights"] else None
    with model_errors(config):
        return model_class(
            config["backbone"],
            rank=config["rank"],
            adapted_blocks=config["adapted_blocks"],
            target_modules=config["target_modules"],
            qkv_rows=config["qkv_rows"],
            pretrained=bool(config["pretrained"]) and weights is None,
            checkpoint_path=weights,
            num_classes=None if info is None else info.num_classes,
            **method_kwargs,
            **backbone_kwargs(config),
        )


def build_model(config: dict, info: Any = None) -> InfLoRAViT:
    """The :class:`InfLoRAViT` of ``config`` (:func:`low_rank_model`), with the optional fresh final LayerNorm."""
    model = low_rank_model(InfLoRAViT, config, info)
    if config["reset_final_norm"]:
        reset_final_norm(model)
    return model


def reset_final_norm(model: Any) -> None:
    """Replace the backbone's final LayerNorm with a fresh, identity-initialised one (frozen, like the backbone)."""
    norm = getattr(model.backbone, "norm", None)
    if not isinstance(norm, torch.nn.LayerNorm):
        raise ConfigError(f"reset_final_norm needs a final LayerNorm at model.backbone.norm, found {type(norm).__name__}")
    weight = norm.weight if norm.weight is not None else next(model.backbone.parameters())
    fresh = torch.nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    fresh.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
    model.backbone.norm = fresh


def device_augment(config: dict) -> Any:
    """``device_augment``: the batched crop/flip/resize of uint8 CIFAR tensors on the device, else ``None``."""
    if not config["device_augment"]:
        return None
    from ..device_augment import DeviceAugment
    from ..streams.common import IMAGENET_MEAN, IMAGENET_STD

    norm = {}
    if config["normalize"]:
        norm = {"mean": config["mean"] or IMAGENET_MEAN, "std": config["std"] or IMAGENET_STD}
    return DeviceAugment(config["resolution"], **norm)


def alignment_plugins(config: dict) -> list:
    """InfLoRA+CA: the classifier-alignment plugin with the settings of ``classifier_alignment``."""
    value = config["classifier_alignment"]
    if value is None:
        return []
    from ..alignment import ClassifierAlignmentPlugin

    try:
        return [ClassifierAlignmentPlugin(**dict(value))]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid classifier_alignment settings {value!r}: {err}") from None


def low_rank_strategy_kwargs(config: dict, evaluator: Any, plugins: list, device: str) -> dict:
    """The arguments of ``config`` that every :class:`~inflora_avalanche.strategy.LowRankStrategy` takes: learning
    rates, optimiser and schedule, precision, batch sizes, epochs, device, plugins, evaluator, batched augmentation.
    ``betas`` go to an optimiser that takes them (a preset's Adam betas do not reach ``--optimizer sgd``)."""
    from ..optimizer_names import number_of_betas, takes_momentum

    # Only what the chosen optimiser and schedule read: the strategy refuses the rest, as the command line does.
    betas = config["betas"] if number_of_betas(config["optimizer"]) else None
    return dict(
        lr=scaled_lr(config, "lr"),
        optimizer=config["optimizer"],
        betas=None if betas is None else tuple(betas),
        momentum=config["momentum"] if takes_momentum(config["optimizer"]) else None,
        weight_decay=config["weight_decay"],
        head_lr=scaled_lr(config, "head_lr"),
        lr_schedule=config["lr_schedule"],
        milestones=config["milestones"],
        gamma=config["gamma"],
        warmup_epochs=config["warmup_epochs"],
        warmup_factor=config["warmup_factor"] if config["warmup_epochs"] else None,
        precision=config["precision"],
        train_mb_size=config["batch_size"],
        train_epochs=config["epochs"],
        eval_mb_size=config["eval_batch_size"] or config["batch_size"],
        device=device,
        plugins=list(plugins),
        evaluator=evaluator,
        input_transform=device_augment(config),
    )


def inflora_strategy(config: dict, model: InfLoRAViT, info: Any, evaluator: Any, plugins: list, device: str,
                     seed: int = 0) -> Any:
    """The :class:`InfLoRAStrategy` of ``config`` on ``model`` (InfLoRA, -b5 or +CA: which one is in the settings;
    ``classifier_alignment`` adds the alignment plugin)."""
    from ..strategy import InfLoRAStrategy

    try:
        return InfLoRAStrategy(
            model=model,
            lamb=config["lamb"],
            lame=config["lame"],
            memory=config["memory"],
            num_tasks=config["n_experiences"],
            **low_rank_strategy_kwargs(config, evaluator, [*plugins, *_alignment(config, plugins)], device),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid strategy settings: {err}") from None


def _aligned_heads(strategy: Any) -> list[torch.Tensor]:
    """Classifier alignment retrains every seen task's head from the second experience on."""
    from ..plugins import unwrap_model

    heads = unwrap_model(strategy.model).heads
    return [p for head in heads for p in head.parameters()] if len(heads) > 1 else []


def _alignment(config: dict, plugins: list) -> list:
    aligners = alignment_plugins(config)
    if aligners:
        for plugin in plugins:
            if hasattr(plugin, "also_updated"):  # UpdatedParameterCounter: CA retrains the old heads too
                plugin.also_updated = _aligned_heads
    return aligners


def seq_lora_strategy(config: dict, model: InfLoRAViT, info: Any, evaluator: Any, plugins: list, device: str,
                      seed: int) -> Any:
    """Sequential LoRA: InfLoRA's branches and training on a random subspace, with no memory."""
    from .seq_lora import RandomSubspacePlugin

    return inflora_strategy(config, model, info, evaluator, [RandomSubspacePlugin(seed=seed), *plugins], device)
