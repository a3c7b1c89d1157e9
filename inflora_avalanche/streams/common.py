"""Pieces shared by the benchmark streams: errors, the paper's transforms, in-memory datasets, the stream builder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torchvision import transforms as T

from ..io import DataUnavailableError, ImageLoadError  # noqa: F401  (re-exported; io.py is torch-free)

from . import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (re-exported)


def image_transforms(
    resolution: int = 224,
    normalize: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    test_resize: str = "resize_crop",
) -> tuple[T.Compose, T.Compose]:
    """The reference's ``(train, test)`` transforms of PIL images, giving tensors with pixels in [0, 1].

    Train: ``RandomResizedCrop(resolution)`` + horizontal flip. Test: ``"resize"`` is ``Resize(resolution)`` on the
    shorter side (CIFAR-100; square images), ``"resize_crop"`` is ``Resize(resolution * 256 / 224)`` +
    ``CenterCrop(resolution)`` (ImageNet-R, DomainNet). ``normalize`` appends a mean/std normalisation (off in the paper).
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    if test_resize == "resize":
        test_ops: list = [T.Resize(resolution), T.CenterCrop(resolution)]  # the crop is a no-op on square images
    elif test_resize == "resize_crop":
        test_ops = [T.Resize(int(round(resolution * 256 / 224))), T.CenterCrop(resolution)]
    else:
        raise ValueError(f"test_resize must be 'resize' or 'resize_crop', got {test_resize!r}")
    train_ops: list = [T.RandomResizedCrop(resolution), T.RandomHorizontalFlip(), T.ToTensor()]
    test_ops.append(T.ToTensor())
    if normalize:
        norm = T.Normalize(tuple(mean), tuple(std))
        train_ops.append(norm)
        test_ops.append(norm)
    return T.Compose(train_ops), T.Compose(test_ops)


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory as one tensor ``(N, C, H, W)``, with integer ``targets``."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int]) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


@dataclass
class StreamInfo:
    """What the experiment runner needs to know about a benchmark besides its streams."""

    name: str
    num_classes: int
    n_experiences: int
    class_order: list[int]
    class_names: Optional[list[str]] = None
    train_size: int = 0
    test_size: int = 0
    extra: dict = field(default_factory=dict)
    files: list = field(default_factory=list, repr=False)  # the image files the stream reads (checked up front)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "n_experiences": self.n_experiences,
            "class_order": list(self.class_order),
            "train_size": self.train_size,
            "test_size": self.test_size,
            **self.extra,
        }


def check_class_order(class_order: Optional[Sequence[int]], num_classes: int) -> list[int]:
    """``class_order`` as a list (default ``0..num_classes-1``), checked to be a permutation of the labels."""
    if class_order is None:
        return list(range(num_classes))
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(
            f"class_order must be a permutation of 0..{num_classes - 1} ({num_classes} classes), got {len(order)} "
            "entries; leave it out for the natural order"
        )
    return order


def check_experiences(n_experiences: int, num_classes: int) -> None:
    if isinstance(n_experiences, bool) or not isinstance(n_experiences, int) or n_experiences < 1:
        raise ValueError(f"the number of experiences must be a positive integer, got {n_experiences!r}")
    if num_classes < 2:
        raise ValueError(f"the stream has {num_classes} class{'' if num_classes == 1 else 'es'}; class-incremental "
                         "learning needs at least two")
    if num_classes % n_experiences:
        raise ValueError(
            f"{num_classes} classes cannot be split evenly into {n_experiences} experiences; choose a divisor of "
            f"{num_classes}"
        )


def class_incremental_stream(
    train: Any,
    test: Any,
    n_experiences: int,
    class_order: list[int],
    train_transform: Any = None,
    eval_transform: Any = None,
):
    """An Avalanche class-incremental benchmark (no task labels) with equal-size experiences in ``class_order``."""
    from avalanche.benchmarks import nc_benchmark

    check_experiences(n_experiences, len(class_order))
    missing = set(class_order) - {int(t) for t in test.targets}
    if missing:
        raise DataUnavailableError(
            f"the test set has no samples of {len(missing)} classes (e.g. label {min(missing)}); every class needs "
            "test images"
        )
    return nc_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        task_labels=False,
        shuffle=False,
        fixed_class_order=class_order,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )


# ------------------------------------------------------------------------------------ the builders' config reading
def config_root(config: dict) -> Optional[Path]:
    """``data_root`` as a path (``None`` when unset)."""
    return Path(config["data_root"]).expanduser() if config["data_root"] else None


def config_normalization(config: dict) -> dict:
    """``resolution``, ``normalize`` and, where set, ``mean``/``std``: the keyword arguments of the image streams."""
    norm = {"resolution": config["resolution"], "normalize": config["normalize"]}
    norm.update({k: config[k] for k in ("mean", "std") if config[k] is not None})
    return norm


def config_split_manifest(config: dict) -> Optional[Path]:
    """``split_manifest`` (a split written by an earlier run) as a path, or ``None``."""
    return Path(config["split_manifest"]).expanduser() if config["split_manifest"] else None


class BatchedTensorImageDataset(TensorImageDataset):
    """``TensorImageDataset`` that also answers a whole batch of indices with one gather (``__getitems__``).

    ``torch.utils.data.DataLoader`` calls ``__getitems__`` when a dataset has it, so a loader over this dataset
    builds each minibatch with one indexing op instead of one ``__getitem__`` per sample. (Avalanche's dataset
    wrapper indexes per sample and does not use it.)
    """

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index]
        return [(images[k], self.targets[i]) for k, i in enumerate(indices)]


def batched_collate(batch):
    """Collate of ``BatchedTensorImageDataset.__getitems__`` output: one stack of images, one tensor of targets."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long)
