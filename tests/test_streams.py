"""Stream construction: class counts and order, split determinism, the user's folder left untouched, clear errors."""

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from inflora_avalanche.streams import (
    DataUnavailableError,
    ImageFileDataset,
    ImageLoadError,
    folder_benchmark,
    folder_split,
    image_transforms,
    read_manifest,
    scan_class_folders,
    split_cifar100,
    split_digits,
    split_domainnet,
    split_imagenet_r,
)
from inflora_avalanche.streams.domainnet import DOMAINNET_DOMAINS

from conftest import TEST_DATA  # noqa: E402  (../shared or INFLORA_TEST_DATA)


def _png(path: Path, value: int, size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value % 256, (3 * value) % 256, (7 * value) % 256)).save(path)


def make_class_folders(root: Path, n_classes: int, per_class: int) -> Path:
    for c in range(n_classes):
        for i in range(per_class):
            _png(root / f"class{c:03d}" / f"img{i}.png", 10 * c + i)
    return root


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its content hash and modification time."""
    return {
        str(p.relative_to(root)): (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def folder(tmp_path):
    root = make_class_folders(tmp_path / "imgs", n_classes=6, per_class=10)
    (root / "class000" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def test_scan_class_folders(folder):
    names, files = scan_class_folders(folder)
    assert names == [f"class{c:03d}" for c in range(6)]
    assert all(len(files[n]) == 10 for n in names)
    assert all(f.endswith(".png") for n in names for f in files[n])


def test_seeded_split_is_deterministic_stratified_and_non_destructive(folder, tmp_path):
    before = snapshot(folder)
    names, train, test, info = folder_split(folder, split_seed=3, manifest_path=tmp_path / "out" / "split.json")
    assert snapshot(folder) == before  # nothing moved, changed or added in the user's folder
    assert names == [f"class{c:03d}" for c in range(6)]
    assert len(train) == 48 and len(test) == 12  # 20% of 10 images per class
    for label in range(6):
        assert sum(1 for _, y in test if y == label) == 2
    assert not {p for p, _ in train} & {p for p, _ in test}
    # same seed -> same split; another seed -> another split
    assert folder_split(folder, split_seed=3)[2] == test
    assert folder_split(folder, split_seed=4)[2] != test
    # the manifest reproduces the split
    m_names, m_train, m_test, m_info = read_manifest(tmp_path / "out" / "split.json")
    assert (m_names, m_train, m_test) == (names, train, test)
    assert m_info["split_seed"] == 3 and m_info["test_fraction"] == 0.2
    # a class's split does not depend on which other classes are used
    sub_test = folder_split(folder, classes=2, split_seed=3)[2]
    assert sub_test == [s for s in test if s[1] < 2]


def test_folder_benchmark_experiences_order_and_transforms(folder):
    bench, info = folder_benchmark(folder, n_experiences=3, resolution=12, split_seed=0)
    assert info.num_classes == 6 and info.train_size == 48 and info.test_size == 12
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream] == [[0, 1], [2, 3], [4, 5]]
    assert [len(e.dataset) for e in bench.test_stream] == [4, 4, 4]
    x, y, *_ = bench.train_stream[1].dataset[0]
    assert x.shape == (3, 12, 12) and y in (2, 3)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0  # pixels in [0, 1], no normalisation
    # evaluation transform is deterministic; the training one is random
    ev = bench.test_stream[0].dataset.eval()
    assert torch.equal(ev[0][0], ev[0][0])

    reordered, _ = folder_benchmark(folder, n_experiences=2, class_order=[5, 4, 3, 2, 1, 0], resolution=8)
    assert [sorted(e.classes_in_this_experience) for e in reordered.train_stream] == [[3, 4, 5], [0, 1, 2]]
    with pytest.raises(ValueError, match="cannot be split evenly"):
        folder_benchmark(folder, n_experiences=4)
    with pytest.raises(ValueError, match="permutation"):
        folder_benchmark(folder, n_experiences=2, class_order=[0, 1, 2])


def test_normalize_option():
    _, test_tf = image_transforms(8, normalize=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = test_tf(Image.new("RGB", (8, 8), (0, 0, 0)))
    assert torch.allclose(x, torch.full_like(x, -1.0))


def test_train_val_layout(tmp_path):
    root = tmp_path / "ds"
    make_class_folders(root / "train", 4, 5)
    make_class_folders(root / "val", 4, 2)
    names, train, test, info = folder_split(root, max_train_per_class=3)
    assert info["layout"] == "train/test folders"
    assert len(train) == 12 and len(test) == 8
    assert all("/train/" in p for p, _ in train) and all("/val/" in p for p, _ in test)
    _png(root / "val" / "class999" / "x.png", 1)
    with pytest.raises(DataUnavailableError, match="class999"):
        folder_split(root)


def test_corrupt_and_missing_images_are_reported_by_path(folder, tmp_path):
    bad = folder / "class001" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dataset = ImageFileDataset([(str(bad), 1)])
    with pytest.raises(ImageLoadError, match="broken.png"):
        dataset[0]
    # a file that disappears after the split was written
    manifest = tmp_path / "split.json"
    folder_split(folder, manifest_path=manifest)
    gone = folder / "class002" / "img3.png"
    gone.unlink()
    with pytest.raises(DataUnavailableError, match="img3.png"):
        folder_benchmark(folder, 2, split_manifest=manifest)


def test_empty_or_missing_folders(tmp_path):
    with pytest.raises(DataUnavailableError, match="does not exist"):
        folder_split(tmp_path / "nope")
    (tmp_path / "empty" / "classA").mkdir(parents=True)
    with pytest.raises(DataUnavailableError, match="no image files"):
        folder_split(tmp_path / "empty")


def test_imagenet_r_split(tmp_path):
    root = make_class_folders(tmp_path / "imagenet-r", n_classes=200, per_class=2)
    before = snapshot(root)
    manifest = tmp_path / "results" / "imagenet_r_split_seed0.json"
    bench, info = split_imagenet_r(root, n_experiences=10, split_seed=0, manifest_path=manifest, resolution=8)
    assert snapshot(root) == before
    assert info.num_classes == 200 and len(bench.train_stream) == 10
    assert [len(e.classes_in_this_experience) for e in bench.train_stream] == [20] * 10
    assert sorted(bench.train_stream[0].classes_in_this_experience) == list(range(20))
    assert manifest.is_file() and read_manifest(manifest)[2] == read_manifest(manifest)[2]
    again, _ = split_imagenet_r(root, n_experiences=5, split_seed=0, resolution=8)
    assert [len(e.classes_in_this_experience) for e in again.train_stream] == [40] * 5
    with pytest.raises(ValueError, match="5, 10 or 20"):
        split_imagenet_r(root, n_experiences=8)
    with pytest.raises(DataUnavailableError, match="imagenet-r"):
        split_imagenet_r(tmp_path / "missing")
    small = make_class_folders(tmp_path / "small", 6, 2)
    with pytest.raises(DataUnavailableError, match="has 6 class folders"):
        split_imagenet_r(small, n_experiences=5)


def _domainnet(root: Path, n_classes: int) -> Path:
    for domain in DOMAINNET_DOMAINS:
        for split in ("train", "test"):
            lines = []
            for c in range(n_classes):
                rel = f"{domain}/cls_{c}/{domain}_{split}_{c}.png"
                _png(root / rel, c)
                lines.append(f"{rel} {c}")
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_domainnet_lists(tmp_path):
    root = _domainnet(tmp_path / "domainnet", 10)
    bench, info = split_domainnet(root, n_experiences=5, expected_classes=10, resolution=8)
    assert info.num_classes == 10 and info.train_size == 60 and info.test_size == 60
    assert info.class_names == [f"cls_{c}" for c in range(10)]
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream][1] == [2, 3]
    with pytest.raises(DataUnavailableError, match="expected 0..344"):
        split_domainnet(root)  # a real DomainNet has 345 classes
    (root / "sketch" / "cls_3" / "sketch_test_3.png").unlink()
    with pytest.raises(DataUnavailableError, match="sketch_test_3.png"):
        split_domainnet(root, expected_classes=10)
    (root / "real_train.txt").unlink()
    with pytest.raises(DataUnavailableError, match="real_train.txt"):
        split_domainnet(root, expected_classes=10)


def test_cifar100_offline_errors(tmp_path, monkeypatch):
    with pytest.raises(DataUnavailableError, match="cifar-100-python"):
        split_cifar100(tmp_path / "empty", download=False)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DataUnavailableError, match="could not be downloaded.*cifar-100-python"):
        split_cifar100(tmp_path / "empty2", download=True)


def test_digits_demo_stream():
    bench, info = split_digits(n_experiences=5, resolution=12)
    assert info.num_classes == 10 and info.train_size + info.test_size == 1797
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    x, y, *_ = bench.test_stream[4].dataset[0]
    assert x.shape == (3, 12, 12) and y in (8, 9) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0


@pytest.mark.skipif(not TEST_DATA, reason="tiny-imagenet-100 is neither in ../shared/data nor named by INFLORA_TEST_DATA")
def test_tiny_imagenet_folder_stream():
    root = Path(TEST_DATA)
    wnids = [line.split("\t")[1] for line in (root / "classes.tsv").read_text().splitlines() if line.strip()]
    top = sorted(os.listdir(root / "train"))[:3]
    mtimes = {name: (root / "train" / name).stat().st_mtime_ns for name in top}

    bench, info = folder_benchmark(root, n_experiences=5, classes=20, resolution=56)
    assert info.class_names == sorted(wnids)[:20]
    assert info.train_size == 20 * 200 and info.test_size == 20 * 50
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream] == [
        list(range(4 * k, 4 * k + 4)) for k in range(5)
    ]
    assert [len(e.dataset) for e in bench.test_stream] == [200] * 5
    x, y, *_ = bench.test_stream[2].dataset.eval()[0]
    assert x.shape == (3, 56, 56) and y in range(8, 12)

    # a seeded split of the training images alone (root/<class>/* layout)
    names, train, test, _ = folder_split(root / "train", classes=10, split_seed=1)
    assert len(test) == 10 * 40 and len(train) == 10 * 160
    assert folder_split(root / "train", classes=10, split_seed=1)[2] == test
    assert {name: (root / "train" / name).stat().st_mtime_ns for name in top} == mtimes


# --------------------------------------------------------------------------------------------- the registry
def _stream_config(name, **overrides):
    from inflora_avalanche.run import presets as P

    return P.layered_config("demo_digits", overrides={"benchmark": name, "n_experiences": 5,
                                                      "demo": False, **overrides})


def test_every_registered_stream_builds_or_is_refused_consistently(tmp_path):
    import importlib

    from inflora_avalanche import streams as S
    from inflora_avalanche.run import build
    from inflora_avalanche.run.config import ConfigError
    from inflora_avalanche.run.output import trained_data_config

    for name, stream in S.REGISTRY.items():
        module, function = stream.builder.split(":")
        assert callable(getattr(importlib.import_module(f"inflora_avalanche.streams.{module}"), function)), name
        assert stream.data_root in ("required", "optional", "unused") and stream.data and stream.label
        if stream.script is not None:  # an experiment script's default preset runs this stream
            from inflora_avalanche.run import presets as P

            assert P.load_preset(stream.script.default_preset)["benchmark"] == name
            assert set(stream.script.also_accepts) <= set(S.REGISTRY)
        empty = tmp_path / name
        empty.mkdir()
        root = {} if stream.data_root == "unused" else {"data_root": str(empty)}  # refused where it is not read
        assert trained_data_config(_stream_config(name, **root))["crop_pct"] == stream.crop_pct
        if stream.data_root == "required":
            with pytest.raises(ConfigError, match=f"the {name} stream needs --data-root"):
                _stream_config(name)
            with pytest.raises(DataUnavailableError) as err:
                build.build_stream(_stream_config(name, data_root=str(empty)))
            assert "\n" not in str(err.value) and ("--data-root" in str(err.value) or "data root" in str(err.value))
        elif stream.data_root == "optional":  # CIFAR-100: a folder or a download
            with pytest.raises(DataUnavailableError, match="cifar-100-python"):
                build.build_stream(_stream_config(name, data_root=str(empty), download=False))
        else:
            bench, info = build.build_stream(_stream_config(name))
            assert len(bench.train_stream) == 5 and info.n_experiences == 5
            if stream.num_classes is not None:
                assert info.num_classes == stream.num_classes
        if stream.num_classes is not None:
            with pytest.raises(ConfigError, match=f"the {stream.num_classes} classes of {name} cannot be split"):
                _stream_config(name, n_experiences=7, **root)


def test_a_new_registry_entry_is_a_stream_everywhere(monkeypatch, tmp_path):
    from inflora_avalanche import streams as S
    from inflora_avalanche.run import build, cli
    from inflora_avalanche.run import presets as P
    from inflora_avalanche.run.config import ConfigError

    monkeypatch.setitem(S.REGISTRY, "fake", S.Stream("fake", "digits:from_config", "fake digits", "nothing to prepare",
                                                     num_classes=10, crop_pct=0.5))
    parser = cli.run_parser(None, P.merge_layers("demo_digits"), "run")
    benchmark = next(a for a in parser._actions if "--benchmark" in a.option_strings)
    assert "fake" in benchmark.choices and "fake" in parser.format_help()
    config = cli.config_from_argv(["--preset", "demo_digits", "--benchmark", "fake"])
    bench, info = build.build_stream(config)
    assert info.num_classes == 10 and len(bench.train_stream) == 5
    from inflora_avalanche.run.output import trained_data_config

    assert trained_data_config(config)["crop_pct"] == 0.5
    with pytest.raises(ConfigError, match="the 10 classes of fake cannot be split evenly into 3"):
        cli.config_from_argv(["--preset", "demo_digits", "--benchmark", "fake", "--n-experiences", "3"])
    monkeypatch.delitem(S.REGISTRY, "fake")
    with pytest.raises(ConfigError, match="benchmark .*must be one of split_cifar100, imagenet_r, domainnet, folder, "
                                          "digits, synthetic, got 'fake'"):
        P.layered_config("demo_digits", overrides={"benchmark": "fake"})


def test_the_stream_registry_is_torch_free():
    import subprocess
    import sys

    probe = ("import sys, inflora_avalanche.streams as S; S.get_stream('folder'); "
             "print(sorted(m for m in ('torch', 'timm', 'avalanche') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
