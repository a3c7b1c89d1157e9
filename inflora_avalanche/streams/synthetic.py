"""A synthetic class-incremental stream for smoke tests and method comparisons without data: per class a fixed
smooth random pattern, each sample that pattern plus noise (learnable, not trivial)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .common import StreamInfo, TensorImageDataset, check_class_order, check_experiences, class_incremental_stream

SYNTHETIC_TRAIN, SYNTHETIC_TEST = 16, 8  # images per class unless limited


def split_synthetic(
    n_experiences: int = 2,
    num_classes: Optional[int] = None,
    resolution: int = 32,
    class_order: Optional[Sequence[int]] = None,
    train_per_class: Optional[int] = None,
    test_per_class: Optional[int] = None,
):
    """``num_classes`` (default two per experience) classes of ``resolution``-pixel images: ``(benchmark, info)``."""
    num_classes = num_classes or 2 * n_experiences
    check_experiences(n_experiences, num_classes)
    gen = torch.Generator().manual_seed(1234)
    low = torch.randn(num_classes, 3, 4, 4, generator=gen)
    prototypes = F.interpolate(low, size=(resolution, resolution), mode="bilinear", align_corners=False)

    def sample(per_class: int) -> TensorImageDataset:
        images = prototypes.repeat_interleave(per_class, dim=0)
        images = images + torch.randn(images.shape, generator=gen)
        labels = [c for c in range(num_classes) for _ in range(per_class)]
        return TensorImageDataset(images.contiguous(), labels)

    train, test = sample(train_per_class or SYNTHETIC_TRAIN), sample(test_per_class or SYNTHETIC_TEST)
    order = check_class_order(class_order, num_classes)
    bench = class_incremental_stream(train, test, n_experiences, order)
    info = StreamInfo("synthetic", num_classes, n_experiences, order, [f"class{c}" for c in range(num_classes)],
                      len(train), len(test), extra={"resolution": resolution})
    return bench, info


def from_config(config: dict, manifest=None):
    """The registry's builder: the synthetic stream of a run's ``config``."""
    return split_synthetic(config["n_experiences"], config["classes"], config["resolution"], config["class_order"],
                           config["max_train_per_class"], config["max_test_per_class"])
