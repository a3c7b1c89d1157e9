"""Class-incremental benchmark streams: Split CIFAR-100, ImageNet-R, DomainNet, any image folder, the digits demo and a
synthetic stream, all in one registry.

:data:`REGISTRY` maps a stream's name (the ``benchmark`` setting) to a :class:`Stream`: its builder (a
``"module:function"`` of this package, imported only when the stream is built, called as
``builder(config, manifest_path) -> (benchmark, StreamInfo)``), what its data needs, its fixed class count, the
preprocessing its test images get (for the data config of an export) and the experiment script that runs it. The runner
asks the registry, never a list of names: adding a stream is a new file with its builder plus one entry here.

This module is torch-free (so ``--help`` stays fast); the streams' functions and classes (``split_cifar100``,
``StreamInfo``, ...) are imported from their modules on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..lazy import lazy_exports

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FILE_CROP_PCT = 224 / 256  # image files are resized to r * 256 / 224 and centre-cropped to r
#: Settings only some streams read (each stream's ``reads``).
STREAM_SPECIFIC = ("download", "domains", "normalize", "mean", "std")
_NORMALISED = ("normalize", "mean", "std")


@dataclass(frozen=True)
class Script:
    """An experiment script (``experiments/<file>``) whose default is this stream: its default preset, the prefix its
    short preset names drop, and the other streams it also runs."""

    file: str
    default_preset: str
    preset_prefix: str = ""
    also_accepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stream:
    """One registered stream.

    ``data_root``: ``"required"`` (``--data-root`` must name the images), ``"optional"`` (a default folder, or a
    download) or ``"unused"``; ``data``: where the data comes from and how to prepare it (``--help``);
    ``num_classes``: fixed class count (``None``: decided by the data); ``crop_pct``: the test preprocessing (timm's
    ``crop_pct``: 1.0 = resized to the input size, :data:`FILE_CROP_PCT` = resized and centre-cropped);
    ``split_manifest``: the stream splits files by a seed and writes the split to the run's folder; ``subsets``: takes
    ``--classes`` and the per-class limits; ``device_augment``: can keep uint8 tensors for ``--device-augment``;
    ``reads``: which of the stream-specific settings (:data:`STREAM_SPECIFIC`) it reads (the runner refuses the others
    when given, rather than ignore them).
    """

    name: str
    builder: str
    label: str
    data: str
    data_root: str = "unused"
    num_classes: Optional[int] = None
    crop_pct: float = 1.0
    split_manifest: bool = False
    subsets: bool = False
    device_augment: bool = False
    reads: tuple[str, ...] = ()
    script: Optional[Script] = None

    def build(self, config: dict, manifest: Any = None) -> tuple[Any, Any]:
        """``(benchmark, StreamInfo)`` of ``config``; a seeded split is written to ``manifest`` (a path) if given."""
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(config, manifest)

    def data_config(self, config: dict) -> dict:
        """The preprocessing the run's test images went through, as timm's data config (for an export): the paper's
        presets feed [0, 1] pixels without normalisation, so an export must not announce the backbone's mean/std."""
        if config["normalize"]:
            mean, std = config["mean"] or list(IMAGENET_MEAN), config["std"] or list(IMAGENET_STD)
        else:
            mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        resolution = config["resolution"]
        return {"input_size": [3, resolution, resolution], "mean": list(mean), "std": list(std),
                "crop_pct": self.crop_pct, "interpolation": "bilinear"}


REGISTRY: dict[str, Stream] = {
    s.name: s
    for s in (
        Stream("split_cifar100", "cifar:from_config", "Split CIFAR-100",
               "CIFAR-100: holds cifar-100-python/ (downloaded there unless --no-download)", data_root="optional",
               num_classes=100, device_augment=True, reads=("download", *_NORMALISED),
               script=Script("run_split_cifar.py", "cifar100_inflora", "cifar100_", also_accepts=("digits",))),
        Stream("imagenet_r", "imagenet_r:from_config", "ImageNet-R", "ImageNet-R: the 200 class folders",
               data_root="required", crop_pct=FILE_CROP_PCT, split_manifest=True, reads=_NORMALISED,
               script=Script("run_imagenet_r.py", "imagenet_r_10", also_accepts=("folder", "digits", "synthetic"))),
        Stream("domainnet", "domainnet:from_config", "DomainNet",
               "DomainNet: the domains and <domain>_train.txt lists", data_root="required", crop_pct=FILE_CROP_PCT,
               reads=("domains", *_NORMALISED),
               script=Script("run_domainnet.py", "domainnet_inflora", "domainnet_", also_accepts=("folder", "digits"))),
        Stream("folder", "folder:from_config", "image folder", "folder: root/<class>/ or root/train|val/<class>/",
               data_root="required", crop_pct=FILE_CROP_PCT, split_manifest=True, subsets=True, reads=_NORMALISED),
        Stream("digits", "digits:from_config", "digits", "scikit-learn's bundled 8x8 digits (no download)",
               num_classes=10),
        Stream("synthetic", "synthetic:from_config", "synthetic", "generated in memory (no data)", subsets=True),
    )
}
DEFAULT_STREAM = "split_cifar100"


def stream_names() -> tuple[str, ...]:
    """The registered streams' names (the choices of ``--benchmark``)."""
    return tuple(REGISTRY)


def get_stream(name: str) -> Stream:
    if name not in REGISTRY:
        raise KeyError(f"unknown stream {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def streams_where(test: Callable[[Stream], bool]) -> list[str]:
    """The names of the registered streams that pass ``test``, in registry order."""
    return [name for name, stream in REGISTRY.items() if test(stream)]


def script_of(name: str) -> Optional[Script]:
    """The experiment script that runs stream ``name``: its own, else the first that also accepts it."""
    stream = REGISTRY.get(name)
    if stream is not None and stream.script is not None:
        return stream.script
    return next((s.script for s in REGISTRY.values() if s.script and name in s.script.also_accepts), None)


def script_stream(script_default: Optional[str]) -> Optional[Stream]:
    """The stream an experiment script is the default of (``run_main(benchmark=...)``), ``None`` for ``run``."""
    stream = REGISTRY.get(script_default or "")
    return stream if stream is not None and stream.script is not None else None


# ------------------------------------------------------------------------------------------------ lazy exports
_EXPORTS = {
    "split_cifar100": "cifar",
    "DataUnavailableError": "common",
    "ImageLoadError": "common",
    "StreamInfo": "common",
    "class_incremental_stream": "common",
    "TensorImageDataset": "common",
    "image_transforms": "common",
    "split_digits": "digits",
    "DOMAINNET_DOMAINS": "domainnet",
    "split_domainnet": "domainnet",
    "ImageFileDataset": "folder",
    "folder_benchmark": "folder",
    "folder_split": "folder",
    "read_manifest": "folder",
    "scan_class_folders": "folder",
    "split_imagenet_r": "imagenet_r",
    "split_synthetic": "synthetic",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), also=(
    "IMAGENET_MEAN", "IMAGENET_STD", "REGISTRY", "STREAM_SPECIFIC", "Script", "Stream", "get_stream", "stream_names"))
