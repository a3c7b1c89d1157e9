"""The one atomic write and the one image-folder reader (inflora_avalanche.io) and the places that use them."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inflora_avalanche import io
from inflora_avalanche.io import (
    IMAGE_EXTENSIONS,
    DataUnavailableError,
    ImageLoadError,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    list_images,
    open_rgb,
    scan_class_folders,
)

ROOT = Path(__file__).resolve().parents[1]


def _image(path: Path, value: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (5, 4), (value % 256, 2 * value % 256, 3 * value % 256)).save(path, format=fmt)
    return path


def _load(script: Path):
    spec = importlib.util.spec_from_file_location(script.stem + "_io_test", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------------- atomic writes
def test_failed_write_leaves_the_old_file_whole_and_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old content")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text("half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old content"
    assert _leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(KeyboardInterrupt):  # an interrupt cleans up too
        atomic_write(path, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert path.read_text() == "old content" and _leftovers(tmp_path) == []


def test_write_replaces_creates_folders_and_applies_the_umask(tmp_path):
    path = tmp_path / "new" / "sub" / "a.txt"
    old = os.umask(0o027)
    try:
        atomic_write_text(path, "x\r\ny\n")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"x\r\ny\n"  # written as given, no newline translation
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the umask, not mkstemp's 0o600
    old = os.umask(0o022)
    try:
        atomic_write_json(path, {"a": [1, 2]})
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"a": [1, 2]} and path.read_text().endswith("\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _leftovers(path.parent) == []


def test_writers_that_need_a_path_get_one_in_the_same_folder(tmp_path):
    seen = []
    atomic_write(str(tmp_path / "x.bin"), lambda tmp: (seen.append(Path(tmp)), Path(tmp).write_bytes(b"1")))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".x.bin.")
    assert (tmp_path / "x.bin").read_bytes() == b"1" and not seen[0].exists()


def test_package_writers_use_the_one_atomic_write(tmp_path, monkeypatch):
    """Checkpoints, results JSON and split manifests all go through io.atomic_write."""
    import torch

    from inflora_avalanche import checkpoint, export
    from inflora_avalanche.run import output
    from inflora_avalanche.streams import folder

    assert export.atomic_write is io.atomic_write  # still importable from export
    calls = []
    real = io.atomic_write

    def spy(path, write, fsync=True):
        calls.append(Path(path).name)
        real(path, write, fsync)

    for module in (io, checkpoint):
        monkeypatch.setattr(module, "atomic_write", spy)
    checkpoint.save_checkpoint(tmp_path / "checkpoint.safetensors", {"t": torch.ones(2)})
    output.write_json(tmp_path / "results.json", {"a": 1})
    folder.write_manifest(tmp_path / "split.json", tmp_path, ["c"], [(str(tmp_path / "c" / "1.png"), 0)], [])
    assert calls == ["checkpoint.safetensors", "results.json", "split.json"]
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.safetensors")["t"].tolist() == [1.0, 1.0]
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- image folders
def test_one_case_insensitive_extension_list():
    assert len(set(IMAGE_EXTENSIONS)) == len(IMAGE_EXTENSIONS)
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    for name in ("a.jpg", "a.JPG", "a.JPEG", "a.jpeg", "a.png", "a.PNG", "a.webp", "a.WebP", "a.bmp", "a.tiff"):
        assert io.is_image_file(Path(name)), name
    for name in ("a.txt", "a.npy", "a", ".hidden.jpg", "a.jpg.part"):
        assert not io.is_image_file(Path(name)), name


def _mixed_folder(root: Path) -> Path:
    """Two classes with every kind of entry: Tiny-ImageNet's .JPEG, .webp, upper-case .PNG, a subfolder, noise."""
    _image(root / "n01" / "n01_0.JPEG", 1, "JPEG")
    _image(root / "n01" / "n01_1.webp", 2, "WEBP")
    _image(root / "n01" / "deeper" / "x.PNG", 3, "PNG")
    (root / "n01" / "boxes.txt").write_text("not an image")
    (root / "n01" / "._n01_0.JPEG").write_bytes(b"macOS metadata")
    (root / "n01" / "folder.jpg").mkdir()  # a folder named like an image is not one
    _image(root / "n02" / "b.jpg", 4)
    _image(root / "n02" / "a.Jpeg", 5, "JPEG")
    (root / ".cache").mkdir()
    _image(root / ".cache" / "c.jpg", 6)
    return root


def test_list_images_and_scan_class_folders_agree(tmp_path):
    root = _mixed_folder(tmp_path / "data")
    names, files = scan_class_folders(root)
    assert names == ["n01", "n02"]  # hidden folders are not classes
    assert [Path(f).relative_to(root).as_posix() for f in files["n01"]] == [
        "n01/deeper/x.PNG", "n01/n01_0.JPEG", "n01/n01_1.webp"]
    assert [Path(f).name for f in files["n02"]] == ["a.Jpeg", "b.jpg"]
    assert files == {n: list_images(root / n) for n in names}
    assert [Path(f).name for f in list_images(root / "n01", recursive=False)] == ["n01_0.JPEG", "n01_1.webp"]
    assert list_images(root / "missing") == []
    assert all(open_rgb(f).mode == "RGB" for n in names for f in files[n])


def test_every_reader_reads_the_same_files(tmp_path):
    """The folder streams and the scripts' loaders list the same images in the same order."""
    from inflora_avalanche.streams import folder_split
    from inflora_avalanche.streams import folder as stream_folder

    root = _mixed_folder(tmp_path / "data")
    names, files = scan_class_folders(root)
    expected = [(f, label) for label, n in enumerate(names) for f in files[n]]
    assert stream_folder.scan_class_folders is scan_class_folders and stream_folder.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS
    assert [Path(p).name for p, _ in expected] == ["x.PNG", "n01_0.JPEG", "n01_1.webp", "a.Jpeg", "b.jpg"]
    split_names, train, test, _ = folder_split(root, test_fraction=0.4, split_seed=0)
    assert split_names == names and sorted(train + test) == sorted(expected)

    agreement = _load(ROOT / "benchmarks" / "precision_agreement.py")
    ds = agreement.load_split({"n02": files["n02"]}, ["n02"], per_class=5)
    assert ds.images.shape == (2, 3, 4, 5) and ds.targets == [0, 0]
    assert np.array_equal(ds.images[0].permute(1, 2, 0).numpy(), np.asarray(open_rgb(files["n02"][0])))

    demo = _load(ROOT / "experiments" / "diagnostics_demo.py")
    images = demo.load_split(root, ["n01", "n02"], "", per_class=5, size=4)
    assert images.targets == [0, 0, 1, 1]  # n01: the .JPEG and the .webp (not the subfolder's image); n02: both
    with pytest.raises(ValueError, match="holds no image files"):
        demo.load_split(root, ["n03"], "", per_class=5, size=4)


def test_scan_errors_name_the_folder(tmp_path):
    with pytest.raises(DataUnavailableError, match="does not exist"):
        scan_class_folders(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    _image(tmp_path / "flat" / "a.jpg")
    with pytest.raises(DataUnavailableError, match="no class subfolders"):
        scan_class_folders(tmp_path / "flat")
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(DataUnavailableError, match=r"class folder .*empty has no image files"):
        scan_class_folders(tmp_path / "flat")


@pytest.mark.parametrize("content", [b"garbage", b"\x89PNG\r\n\x1a\n not really a png", b"\xff\xd8 truncated"])
def test_corrupt_image_raises_image_load_error_with_the_path(tmp_path, content):
    from inflora_avalanche.streams import ImageFileDataset
    from inflora_avalanche.streams import ImageLoadError as StreamsImageLoadError

    assert StreamsImageLoadError is ImageLoadError
    bad = tmp_path / "c0" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        open_rgb(bad)
    message = str(info.value)
    assert message.startswith(f"cannot read image {bad} (")
    assert message.endswith("; replace it with a readable image under the same name (deleting it changes the "
                            "train/test split, which --resume of a run on this data refuses)")
    # every reader raises the same error
    with pytest.raises(ImageLoadError, match="broken.jpg"):  # the stream's dataset raises the same error
        ImageFileDataset([(str(bad), 0)])[0]


def test_io_does_not_import_torch():
    code = "import sys, inflora_avalanche.io; assert 'torch' not in sys.modules and 'PIL' not in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
