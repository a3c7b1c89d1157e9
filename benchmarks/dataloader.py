#!/usr/bin/env python
"""Images/s of the input paths: from stored images to device-ready training batches of ``resolution`` pixels.

Paths (``--paths``):
- ``pil``: the reference's way for CIFAR-100: per sample in the workers, a PIL image, ``RandomResizedCrop`` +
  flip + ``ToTensor`` at full resolution, collated float batches copied to the device.
- ``tensor``: decoded ``uint8`` images kept as one tensor; workers only index (per-sample ``__getitem__``, default
  collate); the small ``uint8`` batch goes to the device and :class:`DeviceAugment` crops, flips and resizes it there.
- ``tensor-index``: the ``tensor`` loader alone (``uint8`` batches on the device, not augmented): what the CPU side
  can deliver once the augmentation runs on the accelerator.
- ``tensor-batched``: as ``tensor``, but the dataset answers a whole batch with one gather (``__getitems__``).
- ``avalanche``: as ``tensor``, through the Avalanche experience dataset the strategy iterates (its wrapper and collate).
- ``folder``: JPEG files decoded in the workers by the runner's :class:`ImageFileDataset`, reference transforms per
  sample (ImageNet-R / DomainNet style).

CIFAR-like images are random 32 x 32 ``uint8`` unless ``--cifar-root`` points at a ``cifar-100-python`` folder; the
folder paths use ``--folder`` or, by default, synthetic JPEGs written to a temporary folder (``--folder-size``).

Options shared with the runner (``inflora-avalanche run``) have its names: ``--batch-size``, ``--num-workers``,
``--cpu-threads``, ``--resolution``, ``--device``, ``--out``, ``--overwrite`` (the old ``--batch``, ``--workers`` and
``--threads`` still work). The two data sources keep their own flags: ``--cifar-root`` is what the runner calls
``--data-root`` for Split CIFAR-100, ``--folder`` what it calls ``--data-root`` for folder streams.

CPU (CI-sized): python benchmarks/dataloader.py --resolution 64 --batch-size 16 --batches 3 --num-workers 0 \
                    --images 256
GPU:            python benchmarks/dataloader.py --device cuda --resolution 224 --batch-size 128 --batches 50 \
                    --num-workers 8 --cifar-root /path/to/cifar100 --out dataloader_h100.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from inflora_avalanche.run.options import ScriptHelpFormatter, ScriptParser, script_main
from inflora_avalanche.run.options import ScriptUsageError as UsageError

PATHS = ("pil", "tensor-index", "tensor", "tensor-batched", "avalanche", "folder")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0], formatter_class=ScriptHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {','.join(PATHS)} (default: all)")
    p.add_argument("--resolution", type=int, default=224, help="output side in pixels")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=64, help="minibatch size")
    p.add_argument("--batches", type=int, default=10, help="timed batches per path")
    p.add_argument("--num-workers", "--workers", dest="num_workers", type=int, default=2,
                   help="DataLoader worker processes")
    p.add_argument("--images", type=int, default=2048, help="synthetic CIFAR-like images")
    p.add_argument("--cifar-root", type=Path, default=None,
                   help="use the real CIFAR-100 training set from this folder (holds cifar-100-python/; "
                        "default: random images)")
    p.add_argument("--folder", type=Path, default=None,
                   help="an image folder root/<class>/*.jpg for the folder paths (default: synthetic JPEGs)")
    p.add_argument("--folder-images", type=int, default=None, help="synthetic JPEGs to write (default: enough for the run)")
    p.add_argument("--folder-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"),
                   help="synthetic JPEG size (default: 500 375, typical of ImageNet-R)")
    p.add_argument("--cpu-threads", "--threads", dest="cpu_threads", type=int, default=None,
                   help="torch CPU threads of the main process (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the shuffling")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an existing file")
    args = p.parse_args(argv)
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    bad = [s for s in args.paths if s not in PATHS]
    if bad or not args.paths:
        raise UsageError(f"--paths must list some of {', '.join(PATHS)}, got {bad or 'nothing'}")
    for name in ("resolution", "batch_size", "batches", "images"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    if min(args.folder_size) < 1:
        raise UsageError(f"--folder-size must be positive, got {args.folder_size}")
    if args.folder is not None and not args.folder.is_dir():
        raise UsageError(f"--folder {args.folder} is not a directory")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise UsageError(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a torch device (use cpu or cuda)") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available on this machine")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it or choose another --out")
    return args


# ------------------------------------------------------------------------------------------------- data sources
class PILFromTensor(torch.utils.data.Dataset):
    """Like torchvision's CIFAR100: uint8 arrays turned into PIL images per item, then the transform."""

    def __init__(self, images: torch.Tensor, targets: list[int], transform: Callable) -> None:
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


class TransformedFiles(torch.utils.data.Dataset):
    """The runner's image files (:class:`ImageFileDataset`: decoded RGB PIL images), then the transform."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        from inflora_avalanche.streams.folder import ImageFileDataset

        self.files = ImageFileDataset(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.files[i]
        return self.transform(image), label


def cifar_like(args: argparse.Namespace) -> tuple[torch.Tensor, list[int], str]:
    if args.cifar_root is not None:
        from inflora_avalanche.streams.cifar import cifar100_uint8

        ds = cifar100_uint8(args.cifar_root, train=True)
        return ds.images, ds.targets, f"CIFAR-100 train ({len(ds)} images) from {args.cifar_root}"
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, 100, (args.images,), generator=gen).tolist()
    return images, targets, f"{args.images} random 32x32 uint8 images"


def write_jpegs(root: Path, count: int, size: tuple[int, int], seed: int) -> None:
    """``count`` JPEGs of smooth random content in 10 class folders (random noise would not compress like photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        folder = root / f"class{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)


def _loader(ds: Any, args: argparse.Namespace, collate: Optional[Callable] = None) -> torch.utils.data.DataLoader:
    kwargs: dict[str, Any] = dict(batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                  drop_last=True,
                                  pin_memory=args.device.type == "cuda",
                                  generator=torch.Generator().manual_seed(args.seed))
    if collate is not None:
        kwargs["collate_fn"] = collate
    if args.num_workers:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = 4
    return torch.utils.data.DataLoader(ds, **kwargs)


def _cycle(loader: Iterable) -> Iterable:
    while True:
        yield from loader


def measure_loader(
    loader: Iterable, prepare: Callable[[torch.Tensor], torch.Tensor], args: argparse.Namespace
) -> dict:
    """Images/s over ``--batches`` batches after one warm-up batch (worker start-up timed apart)."""
    device = args.device
    start = time.perf_counter()
    it = iter(_cycle(loader))
    out = prepare(next(it)[0].to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    checksum = torch.zeros((), device=device, dtype=torch.float64)
    start = time.perf_counter()
    for _ in range(args.batches):
        out = prepare(next(it)[0].to(device, non_blocking=True))
        checksum += out[:, :, 0, 0].double().sum()  # keeps the work from being skipped; summed on the device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    shape = list(out.shape)
    del it
    return {"img_s": args.batch_size * args.batches / seconds, "first_batch_s": first, "batch_shape": shape,
            "dtype": str(out.dtype).replace("torch.", ""), "finite": bool(torch.isfinite(checksum))}


def run(args: argparse.Namespace) -> dict:
    from torchvision import transforms as T

    from inflora_avalanche.device_augment import DeviceAugment
    from inflora_avalanche.io import scan_class_folders
    from inflora_avalanche.streams.common import BatchedTensorImageDataset, TensorImageDataset, batched_collate

    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    res = args.resolution
    reference_tf = T.Compose([T.RandomResizedCrop(res), T.RandomHorizontalFlip(), T.ToTensor()])
    augment = DeviceAugment(res, seed=args.seed)
    on_device = lambda x: augment(x, True)  # noqa: E731
    as_is = lambda x: x  # noqa: E731
    results: dict[str, dict] = {}
    sources: dict[str, str] = {}
    images = targets = None
    if any(p in args.paths for p in ("pil", "tensor-index", "tensor", "tensor-batched", "avalanche")):
        images, targets, sources["cifar"] = cifar_like(args)
    tmp: Optional[tempfile.TemporaryDirectory] = None
    folder = args.folder
    if folder is None and any(p.startswith("folder") for p in args.paths):
        tmp = tempfile.TemporaryDirectory(prefix="inflora_dl_")
        folder = Path(tmp.name) / "images"
        count = args.folder_images or args.batch_size * (args.batches + 1)
        write_jpegs(folder, count, tuple(args.folder_size), args.seed)
        sources["folder"] = f"{count} synthetic {args.folder_size[0]}x{args.folder_size[1]} JPEGs"
    elif folder is not None:
        sources["folder"] = str(folder)
    try:
        for path in args.paths:
            print(f"  measuring {path} ...", file=sys.stderr)
            if path == "pil":
                loader = _loader(PILFromTensor(images, targets, reference_tf), args)
                results[path] = measure_loader(loader, as_is, args)
            elif path == "tensor-index":
                results[path] = measure_loader(_loader(TensorImageDataset(images, targets), args), as_is, args)
            elif path == "tensor":
                results[path] = measure_loader(_loader(TensorImageDataset(images, targets), args), on_device, args)
            elif path == "tensor-batched":
                ds = BatchedTensorImageDataset(images, targets)
                results[path] = measure_loader(_loader(ds, args, batched_collate), on_device, args)
            elif path == "avalanche":
                from avalanche.benchmarks import nc_benchmark

                ds = TensorImageDataset(images, targets)
                bench = nc_benchmark(ds, ds, n_experiences=1, task_labels=False, shuffle=False)
                exp_ds = bench.train_stream[0].dataset.train()
                loader = _loader(exp_ds, args, getattr(exp_ds, "collate_fn", None))
                results[path] = measure_loader(loader, on_device, args)
            elif path == "folder":
                names, files = scan_class_folders(folder)
                ds = TransformedFiles([(f, y) for y, name in enumerate(names) for f in files[name]], reference_tf)
                results[path] = measure_loader(_loader(ds, args), as_is, args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = {
        "benchmark": "dataloader",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "config": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "device": str(args.device),
                        **({"device_name": torch.cuda.get_device_name(args.device)}
                           if args.device.type == "cuda" else {})},
        "sources": sources,
        "results": results,
    }
    print(f"{'path':>15} {'img/s':>10} {'first batch s':>14}  batch")
    for name, r in results.items():
        print(f"{name:>15} {r['img_s']:>10.1f} {r['first_batch_s']:>14.2f}  {r['batch_shape']} {r['dtype']}")
    if "pil" in results and "tensor" in results:
        print(f"tensor + device augment vs PIL per sample: x{results['tensor']['img_s'] / results['pil']['img_s']:.2f}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return script_main("dataloader.py", parse_args, run, argv, user_errors=(ValueError, FileNotFoundError))  # missing data, unreadable images


if __name__ == "__main__":
    sys.exit(main())
