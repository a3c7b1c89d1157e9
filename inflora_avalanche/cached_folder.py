"""Image-folder datasets that decode in DataLoader workers, with an optional on-disk resize cache.

Large JPEGs (ImageNet-R, DomainNet: often 500 px and more) cost most of their loading time in decoding. With a
:class:`ResizeCache`, each file is decoded once, its shorter side resized to ``size`` (aspect kept, PIL bilinear
with antialiasing) and stored as raw ``uint8`` (``.npy``); later epochs and tasks read the small array instead.

The cache changes what the transforms see: a resize to ``size`` happens before them. For the evaluation
transform ``Resize(256) + CenterCrop(224)`` a cache at 256 is exact; for ``RandomResizedCrop(224)`` small crops are
cut from the downsized image, so keep ``size`` well above the output (e.g. 384) where that matters.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .io import DataUnavailableError, atomic_write, open_rgb, scan_class_folders

PathLike = Union[str, os.PathLike]


class ResizeCache:
    """Decoded, resized images as ``.npy`` files under ``cache_dir``, keyed by path, size, mtime and file size."""

    def __init__(self, cache_dir: PathLike, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"cache size must be a positive number of pixels, got {size!r}")
        self.cache_dir = Path(cache_dir).expanduser()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.size = size

    def key(self, path: PathLike) -> Path:
        path = Path(path).resolve()
        st = path.stat()
        digest = hashlib.sha1(f"{path}|{self.size}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.npy"

    def load(self, path: PathLike) -> Image.Image:
        """The image of ``path`` with its shorter side at ``size`` (from the cache when present)."""
        entry = self.key(path)
        if entry.is_file():
            try:
                return Image.fromarray(np.load(entry))
            except (OSError, ValueError):  # a torn or foreign file: rebuild it
                pass
        img = resize_shorter(open_rgb(path), self.size)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a handle: np.save would append ".npy" to a path
                np.save(fh, np.asarray(img, dtype=np.uint8))

        # Written aside and renamed: concurrent workers never read half a file. No fsync: a lost entry is rebuilt.
        atomic_write(entry, write, fsync=False)
        return img


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size`` (like ``torchvision.transforms.Resize(size)``)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, max(1, int(size * h / w)))
    else:
        new = (max(1, int(size * w / h)), size)
    return img.resize(new, Image.BILINEAR)


class CachedImageFolder(torch.utils.data.Dataset):
    """``(path, label)`` samples decoded in the worker, optionally through a :class:`ResizeCache`.

    Torchvision-style: ``__getitem__ -> (transform(image), label)`` and a ``targets`` list, so it can back an
    Avalanche stream like ``ImageFolder`` does.
    """

    def __init__(
        self,
        samples: Sequence[tuple[PathLike, int]],
        transform: Optional[Callable[[Image.Image], Any]] = None,
        cache: Optional[ResizeCache] = None,
    ) -> None:
        self.samples = [(Path(p), int(t)) for p, t in samples]
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.cache = cache

    @classmethod
    def from_folder(
        cls, root: PathLike, transform: Optional[Callable] = None, cache: Optional[ResizeCache] = None
    ) -> "CachedImageFolder":
        """All images under ``root/<class>/`` as the streams read them; labels in sorted class-folder order."""
        try:
            classes, files = scan_class_folders(Path(root).expanduser())
        except DataUnavailableError as err:  # this class has always raised FileNotFoundError for missing images
            raise FileNotFoundError(str(err)) from None
        return cls([(f, label) for label, name in enumerate(classes) for f in files[name]], transform, cache)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        img = self.cache.load(path) if self.cache is not None else open_rgb(path)
        return (self.transform(img) if self.transform is not None else img), target
