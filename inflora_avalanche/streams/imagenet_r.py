"""ImageNet-R (200 classes, 30k renditions): a seeded 80/20 split of the user's ``imagenet-r/`` folder, 5/10/20 tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..io import class_folders
from .common import DataUnavailableError, config_normalization, config_root, config_split_manifest
from .folder import PathLike, folder_benchmark

IMAGENET_R_CLASSES = 200
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


def imagenet_r_help(root: PathLike) -> str:
    return (
        f"ImageNet-R not found at {root}: download {IMAGENET_R_URL}, extract it so that {root}/<wnid>/*.jpg holds "
        "the 200 class folders, and pass --data-root to that folder"
    )


def split_imagenet_r(
    root: PathLike,
    n_experiences: int = 10,
    split_seed: int = 0,
    manifest_path: Optional[PathLike] = None,
    split_manifest: Optional[PathLike] = None,
    class_order: Optional[Sequence[int]] = None,
    test_fraction: float = 0.2,
    resolution: int = 224,
    normalize: bool = False,
    expected_classes: Optional[int] = IMAGENET_R_CLASSES,
    **kwargs,
):
    """Split ImageNet-R: ``(benchmark, StreamInfo)``; the split (per class, ``test_fraction`` for test) comes from
    ``split_seed`` and is written to ``manifest_path``; the folder itself is never changed."""
    root = Path(root)
    n_folders = len(class_folders(root)) if root.is_dir() else 0
    if not n_folders:
        raise DataUnavailableError(imagenet_r_help(root))
    if n_experiences not in (5, 10, 20):
        raise ValueError(f"ImageNet-R is run with 5, 10 or 20 experiences, got {n_experiences}")
    if split_manifest is None and expected_classes is not None and n_folders != expected_classes:
        raise DataUnavailableError(
            f"{root} has {n_folders} class folders, ImageNet-R has {expected_classes}; point --data-root at "
            "the extracted imagenet-r/ folder"
        )
    bench, info = folder_benchmark(
        root, n_experiences, class_order=class_order, test_fraction=test_fraction, split_seed=split_seed,
        manifest_path=manifest_path, split_manifest=split_manifest, resolution=resolution, normalize=normalize,
        name="imagenet_r", **kwargs,
    )
    return bench, info


def from_config(config: dict, manifest: Optional[PathLike] = None):
    """The registry's builder: Split ImageNet-R of a run's ``config``, its seeded split written to ``manifest``."""
    return split_imagenet_r(config_root(config), config["n_experiences"], config["split_seed"], manifest,
                            config_split_manifest(config), config["class_order"], config["test_fraction"],
                            **config_normalization(config))
