"""Bad and unusual inputs of ``compare``, image folders and exports (docs/reliability.md, "Third round: compare,
data and exports"): each is one ``error:`` line with exit code 2 before any compute, nothing created or removed, or
it works and the user's files are left as they were."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from inflora_avalanche.run import cli

TINY_BACKBONE = {"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}


def _folder(root: Path, n_classes: int = 4, per_class: int = 3, ext: str = "jpg") -> Path:
    """Class folders of noisy 24 x 24 images (noise: a JPEG's header is then a small part of the file); four classes
    by default, two per experience (one class per experience is refused)."""
    rng = np.random.default_rng(len(str(root)))
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.{ext}", quality=95)
    return root


def _preset(tmp_path: Path) -> str:
    preset = {"benchmark": "folder", "n_experiences": 2, "resolution": 8, "backbone": "vit_tiny_patch16_224",
              "pretrained": False, "backbone_kwargs": TINY_BACKBONE, "rank": 2, "epochs": 1, "batch_size": 4,
              "device": "cpu", "num_workers": 0, "progress": False, "diagnostics": False, "cpu_threads": 1}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(preset))
    return str(path)


def _mixed_modes(root: Path) -> Path:
    """One class of every common mode and of very different sizes, one of ordinary RGB JPEGs."""
    _folder(root)
    c0 = root / "c0"
    Image.new("L", (30, 10), 100).save(c0 / "gray.png")
    Image.new("LA", (16, 16), (5, 200)).save(c0 / "gray_alpha.png")
    Image.new("RGBA", (5, 40), (1, 2, 3, 0)).save(c0 / "rgba.png")
    Image.new("P", (13, 13), 3).save(c0 / "palette.gif")
    transparent = Image.new("P", (12, 12), 1)
    transparent.info["transparency"] = 1
    transparent.save(c0 / "palette_transparent.png")
    Image.new("CMYK", (20, 20), (0, 50, 100, 0)).save(c0 / "cmyk.jpg")
    Image.new("1", (9, 7), 1).save(c0 / "bilevel.bmp")
    Image.fromarray((np.arange(400).reshape(20, 20) * 150).astype(np.uint16)).save(c0 / "gray16.png")
    Image.new("RGB", (300, 2), (9, 9, 9)).save(c0 / "thin.webp")
    return root


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


Check = Callable[[Path, str], None]


def _cases(tmp_path: Path) -> dict[str, tuple[list[str], Optional[tuple[str, ...]], Optional[Check]]]:
    """name -> (argv of ``inflora-avalanche``, the texts of the one error line or ``None`` when it works, a check of
    what a working run wrote)."""
    tiny = _preset(tmp_path)
    good = _folder(tmp_path / "good")
    out = str(tmp_path / "out")
    run = ["run", "--preset", tiny, "--out", out]
    compare = ["compare", "--preset", tiny, "--data-root", str(good), "--out", out]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")

    truncated = _folder(tmp_path / "truncated")
    whole = (truncated / "c3" / "2.jpg").read_bytes()
    (truncated / "c3" / "2.jpg").write_bytes(whole[: 2 * len(whole) // 3])
    corrupt_png = _folder(tmp_path / "corrupt_png", ext="png")
    data = bytearray((corrupt_png / "c1" / "1.png").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt_png / "c1" / "1.png").write_bytes(bytes(data))
    only_text = _folder(tmp_path / "only_text")
    (only_text / "c_notes").mkdir()
    (only_text / "c_notes" / "notes.txt").write_text("labels to do")
    beside = _folder(tmp_path / "beside")
    (beside / "c0" / "README.txt").write_text("x")
    (beside / "c1" / "Thumbs.db").write_bytes(b"\0" * 16)
    (beside / ".DS_Store").write_bytes(b"\0" * 16)
    (beside / "labels.csv").write_text("file,label\n")
    (tmp_path / "linked").symlink_to(good)
    (tmp_path / "linked_classes").mkdir()
    for c in ("c0", "c1", "c2", "c3"):
        (tmp_path / "linked_classes" / c).symlink_to(good / c)
    wrong_extension = _folder(tmp_path / "wrong_extension")
    Image.open(wrong_extension / "c0" / "0.jpg").save(wrong_extension / "c0" / "0.jpg", format="PNG")
    read_only = _folder(tmp_path / "read_only")
    earlier = tmp_path / "earlier_exports"
    (earlier / "inflora" / "seed0" / "after_exp1").mkdir(parents=True)
    (earlier / "inflora" / "seed0" / "after_exp1" / "model.safetensors").write_bytes(b"an earlier export")
    weights = tmp_path / "local.safetensors"
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_BACKBONE).state_dict(),
              str(weights))

    def results_written(out_dir: Path, err: str) -> None:
        assert json.loads((out_dir / "results.json").read_text())["seeds"][0]["experiences_done"] == 2

    def every_image_used(out_dir: Path, err: str) -> None:
        results_written(out_dir, err)
        stream = json.loads((out_dir / "results.json").read_text())["benchmark"]
        assert stream["train_size"] + stream["test_size"] == 4 * 3 + 9  # the nine odd images of c0 included

    def exports_per_method_in_the_run_folder(out_dir: Path, err: str) -> None:
        assert (out_dir / "inflora" / "seed0" / "after_exp2" / "model.safetensors").is_file()
        assert (out_dir / "inflora" / "seed0" / "log.txt").is_file()  # beside the run's own logs, not replacing them

    def random_init_export(out_dir: Path, err: str) -> None:
        config = json.loads((tmp_path / "exports" / "seed0" / "after_exp2" / "config.json").read_text())
        assert config["backbone_weights"] == {"kind": "random init"}
        assert "license" not in config["pretrained_cfg"] and "tag" not in config["pretrained_cfg"]

    def local_file_export(out_dir: Path, err: str) -> None:
        config = json.loads((tmp_path / "exports" / "seed0" / "after_exp1" / "config.json").read_text())
        assert config["backbone_weights"]["kind"] == "file"
        assert config["backbone_weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert "license" not in config["pretrained_cfg"]

    return {
        # ------------------------------------------------------------------ compare
        "compare: unknown method": (compare + ["--methods", "InfLoRA"], ("unknown method(s) ['InfLoRA']; choose from",),
                                    None),
        "compare: a truncated image": (["compare", "--preset", tiny, "--data-root", str(truncated), "--out", out,
                                         "--methods", "inflora", "linear_probe"],
                                        ("1 of the stream's 12 image files cannot be read",
                                         f"{truncated / 'c3' / '2.jpg'} (OSError: image file is truncated"), None),
        "compare: a method named twice": (compare + ["--methods", "inflora", "inflora"],
                                          ("--methods names a method twice: ['inflora', 'inflora']",), None),
        "compare: --methods without a name": (compare + ["--methods"], ("--methods: expected at least one argument",),
                                              None),
        "compare: --out a file": (["compare", "--preset", tiny, "--data-root", str(good), "--out", str(a_file),
                                   "--methods", "naive"], (f"--out {a_file} is a file; give a folder",), None),
        "compare: --export a file": (compare + ["--methods", "inflora", "--export", str(a_file)],
                                     (f"--export {a_file} is a file; give a folder",), None),
        "compare: --export without a method that exports": (
            compare + ["--methods", "naive", "lwf", "--export", str(tmp_path / "e")],
            ("--export applies to inflora", "none of which is in --methods"), None),
        "compare: --export holding an earlier comparison's exports": (
            compare + ["--methods", "inflora", "--export", str(earlier)],
            (f"--export {earlier / 'inflora'} already holds exported models",), None),
        "compare: --export the same folder as --out": (compare + ["--methods", "inflora", "--export", out,
                                                                  "--no-isolate"], None,
                                                      exports_per_method_in_the_run_folder),
        # ------------------------------------------------------------------ image folders
        "truncated JPEG (in the last experience)": (run + ["--data-root", str(truncated)],
                                                    ("1 of the stream's 12 image files cannot be read",
                                                     f"{truncated / 'c3' / '2.jpg'} (OSError: image file is truncated",
                                                     "Replace them with readable images"), None),
        "PNG with corrupt pixel data": (run + ["--data-root", str(corrupt_png)],
                                        (f"{corrupt_png / 'c1' / '1.png'} (OSError: broken data stream",), None),
        "image over PIL's decompression-bomb limit": (run + ["--data-root", str(good)],
                                                      ("12 of the stream's 12 image files cannot be read",
                                                       "(DecompressionBombError: Image size (576 pixels)"),
                                                      None),
        "--data-root a file": (run + ["--data-root", str(a_file)], (f"--data-root {a_file} is a file; give the folder that holds the images",),
                               None),
        "class folder with only non-image files": (run + ["--data-root", str(only_text)],
                                                   (f"class folder {only_text / 'c_notes'} has no image files",
                                                    "it holds notes.txt); put images in it or remove it"), None),
        "images of mixed modes and sizes": (run + ["--data-root", str(_mixed_modes(tmp_path / "mixed"))], None,
                                            every_image_used),
        "non-image files beside the images": (run + ["--data-root", str(beside)], None, results_written),
        "symlinked data folder": (run + ["--data-root", str(tmp_path / "linked")], None, results_written),
        "symlinked class folders": (run + ["--data-root", str(tmp_path / "linked_classes")], None, results_written),
        "PNG named .jpg": (run + ["--data-root", str(wrong_extension)], None, results_written),
        "read-only data folder": (run + ["--data-root", str(read_only)], None, results_written),
        # ------------------------------------------------------------------ exports
        "--export of a --no-pretrained run": (run + ["--data-root", str(good), "--export", str(tmp_path / "exports")],
                                              None, random_init_export),
        "--export of a --weights FILE run": (run + ["--data-root", str(good), "--weights", str(weights),
                                                    "--export", str(tmp_path / "exports")], None, local_file_export),
    }


CASES = ["compare: unknown method", "compare: a truncated image", "compare: a method named twice", "compare: --methods without a name",
         "compare: --out a file", "compare: --export a file", "compare: --export without a method that exports",
         "compare: --export holding an earlier comparison's exports", "compare: --export the same folder as --out",
         "truncated JPEG (in the last experience)", "PNG with corrupt pixel data",
         "image over PIL's decompression-bomb limit", "--data-root a file", "class folder with only non-image files",
         "images of mixed modes and sizes", "non-image files beside the images", "symlinked data folder",
         "symlinked class folders", "PNG named .jpg", "read-only data folder", "--export of a --no-pretrained run",
         "--export of a --weights FILE run"]


@pytest.mark.parametrize("case", CASES)
def test_an_input_is_one_line_before_any_compute_or_works(case, tmp_path, capsys, monkeypatch):
    argv, needles, check = _cases(tmp_path)[case]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    if case.startswith("image over"):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 24 x 24 images are then over twice the limit
    if case.startswith("read-only"):
        for folder in [tmp_path / "read_only", *(tmp_path / "read_only").iterdir()]:
            folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    data = {name: _snapshot(tmp_path / name) for name in ("good", "read_only", "mixed", "linked_classes")
            if (tmp_path / name).is_dir()}
    before = _snapshot(tmp_path)
    threads = torch.get_num_threads()
    try:
        code = cli.main(argv)
    except SystemExit as done:  # argparse's errors leave through fail()
        code = done.code
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    if needles is not None:
        assert code == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        for needle in needles:
            assert needle in err, (needle, err)
        assert _snapshot(tmp_path) == before  # nothing created, nothing removed, nothing changed
    else:
        assert code == 0, err
        check(tmp_path / "out", err)
        assert {name: _snapshot(tmp_path / name) for name in data} == data  # the data is only read
    if case.startswith("read-only"):
        for folder in [tmp_path / "read_only", *(tmp_path / "read_only").iterdir()]:
            folder.chmod(0o755)


# --------------------------------------------------------------------------------------------------- modes
def test_every_image_mode_and_size_becomes_rgb_at_the_stream_resolution(tmp_path):
    from inflora_avalanche.io import open_rgb
    from inflora_avalanche.streams.folder import folder_benchmark

    root = _mixed_modes(tmp_path / "mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's palette-transparency warning, once per image, is gone too
        images = {p.name: open_rgb(p) for p in (root / "c0").iterdir()}
    assert {img.mode for img in images.values()} == {"RGB"}
    assert images["thin.webp"].size == (300, 2) and images["cmyk.jpg"].size == (20, 20)
    # 16-bit grayscale is scaled to 8 bits (PIL's own conversion clips at 255: most of the image became white)
    gray16 = np.asarray(images["gray16.png"])[..., 0]
    expected = (np.arange(400).reshape(20, 20) * 150) >> 8
    assert np.array_equal(gray16, expected.astype(np.uint8))
    bench, info = folder_benchmark(root, n_experiences=2, resolution=8, test_fraction=0.3, split_seed=0)
    for stream in (bench.train_stream, bench.test_stream):
        for experience in stream:
            for i in range(len(experience.dataset)):
                x, _, _ = experience.dataset[i]
                assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()


# --------------------------------------------------------------------------------------------------- resume
def test_a_file_broken_between_two_experiences_is_found_before_resuming_and_replacing_it_keeps_resume(
        tmp_path, capsys, monkeypatch):
    """The line names the file and says to replace it (deleting it changes the stream, which --resume refuses); the
    checkpoint of the finished experience is untouched, and after the file is replaced --resume finishes."""
    from inflora_avalanche.run import loop
    from inflora_avalanche.run.resume import CHECKPOINT_NAME

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _folder(tmp_path / "data", n_classes=4, per_class=3)
    out = tmp_path / "out"
    argv = ["run", "--preset", _preset(tmp_path), "--data-root", str(data), "--out", str(out)]

    class Stop(Exception):
        pass

    def stop_after_first(seed, t, strategy, partial):
        raise Stop

    real = loop.run_experiment
    monkeypatch.setattr(loop, "run_experiment", lambda config, **kw: real(config, on_experience_end=stop_after_first))
    with pytest.raises(Stop):
        cli.main(argv)
    monkeypatch.setattr(loop, "run_experiment", real)
    checkpoint = (out / CHECKPOINT_NAME).read_bytes()
    victim = data / "c1" / "2.jpg"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    capsys.readouterr()

    code = cli.main([*argv, "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{victim} (OSError: image file is truncated" in err, err
    assert "Replace them with readable images" in err and "--resume" in err
    assert (out / CHECKPOINT_NAME).read_bytes() == checkpoint

    victim.unlink()  # what the old advice said: the stream changes, and --resume refuses
    code = cli.main([*argv, "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "the data stream differs from the checkpoint's" in err, err
    assert (out / CHECKPOINT_NAME).read_bytes() == checkpoint

    Image.new("RGB", (24, 24), (1, 2, 3)).save(victim)  # what the advice says now: a readable image, same name
    code = cli.main([*argv, "--resume"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "resuming after experience 1/2" in captured.out
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"][0]["experiences_done"] == 2
    assert os.path.getsize(out / CHECKPOINT_NAME) > 0
