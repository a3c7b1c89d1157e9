"""Split CIFAR-100 on Avalanche's ``SplitCIFAR100``, with the reference's 224-pixel transforms and class order 0..99."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .common import (BatchedTensorImageDataset, DataUnavailableError, StreamInfo, TensorImageDataset,
                     check_class_order, check_experiences, config_normalization, config_root, image_transforms)
from .folder import PathLike

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def cifar100_help(root: PathLike, reason: str) -> str:
    return (
        f"CIFAR-100 is not in {root} and {reason}: download {CIFAR100_URL}, extract it so that "
        f"{Path(root) / 'cifar-100-python'}/train exists, and pass --data-root {root}"
    )


def split_cifar100(
    root: PathLike,
    n_experiences: int = 10,
    class_order: Optional[Sequence[int]] = None,
    resolution: int = 224,
    normalize: bool = False,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    download: bool = True,
    device_augment: bool = False,
):
    """Split CIFAR-100: ``(benchmark, StreamInfo)``. Needs ``root/cifar-100-python/`` or (``download``) the network.

    ``device_augment``: the images stay decoded ``uint8`` tensors with no per-sample transform (DataLoader workers only
    index); pair the stream with ``device_augment.DeviceAugment`` as the strategy's ``input_transform``.
    """
    from avalanche.benchmarks.classic import SplitCIFAR100

    root = Path(root)
    check_experiences(n_experiences, 100)
    order = check_class_order(class_order, 100)
    if not (root / "cifar-100-python").is_dir() and not download:
        raise DataUnavailableError(cifar100_help(root, "downloading is switched off"))
    kwargs = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    train_tf, test_tf = image_transforms(resolution, normalize, test_resize="resize", **kwargs)
    if device_augment:
        return _uint8_split(root, n_experiences, order, download)
    try:
        bench = SplitCIFAR100(
            n_experiences, fixed_class_order=order, train_transform=train_tf, eval_transform=test_tf,
            dataset_root=root, return_task_id=False,
        )
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        # torchvision downloads when the folder is absent or fails its checksum; offline that is a URLError.
        reason = str(getattr(err, "reason", err)).splitlines()[0][:120]
        raise DataUnavailableError(cifar100_help(root, f"could not be downloaded ({reason})")) from None
    info = StreamInfo("split_cifar100", 100, n_experiences, order, train_size=50000, test_size=10000,
                      extra={"root": str(root)})
    return bench, info


def _uint8_split(root: Path, n_experiences: int, order: list[int], download: bool):
    from .common import class_incremental_stream

    if not (root / "cifar-100-python").is_dir():
        from torchvision.datasets import CIFAR100

        try:
            CIFAR100(str(root), train=True, download=True)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            reason = str(getattr(err, "reason", err)).splitlines()[0][:120]
            raise DataUnavailableError(cifar100_help(root, f"could not be downloaded ({reason})")) from None
    bench = class_incremental_stream(cifar100_uint8(root, True), cifar100_uint8(root, False), n_experiences, order)
    info = StreamInfo("split_cifar100", 100, n_experiences, order, train_size=50000, test_size=10000,
                      extra={"root": str(root), "device_augment": True})
    return bench, info


def from_config(config: dict, manifest: Optional[Path] = None):
    """The registry's builder: Split CIFAR-100 of a run's ``config`` (``data_root`` defaults to ``data/``)."""
    return split_cifar100(config_root(config) or Path("data"), config["n_experiences"], config["class_order"],
                          download=config["download"], device_augment=bool(config["device_augment"]),
                          **config_normalization(config))


def cifar100_uint8(root: Union[str, os.PathLike], train: bool = True) -> TensorImageDataset:
    """CIFAR-100 as one ``uint8`` tensor ``(N, 3, 32, 32)`` plus targets; needs ``root/cifar-100-python/``.

    Items are ``(uint8 image tensor, label)``: pair with :class:`DeviceAugment` as the strategy's
    ``input_transform`` and no per-sample transform, so DataLoader workers only index.
    """
    from torchvision.datasets import CIFAR100

    root = Path(root).expanduser()
    if not (root / "cifar-100-python").is_dir():
        raise DataUnavailableError(
            f"CIFAR-100 is not in {root}: extract cifar-100-python.tar.gz so that {root / 'cifar-100-python'} exists"
        )
    try:
        ds = CIFAR100(str(root), train=train, download=False)
    except RuntimeError as err:  # torchvision's integrity check
        raise DataUnavailableError(f"CIFAR-100 in {root} is incomplete or corrupt ({err})") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return BatchedTensorImageDataset(images, ds.targets)
