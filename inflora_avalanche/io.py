"""Files in and out: the package's one atomic write and its one reader of image folders.

Torch-free (PIL is imported on first decode), so that command-line checks and small tools can use it cheaply.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

# Compared lower-cased: ``.JPEG`` (Tiny-ImageNet), ``.jpg`` (ImageNet-R, DomainNet) and ``.PNG`` are all images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class DataUnavailableError(ValueError):
    """A data set is missing or incomplete; the message says where to put it."""


class ImageLoadError(ValueError):
    """An image file listed in a data set cannot be read; the message names the file."""


# ------------------------------------------------------------------------------------------------- atomic writes
def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (setting it, even for a moment, would race
    with other threads creating files: TensorBoard writers, DataLoader threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # elsewhere the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], None], fsync: bool = True) -> None:
    """Create ``path`` by ``write(temporary path)`` in the same folder and a rename, so that a crash or an error
    leaves the old file (or none) whole, never half a file; the temporary file is removed on failure.

    The file gets the permissions a plain ``open`` would give (``0o666`` less the umask; ``mkstemp`` makes ``0600``).
    ``fsync`` flushes the data to disk before the rename (so a power cut cannot leave an empty file under the new
    name); a cache that can be rebuilt may skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """``text`` at ``path`` (UTF-8, line ends as given), atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    atomic_write(path, write)


def atomic_write_json(path: PathLike, data: Any, indent: int = 2) -> None:
    """``data`` as JSON text (ending in a newline) at ``path``, atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


# ------------------------------------------------------------------------------------------------- image folders
def is_image_file(path: Path) -> bool:
    """An image by its extension (any case); hidden files (``.DS_Store``, ``._x.jpg`` of macOS) are not."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: PathLike, recursive: bool = True) -> list[str]:
    """The image files in ``folder`` (and its subfolders when ``recursive``), as paths sorted by name; none for a
    missing folder (callers say what they expected).

    Read with ``os.scandir``, whose entries know their type without a ``stat`` per file on local file systems, and
    sorted as strings: ``Path.rglob`` with ``is_file`` took 0.3-0.7 s for the 25,000 files of Tiny-ImageNet-100
    against 0.04 s for torchvision's ``ImageFolder`` (``benchmarks/folder_scan.py``). As ``rglob`` did, a symlinked
    file counts and a symlinked subfolder is not entered (no loops); the paths are the same strings, in the same order,
    so that splits and manifests do not change."""
    found: list[str] = []
    pending = [str(Path(folder))]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if recursive and entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif (entry.name[entry.name.rfind("."):].lower() in IMAGE_EXTENSIONS
                          and not entry.name.startswith(".") and entry.is_file()):
                        found.append(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            continue
    found.sort()
    return found


def class_folders(root: PathLike) -> list[Path]:
    """The class folders ``root/<class>/`` sorted by name; hidden folders (``.git``, ``.cache``) are not classes."""
    return sorted((p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def scan_class_folders(root: PathLike) -> tuple[list[str], dict[str, list[str]]]:
    """Class names (sorted folder names) and, per class, its image files (sorted paths, subfolders included) under
    ``root/<class>/``. Raises :class:`DataUnavailableError` for a missing root, no class folders, or an empty class
    (a class without images would break the label range silently)."""
    root = Path(root)
    if not root.is_dir():
        raise DataUnavailableError(f"image folder {root} does not exist")
    folders = class_folders(root)
    if not folders:
        raise DataUnavailableError(f"{root} has no class subfolders; expected the layout {root}/<class>/<image>")
    files: dict[str, list[str]] = {}
    for folder in folders:
        images = list_images(folder)
        if not images:
            others = sorted(p.name for p in folder.iterdir())
            holds = f"it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}" if others else "it is empty"
            raise DataUnavailableError(
                f"class folder {folder} has no image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...; {holds}); put "
                "images in it or remove it"
            )
        files[folder.name] = images
    return [f.name for f in folders], files


#: What to do about a file that cannot be read, in every message that names one: deleting it would change the
#: stream (its train/test sizes), and ``--resume`` refuses a checkpoint of another stream.
REPLACE_ADVICE = ("replace it with a readable image under the same name (deleting it changes the train/test split, "
                  "which --resume of a run on this data refuses)")


def _as_rgb(img):
    """``img`` in RGB (an alpha channel is dropped). 16- and 32-bit grayscale (``I;16``, ``I``) are scaled from 16
    bits to 8 first: PIL's own conversion clips them at 255, which turns most of a 16-bit image white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        from PIL import Image

        img = Image.eval(img.convert("I"), lambda v: v / 256).convert("L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what PIL asks for (with a warning per image) before such a palette goes to RGB
    return img.convert("RGB")


def open_rgb(path: PathLike):
    """The image at ``path`` as a fully decoded RGB PIL image, whatever its mode (grayscale, RGBA, palette, CMYK,
    16-bit); an unreadable file raises :class:`ImageLoadError` naming it, so that one bad file among thousands can
    be found (also from DataLoader workers)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return _as_rgb(img)  # also forces the full decode, so truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"cannot read image {path} ({type(err).__name__}: {err}); {REPLACE_ADVICE}") from None


def unreadable_images(paths: Sequence[PathLike], workers: int = 8) -> list[str]:
    """``"path (reason)"`` for every file in ``paths`` that is missing or cannot be decoded, in the order of
    ``paths``; checked in threads (PIL decodes without holding the GIL).

    Every file is decoded to its last pixel, so that a truncated or corrupt file stops the run before its first
    experience rather than when its experience is reached (reading the header alone missed those). A JPEG is decoded
    at 1/8 scale (``draft``): the whole compressed stream is still read and checked, without the inverse DCT at full
    size, which is 3x faster for 500 x 375 images (0.43 ms against 1.3 ms each on the 2-core test machine);
    ``benchmarks/folder_scan.py`` measures the check on a real folder."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def problem(path: PathLike) -> Optional[str]:
        try:
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
                img.load()
            return None
        except FileNotFoundError:
            return f"{path} (missing)"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return f"{path} ({type(err).__name__}: {' '.join(str(err).split())[:80]})"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [p for p in pool.map(problem, paths) if p is not None]
