"""Class-incremental streams for the comparison.

``benchmark="memory"`` (CPU budgets): synthetic blobs (tests, smoke runs) or an image folder, decoded, resized and
normalised once into memory, so every method sees identical tensors and the timings measure training rather than
JPEG decoding. ``"cifar100"`` and ``"imagenet-r"`` (the paper's settings, on a GPU) are the project's own lazy
streams from :mod:`inflora_avalanche.benchmarks`, with the paper's transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark

from ..benchmarks.common import IMAGENET_MEAN, IMAGENET_STD, TensorImageDataset

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 16, 8  # images per class of the synthetic stream unless limited


class StreamDataError(ValueError):
    """The requested stream cannot be built from the given data."""


BENCHMARKS = ("memory", "cifar100", "imagenet-r")


@dataclass(frozen=True)
class StreamConfig:
    """What stream to build. ``benchmark="memory"`` with ``root=None`` gives the synthetic stream.

    ``classes_per_experience`` only applies to ``"memory"`` (CIFAR-100 and ImageNet-R split all their classes);
    ``normalize=None`` means ImageNet mean/std for ``"memory"`` and none (the paper's [0, 1] pixels) otherwise.
    """

    num_experiences: int = 2
    classes_per_experience: int = 2
    max_train_per_class: Optional[int] = None
    max_test_per_class: Optional[int] = None
    resolution: int = 32
    root: Optional[str] = None
    normalize: Optional[bool] = None
    benchmark: str = "memory"

    @property
    def num_classes(self) -> int:
        if self.benchmark == "cifar100":
            return 100
        if self.benchmark == "imagenet-r":
            return 200
        return self.num_experiences * self.classes_per_experience

    @property
    def normalized(self) -> bool:
        return (self.benchmark == "memory") if self.normalize is None else self.normalize

    def describe(self) -> str:
        if self.benchmark != "memory":
            return (
                f"{self.benchmark} ({self.root}): {self.num_experiences} experiences x "
                f"{self.num_classes // self.num_experiences} classes, {self.resolution}px"
                + (", ImageNet mean/std" if self.normalized else ", pixels in [0, 1]")
            )
        if self.root is None:
            source = "synthetic"
            train, test = self.max_train_per_class or SYNTHETIC_TRAIN, self.max_test_per_class or SYNTHETIC_TEST
        else:
            source = Path(self.root).name
            train, test = self.max_train_per_class or "all", self.max_test_per_class or "all"
        return (
            f"{source}: {self.num_experiences} experiences x {self.classes_per_experience} classes, "
            f"{train} train / {test} test images per class, {self.resolution}px"
        )


def build_stream(config: StreamConfig) -> Any:
    """The Avalanche benchmark (``train_stream``, ``test_stream``) ``config`` describes; class order 0..C-1."""
    if config.benchmark not in BENCHMARKS:
        raise StreamDataError(f"benchmark must be one of {', '.join(BENCHMARKS)}, got {config.benchmark!r}")
    if config.num_experiences < 1 or config.classes_per_experience < 1:
        raise StreamDataError("num_experiences and classes_per_experience must be >= 1")
    if config.benchmark != "memory":
        return _paper_stream(config)
    if config.root is None:
        train, test = _synthetic(config)
    else:
        train, test = _folder(config)
    return class_incremental_benchmark(
        {"train": train, "test": test},
        class_order=list(range(config.num_classes)),
        num_experiences=config.num_experiences,
    )


def _paper_stream(config: StreamConfig) -> Any:
    from ..benchmarks import DataUnavailableError, split_cifar100, split_imagenet_r

    if config.root is None:
        raise StreamDataError(f"the {config.benchmark} benchmark needs --data (its dataset folder)")
    try:
        if config.benchmark == "cifar100":
            if config.max_train_per_class or config.max_test_per_class:
                raise StreamDataError("cifar100 uses the whole dataset; drop --max-train/test-per-class")
            bench, _ = split_cifar100(config.root, config.num_experiences, resolution=config.resolution,
                                      normalize=config.normalized, download=False)
        else:
            bench, _ = split_imagenet_r(config.root, config.num_experiences, resolution=config.resolution,
                                        normalize=config.normalized, max_train_per_class=config.max_train_per_class,
                                        max_test_per_class=config.max_test_per_class)
    except DataUnavailableError as err:
        raise StreamDataError(str(err)) from None
    return bench


def _synthetic(config: StreamConfig) -> tuple[TensorImageDataset, TensorImageDataset]:
    """Per class a fixed smooth random pattern; samples are that pattern plus noise (learnable, not trivial)."""
    gen = torch.Generator().manual_seed(1234)
    res = config.resolution
    low = torch.randn(config.num_classes, 3, 4, 4, generator=gen)
    prototypes = F.interpolate(low, size=(res, res), mode="bilinear", align_corners=False)

    def sample(per_class: int) -> TensorImageDataset:
        images = prototypes.repeat_interleave(per_class, dim=0)
        images = images + 1.0 * torch.randn(images.shape, generator=gen)
        labels = [c for c in range(config.num_classes) for _ in range(per_class)]
        return TensorImageDataset(images.contiguous(), labels)

    return sample(config.max_train_per_class or SYNTHETIC_TRAIN), sample(config.max_test_per_class or SYNTHETIC_TEST)


def _folder(config: StreamConfig) -> tuple[TensorImageDataset, TensorImageDataset]:
    root = Path(config.root).expanduser()
    train_dir, test_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not test_dir.is_dir():
        raise StreamDataError(f"{root} must contain train/<class>/ and val/<class>/ image folders")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if len(classes) < config.num_classes:
        raise StreamDataError(
            f"{root} has {len(classes)} classes but {config.num_experiences} x {config.classes_per_experience} "
            f"= {config.num_classes} are needed; lower --num-experiences or --classes-per-experience"
        )
    classes = classes[: config.num_classes]
    return (
        _load_split(train_dir, classes, config.max_train_per_class, config),
        _load_split(test_dir, classes, config.max_test_per_class, config),
    )


def _load_split(split_dir: Path, classes: list[str], limit: Optional[int], config: StreamConfig) -> TensorImageDataset:
    from PIL import Image

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise StreamDataError(f"no images in {folder}")
        for path in files[:limit]:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
                pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
                tensor = pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float().div_(255.0)
            images.append(
                F.interpolate(tensor[None], size=(config.resolution,) * 2, mode="bilinear", antialias=True,
                              align_corners=False)[0]
            )
            labels.append(label)
    batch = torch.stack(images).clamp_(0.0, 1.0)
    if config.normalized:
        batch = (batch - mean) / std
    return TensorImageDataset(batch, labels)
