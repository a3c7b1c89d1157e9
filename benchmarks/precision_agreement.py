#!/usr/bin/env python
"""Accuracy of the fast path vs the reference-like fp32 path on a short real-image InfLoRA run.

Both runs use the same data, seeds and on-device augmentation (:class:`DeviceAugment`); they differ only in the
model path: ``fast`` = bf16 autocast with finished branches merged into ``qkv``; ``fp32`` = fp32 with finished
branches kept apart and re-summed at every forward (``model.unmerge()``). Prints and writes (``--out``) the
class-incremental accuracy after each task for each path and seed.

Options shared with the runner (``inflora-avalanche run``) have its names: ``--data-root``, ``--weights``,
``--backbone``, ``--classes``, ``--n-experiences``, ``--max-train-per-class``, ``--max-test-per-class``, ``--epochs``,
``--resolution``, ``--batch-size``, ``--lr``, ``--seeds``, ``--cpu-threads``, ``--out``, ``--overwrite`` (the old
``--data``, ``--tasks``, ``--train-per-class``, ``--test-per-class``, ``--batch`` and ``--threads`` still work).

python benchmarks/precision_agreement.py --data-root /path/to/tiny-imagenet-100 \
    --weights /path/to/vit_small_patch14_dinov2.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from inflora_avalanche.io import atomic_write_json, open_rgb, scan_class_folders
from inflora_avalanche.run.cli import ScriptHelpFormatter
from inflora_avalanche.streams.common import IMAGENET_MEAN, IMAGENET_STD


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=ScriptHelpFormatter)
    p.add_argument("--data-root", "--data", dest="data_root", type=Path, required=True,
                   help="folder with train/<class>/ and val/<class>/ images (required)")
    p.add_argument("--weights", type=Path, required=True, help="local backbone checkpoint, timm key names (required)")
    p.add_argument("--backbone", default="vit_small_patch14_dinov2", help="timm model name of the backbone")
    p.add_argument("--classes", type=int, default=8, help="the first N classes (name order)")
    p.add_argument("--n-experiences", "--tasks", dest="n_experiences", type=int, default=2,
                   help="number of experiences (tasks)")
    p.add_argument("--max-train-per-class", "--train-per-class", dest="max_train_per_class", type=int, default=40,
                   help="at most this many training images per class")
    p.add_argument("--max-test-per-class", "--test-per-class", dest="max_test_per_class", type=int, default=25,
                   help="at most this many test images per class")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per experience")
    p.add_argument("--resolution", type=int, default=56, help="input resolution in pixels")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=16, help="training minibatch size")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; both paths run for each")
    p.add_argument("--fast-precision", choices=("bf16", "fp32"), default="bf16",
                   help="precision of the fast (merged) path; bf16 is slow on CPUs without bf16 units")
    p.add_argument("--cpu-threads", "--threads", dest="cpu_threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an existing file")
    args = p.parse_args(argv)
    if args.out is not None and args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists; pass --overwrite to replace it")
    for name in ("classes", "n_experiences", "max_train_per_class", "max_test_per_class", "epochs", "resolution",
                 "batch_size", "cpu_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.classes % args.n_experiences:
        p.error("--classes must be a multiple of --n-experiences")
    for sub in ("train", "val"):
        if not (args.data_root / sub).is_dir():
            p.error(f"{args.data_root / sub} does not exist")
    if not args.weights.is_file():
        p.error(f"--weights {args.weights} does not exist")
    return args


def load_split(files: dict[str, list[str]], classes: list[str], per_class: int):
    """The first ``per_class`` images (name order) of each of ``classes``; ``files`` as from ``scan_class_folders``."""
    from inflora_avalanche.streams.common import TensorImageDataset
    from inflora_avalanche.device_augment import images_to_uint8_tensor

    images, targets = [], []
    for label, name in enumerate(classes):
        chosen = files.get(name, [])[:per_class]
        images += [open_rgb(f) for f in chosen]
        targets += [label] * len(chosen)
    return TensorImageDataset(images_to_uint8_tensor(images), targets)


def run_path(args: argparse.Namespace, path: str, seed: int, train_ds, test_ds) -> list[float]:
    from avalanche.benchmarks import nc_benchmark
    from avalanche.training.plugins import EvaluationPlugin

    from inflora_avalanche import InfLoRAStrategy, InfLoRAViT
    from inflora_avalanche.device_augment import DeviceAugment

    torch.manual_seed(seed)
    bench = nc_benchmark(train_ds, test_ds, n_experiences=args.n_experiences, task_labels=False, shuffle=False,
                         fixed_class_order=list(range(args.classes)), seed=seed)
    model = InfLoRAViT(args.backbone, rank=10, checkpoint_path=args.weights, num_classes=args.classes,
                       dynamic_img_size=True)
    if path == "fp32":
        model.unmerge()  # finished branches stay apart and are re-summed at every forward
    augment = DeviceAugment(args.resolution, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=seed)
    strategy = InfLoRAStrategy(
        model=model, lr=args.lr, precision=args.fast_precision if path == "fast" else "fp32", input_transform=augment,
        train_mb_size=args.batch_size, train_epochs=args.epochs, device="cpu", num_tasks=args.n_experiences,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    accs = []
    seen: list = []
    for exp in bench.train_stream:
        strategy.train(exp, num_workers=0)
        seen.append(exp.classes_in_this_experience)
        test = torch.utils.data.ConcatDataset([bench.test_stream[i].dataset.eval() for i in range(len(seen))])
        correct = total = 0
        model.eval()
        with torch.no_grad():
            for batch in torch.utils.data.DataLoader(test, batch_size=64):
                with strategy.autocast():
                    out = model(augment(batch[0], False))
                correct += int((out.argmax(1) == batch[1]).sum())
                total += len(batch[1])
        accs.append(correct / total)
    assert all(a.merged == (path == "fast") for _, a in model.adapters())
    return accs


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.cpu_threads)
    classes, train_files = scan_class_folders(args.data_root / "train")
    classes = classes[: args.classes]
    train_ds = load_split(train_files, classes, args.max_train_per_class)
    test_ds = load_split(scan_class_folders(args.data_root / "val")[1], classes, args.max_test_per_class)
    results = []
    for seed in args.seeds:
        for path in ("fast", "fp32"):
            start = time.perf_counter()
            accs = run_path(args, path, seed, train_ds, test_ds)
            results.append({"seed": seed, "path": path, "accuracy_after_each_task": accs,
                            "seconds": time.perf_counter() - start})
            print(f"seed {seed} {path:>4}: accuracy after each task {[round(a, 4) for a in accs]} "
                  f"({results[-1]['seconds']:.0f} s)", flush=True)
    report = {"benchmark": "precision_agreement", "command": " ".join(["precision_agreement.py"] + sys.argv[1:]),
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "results": results}
    if args.out is not None:
        atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
