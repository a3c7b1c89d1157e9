"""The demo stream: scikit-learn's bundled 8x8 digits (no download), 10 classes as a class-incremental stream."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .common import StreamInfo, TensorImageDataset, check_class_order, class_incremental_stream


def split_digits(
    n_experiences: int = 5,
    resolution: int = 16,
    class_order: Optional[Sequence[int]] = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
):
    """scikit-learn's ``load_digits`` (1797 images) upsampled to ``resolution`` RGB pixels in [0, 1], split per class
    into train/test from ``split_seed``: ``(benchmark, StreamInfo)``. A smoke test of the pipeline, not a benchmark."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    targets = np.asarray(digits.target)
    rng = np.random.default_rng(split_seed)
    test_mask = np.zeros(len(targets), dtype=bool)
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        test_mask[idx[: int(round(len(idx) * test_fraction))]] = True
    train = TensorImageDataset(images[~test_mask], targets[~test_mask].tolist())
    test = TensorImageDataset(images[test_mask], targets[test_mask].tolist())
    order = check_class_order(class_order, 10)
    bench = class_incremental_stream(train, test, n_experiences, order)
    info = StreamInfo("digits", 10, n_experiences, order, [str(i) for i in range(10)], len(train), len(test),
                      extra={"resolution": resolution})
    return bench, info


def from_config(config: dict, manifest=None):
    """The registry's builder: the digits demo stream of a run's ``config``."""
    return split_digits(config["n_experiences"], config["resolution"], config["class_order"])
