"""Class-incremental streams from image folders: ``root/<class>/*`` (split by a seed) or ``root/{train,val}/<class>/*``.

The user's folder is only read. A seeded split is written as a JSON manifest (relative paths and labels) wherever the
caller says, so that a run can be reproduced or audited; the same seed always gives the same split.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..io import IMAGE_EXTENSIONS, atomic_write_text, open_rgb, scan_class_folders  # noqa: F401  (re-exported)
from .common import (
    DataUnavailableError,
    StreamInfo,
    check_class_order,
    class_incremental_stream,
    config_normalization,
    config_root,
    config_split_manifest,
    image_transforms,
)

TEST_FOLDER_NAMES = ("val", "test")
MANIFEST_FORMAT = "inflora-avalanche split manifest v1"
PathLike = Union[str, os.PathLike]
Sample = tuple[str, int]


class ImageFileDataset(torch.utils.data.Dataset):
    """Images read lazily from files; ``samples`` are ``(path, label)``. Returns RGB PIL images and labels.

    A file that cannot be decoded raises :class:`ImageLoadError` naming it (also from DataLoader workers).
    """

    def __init__(self, samples: Sequence[Sample], classes: Optional[Sequence[str]] = None) -> None:
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return open_rgb(path), label


def detect_layout(root: PathLike) -> Optional[tuple[Path, Path]]:
    """``(train_dir, test_dir)`` when ``root`` has ``train/`` and ``val/`` (or ``test/``) subfolders, else ``None``.

    Half of that layout (``train/`` without ``val/``, or the reverse) is refused: read as class folders it would
    become a class named "train"."""
    root = Path(root)
    train = root / "train"
    tests = [root / name for name in TEST_FOLDER_NAMES if (root / name).is_dir()]
    if train.is_dir() and tests:
        return train, tests[0]
    if train.is_dir() or tests:
        have = "train/" if train.is_dir() else f"{tests[0].name}/"
        raise DataUnavailableError(
            f"{root} has {have} but not {'val/ (or test/)' if train.is_dir() else 'train/'}: give both "
            f"{root}/train/<class>/ and {root}/val/<class>/, or put the class folders directly in {root}")
    return None


def _class_seed(seed: int, class_name: str) -> list[int]:
    # A per-class stream: a class's split depends only on the seed and its own files, not on which other classes exist.
    return [int(seed), zlib.crc32(class_name.encode("utf-8"))]


def split_files(files: Sequence[str], test_fraction: float, seed: int, class_name: str) -> tuple[list[str], list[str]]:
    """A seeded train/test split of one class's files (at least one file on each side)."""
    if len(files) < 2:
        raise DataUnavailableError(f"class {class_name!r} has {len(files)} image(s); a train/test split needs at least 2")
    order = np.random.default_rng(_class_seed(seed, class_name)).permutation(len(files))
    n_test = min(len(files) - 1, max(1, int(round(len(files) * test_fraction))))
    test_idx = set(order[:n_test].tolist())
    train = [f for i, f in enumerate(files) if i not in test_idx]
    test = [f for i, f in enumerate(files) if i in test_idx]
    return train, test


def _select_classes(classes: list[str], selection: Union[None, int, Sequence[str]]) -> list[str]:
    if selection is None:
        return classes
    if isinstance(selection, int) and not isinstance(selection, bool):
        if not 1 <= selection <= len(classes):
            raise ValueError(f"classes={selection} must be between 1 and the {len(classes)} classes in the folder")
        return classes[:selection]
    unknown = [c for c in selection if c not in classes]
    if unknown:
        raise ValueError(f"classes {unknown[:5]} are not folders of the data set")
    return [c for c in classes if c in set(selection)]


def write_manifest(path: PathLike, root: Path, classes: list[str], train: list[Sample], test: list[Sample], **info: Any) -> None:
    """Write a split as JSON: paths relative to ``root``, labels, and how the split was made; one sample a line.

    Paths under ``root`` lose its prefix by string slicing and each sample is encoded alone: ``os.path.relpath`` per
    file and ``json.dumps(indent=...)`` (Python's slow encoder) took 0.8 s of the 0.95 s the folder stream of
    Tiny-ImageNet-100 spent before its first image (``benchmarks/folder_scan.py``)."""
    prefix = os.path.join(str(root), "")

    def relative(file: str) -> str:
        return file[len(prefix):] if file.startswith(prefix) else os.path.relpath(file, root)

    def samples(items: list[Sample]) -> str:
        return ",\n".join(json.dumps([relative(p), y]) for p, y in items)

    head = {"format": MANIFEST_FORMAT, "root": str(root.resolve()), **info, "classes": classes}
    text = (json.dumps(head, indent=1)[:-2]
            + f',\n "train": [\n{samples(train)}\n ],\n "test": [\n{samples(test)}\n ]\n}}\n')
    atomic_write_text(path, text)


def read_manifest(path: PathLike, root: Optional[PathLike] = None) -> tuple[list[str], list[Sample], list[Sample], dict]:
    """``(classes, train, test, info)`` from a manifest; paths are resolved against ``root`` (default: the manifest's)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataUnavailableError(f"cannot read split manifest {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a split manifest written by inflora-avalanche ({MANIFEST_FORMAT!r})")
    base = Path(root) if root is not None else Path(data["root"])
    absolute = lambda items: [(str(base / p), int(y)) for p, y in items]  # noqa: E731
    info = {k: v for k, v in data.items() if k not in ("classes", "train", "test")}
    return list(data["classes"]), absolute(data["train"]), absolute(data["test"]), info


def check_files_exist(samples: Sequence[Sample], what: str) -> None:
    """Raise :class:`DataUnavailableError` naming the first missing files, if any."""
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3])
        raise DataUnavailableError(f"{len(missing)} image file(s) of the {what} are missing, e.g. {shown}")


def _limit(samples_per_class: dict[str, list[str]], limit: Optional[int]) -> dict[str, list[str]]:
    if limit is None:
        return samples_per_class
    if limit < 1:
        raise ValueError(f"per-class sample limits must be >= 1, got {limit}")
    return {c: files[:limit] for c, files in samples_per_class.items()}


def folder_split(
    root: PathLike,
    classes: Union[None, int, Sequence[str]] = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    manifest_path: Optional[PathLike] = None,
    max_train_per_class: Optional[int] = None,
    max_test_per_class: Optional[int] = None,
) -> tuple[list[str], list[Sample], list[Sample], dict]:
    """The samples of an image folder: ``(class_names, train, test, info)`` with labels ``0..C-1`` in name order.

    ``root/train/<class>`` + ``root/val/<class>`` (or ``test/``) is used as given; a plain ``root/<class>`` folder is
    split per class with ``test_fraction`` of each class's images as test data, from ``split_seed``; the split is
    written to ``manifest_path`` (if given). ``classes`` keeps the first N classes (name order) or the named ones.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataUnavailableError(f"data folder {root} is a file, not a folder; point --data-root at the folder that "
                                   "holds the images")
    if not root.is_dir():
        raise DataUnavailableError(f"data folder {root} does not exist")
    layout = detect_layout(root)
    if layout is not None:
        train_dir, test_dir = layout
        names, train_files = scan_class_folders(train_dir)
        test_names, test_files = scan_class_folders(test_dir)
        extra = sorted(set(test_names) - set(names))
        if extra:
            raise DataUnavailableError(f"{test_dir} has classes not in {train_dir}: {extra[:5]}")
        names = _select_classes(names, classes)
        info = {"layout": "train/test folders", "train_dir": str(train_dir), "test_dir": str(test_dir)}
        train_per_class = {c: train_files[c] for c in names}
        test_per_class = {c: test_files.get(c, []) for c in names}
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        names, files = scan_class_folders(root)
        names = _select_classes(names, classes)
        train_per_class, test_per_class = {}, {}
        for c in names:
            train_per_class[c], test_per_class[c] = split_files(files[c], test_fraction, split_seed, c)
        info = {"layout": "class folders, seeded split", "split_seed": int(split_seed), "test_fraction": test_fraction}
    train_per_class = _limit(train_per_class, max_train_per_class)
    test_per_class = _limit(test_per_class, max_test_per_class)
    train = [(f, i) for i, c in enumerate(names) for f in train_per_class[c]]
    test = [(f, i) for i, c in enumerate(names) for f in test_per_class[c]]
    if manifest_path is not None:
        write_manifest(manifest_path, root, names, train, test, **info)
        info["manifest"] = str(manifest_path)
    return names, train, test, info


def samples_benchmark(
    name: str,
    class_names: list[str],
    train: list[Sample],
    test: list[Sample],
    n_experiences: int,
    class_order: Optional[Sequence[int]] = None,
    resolution: int = 224,
    normalize: bool = False,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    info: Optional[dict] = None,
):
    """``(benchmark, StreamInfo)`` of a class-incremental stream over image files with the paper's transforms."""
    order = check_class_order(class_order, len(class_names))
    kwargs = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    train_tf, test_tf = image_transforms(resolution, normalize, test_resize="resize_crop", **kwargs)
    train_ds = ImageFileDataset(train, class_names)
    test_ds = ImageFileDataset(test, class_names)
    bench = class_incremental_stream(train_ds, test_ds, n_experiences, order, train_tf, test_tf)
    stream_info = StreamInfo(
        name=name,
        num_classes=len(class_names),
        n_experiences=n_experiences,
        class_order=order,
        class_names=class_names,
        train_size=len(train_ds),
        test_size=len(test_ds),
        extra=dict(info or {}),
        files=[path for path, _ in (*train, *test)],
    )
    return bench, stream_info


def folder_benchmark(
    root: PathLike,
    n_experiences: int,
    classes: Union[None, int, Sequence[str]] = None,
    class_order: Optional[Sequence[int]] = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    manifest_path: Optional[PathLike] = None,
    split_manifest: Optional[PathLike] = None,
    max_train_per_class: Optional[int] = None,
    max_test_per_class: Optional[int] = None,
    resolution: int = 224,
    normalize: bool = False,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    name: str = "folder",
):
    """A class-incremental stream from any image folder (see :func:`folder_split`): ``(benchmark, StreamInfo)``.

    ``split_manifest`` reuses a split written earlier instead of scanning the folder.
    """
    if split_manifest is not None:
        names, train, test, info = read_manifest(split_manifest, root)
        check_files_exist(train + test, f"split manifest {split_manifest}")
        info = {**info, "manifest": str(split_manifest)}
    else:
        names, train, test, info = folder_split(
            root, classes, test_fraction, split_seed, manifest_path, max_train_per_class, max_test_per_class
        )
    return samples_benchmark(name, names, train, test, n_experiences, class_order, resolution, normalize, mean, std,
                             {"root": str(root), **info})


def from_config(config: dict, manifest: Optional[PathLike] = None):
    """The registry's builder: the image folder of a run's ``config``, its seeded split written to ``manifest``."""
    return folder_benchmark(config_root(config), config["n_experiences"], config["classes"], config["class_order"],
                            config["test_fraction"], config["split_seed"], manifest, config_split_manifest(config),
                            config["max_train_per_class"], config["max_test_per_class"],
                            **config_normalization(config))
