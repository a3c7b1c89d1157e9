#!/usr/bin/env python
"""Seconds a folder stream spends on an image folder before its first image is trained on, against torchvision.

Figures (each the best of ``--repeats``, so that the load of a shared machine only ever adds time):

- ``scan``: the folder stream's scan and split (``folder_split``), and ``scan_with_manifest``: the same with the
  split manifest written, as a run does;
- ``imagefolder``: ``torchvision.datasets.ImageFolder`` on the same class folders (``train/`` and ``val/``, or the
  root), which lists the files the same way but writes nothing;
- ``header_check``: opening every image and reading its header (the up-front check before it decoded pixels), and
  ``decode_check``: the check a run now makes, every image decoded to its last pixel (``io.unreadable_images``,
  ``--check-workers`` threads), once (``--repeats`` does not apply: a check is not repeated within a run).

python benchmarks/folder_scan.py --data-root /path/to/tiny-imagenet-100 --out folder_scan.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from inflora_avalanche.io import unreadable_images
from inflora_avalanche.run.options import ScriptHelpFormatter, ScriptParser, script_main
from inflora_avalanche.run.options import ScriptUsageError as UsageError


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0], formatter_class=ScriptHelpFormatter)
    p.add_argument("--data-root", type=Path, required=True,
                   help="an image folder: root/<class>/* or root/{train,val}/<class>/*")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each scan; the best is reported")
    p.add_argument("--check-workers", type=int, default=min(16, 4 * (os.cpu_count() or 1)),
                   help="threads of the image checks (default: the runner's)")
    p.add_argument("--skip-checks", action="store_true", help="time the scans only")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an existing file")
    args = p.parse_args(argv)
    if not args.data_root.is_dir():
        raise UsageError(f"--data-root {args.data_root} is not a folder")
    if args.repeats < 1 or args.check_workers < 1:
        raise UsageError("--repeats and --check-workers must be >= 1")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; pass --overwrite to replace it")
    return args


def best_of(repeats: int, action: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def header_problems(paths: list[str], workers: int) -> int:
    """How many files the header-only check (the runner's before this version) finds unreadable."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def bad(path: str) -> bool:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018
            return False
        except (OSError, ValueError, SyntaxError):
            return True

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(bad, paths))


def run(args: argparse.Namespace) -> dict:
    import torch
    import torchvision

    from inflora_avalanche.streams.folder import detect_layout, folder_split

    root = args.data_root
    layout = detect_layout(root)
    folders = list(layout) if layout is not None else [root]
    with tempfile.TemporaryDirectory(prefix="inflora_scan_") as tmp:
        manifest = Path(tmp) / "split.json"
        results = {
            "scan_s": best_of(args.repeats, lambda: folder_split(root)),
            "scan_with_manifest_s": best_of(args.repeats, lambda: folder_split(root, manifest_path=manifest)),
            "imagefolder_s": best_of(args.repeats, lambda: [torchvision.datasets.ImageFolder(str(f)) for f in folders]),
        }
    _, train, test, _ = folder_split(root)
    files = [path for path, _ in (*train, *test)]
    results["files"] = len(files)
    if not args.skip_checks:
        start = time.perf_counter()
        results["header_check_unreadable"] = header_problems(files, args.check_workers)
        results["header_check_s"] = time.perf_counter() - start
        start = time.perf_counter()
        results["decode_check_unreadable"] = len(unreadable_images(files, workers=args.check_workers))
        results["decode_check_s"] = time.perf_counter() - start
    print(f"{len(files)} files in {root}")
    print(f"  folder stream scan + split:           {results['scan_s']:.3f} s")
    print(f"  the same, with the split manifest:    {results['scan_with_manifest_s']:.3f} s")
    print(f"  torchvision ImageFolder:              {results['imagefolder_s']:.3f} s")
    if not args.skip_checks:
        for kind in ("header", "decode"):
            seconds = results[f"{kind}_check_s"]
            print(f"  {kind} check ({args.check_workers} threads): {seconds:8.2f} s, "
                  f"{1000 * seconds / max(1, len(files)):.3f} ms/file, "
                  f"{results[f'{kind}_check_unreadable']} unreadable")
    return {
        "benchmark": "folder_scan",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "torchvision": torchvision.__version__, "cpu_count": os.cpu_count(),
                        "machine": platform.machine()},
        "results": results,
    }


def main(argv: Optional[list[str]] = None) -> int:
    return script_main("folder_scan.py", parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
