#!/usr/bin/env python
"""Compare InfLoRA with Avalanche's baselines on one stream, one backbone, one budget and the same seeds.

Methods (``--methods``, default all): inflora, inflora_b5, inflora_ca, seq_lora (InfLoRA's branches on a random
subspace, no memory), linear_probe, naive (full fine-tuning), ewc, lwf, l2p, joint (upper bound).
Every run trains in a fresh process (so that its peak memory and time are its own) unless ``--no-isolate``.

Writes ``OUT/results.md`` (table), ``OUT/results.json`` (table, per-run accuracy matrices, settings) and
``OUT/curves.png`` (A_t of every method). Existing results are never overwritten.

CPU smoke test on synthetic data and a tiny random ViT:
    python experiments/compare_baselines.py --out runs/smoke --epochs 1
Real images with the shared DINOv2-S (see docs/results-tiny-imagenet.md for the exact command):
    python experiments/compare_baselines.py --data ../shared/data/tiny-imagenet-100 \\
        --backbone vit_small_patch14_dinov2 --checkpoint ../shared/weights/vit_small_patch14_dinov2.imgfocus.fp16.safetensors \\
        --timm-kwargs '{"dynamic_img_size": true}' --resolution 56 --num-experiences 5 --classes-per-experience 4 ...
GPU at the paper's budget (CIFAR-100, 10 tasks; ViT-B/16 IN-21k; the paper's [0, 1] pixels):
    python experiments/compare_baselines.py --benchmark cifar100 --data data --num-experiences 10 \
        --backbone vit_base_patch16_224.augreg_in21k --pretrained --resolution 224 --epochs 20 --batch-size 128 \
        --device cuda --precision bf16 --num-workers 8 --seeds 0,1,2,3,4 --out runs/cifar100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

PROG = "compare_baselines.py"


def fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="new (or empty) folder for the results")
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--benchmark", choices=("memory", "cifar100", "imagenet-r"), default="memory",
                        help="memory: synthetic or --data folder loaded into memory (CPU budgets); cifar100 / "
                        "imagenet-r: the paper's streams from --data (GPU)")
    parser.add_argument("--data", default=None, help="dataset folder; for memory a folder with train/<class>/ and "
                        "val/<class>/ (default: a synthetic stream)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="ImageNet mean/std normalisation (default: on for memory, off for the paper's streams)")
    parser.add_argument("--num-experiences", type=int, default=2)
    parser.add_argument("--classes-per-experience", type=int, default=2)
    parser.add_argument("--max-train-per-class", type=int, default=None)
    parser.add_argument("--max-test-per-class", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=32, help="input side in pixels")
    parser.add_argument("--backbone", default="tiny", help="timm ViT name, or 'tiny' (random 2-block ViT, tests)")
    parser.add_argument("--checkpoint", default=None, help="local weights file for the backbone")
    parser.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (downloads)")
    parser.add_argument("--timm-kwargs", default="{}", help="JSON dict passed to timm.create_model")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16 autocast for every method (InfLoRA's own switch, a plugin for the others)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's)")
    parser.add_argument("--hparams", default="{}", help='JSON overrides per method, e.g. {"ewc": {"ewc_lambda": 100}}')
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiply every method's learning rates (the same factor for all: short CPU budgets)")
    parser.add_argument("--no-isolate", action="store_true", help="run every method in this process")
    return parser.parse_args(argv)


def validate(args: argparse.Namespace) -> dict[str, Any]:
    from inflora_avalanche.baselines.methods import DEFAULT_HPARAMS, METHODS

    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        fail(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds:
        fail("--seeds must name at least one seed")
    for name in ("num_experiences", "classes_per_experience", "resolution", "epochs", "batch_size", "eval_batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_per_class", "max_test_per_class"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_workers < 0:
        fail("--num-workers must be >= 0")
    if not args.lr_scale > 0:
        fail(f"--lr-scale must be positive, got {args.lr_scale}")
    if args.threads is not None and args.threads < 1:
        fail("--threads must be >= 1")
    parsed = {}
    for name in ("timm_kwargs", "hparams"):
        try:
            parsed[name] = json.loads(getattr(args, name))
        except json.JSONDecodeError as err:
            fail(f"--{name.replace('_', '-')} is not valid JSON ({err})")
        if not isinstance(parsed[name], dict):
            fail(f"--{name.replace('_', '-')} must be a JSON object")
    for method, values in parsed["hparams"].items():
        if method not in DEFAULT_HPARAMS or not isinstance(values, dict):
            fail(f"--hparams keys must be method names with an object of settings, got {method!r}")
        bad = sorted(set(values) - set(DEFAULT_HPARAMS[method]))
        if bad:
            fail(f"--hparams: {method} has no setting(s) {', '.join(bad)}; it has {', '.join(DEFAULT_HPARAMS[method])}")
    if args.benchmark == "memory" and args.data is not None:
        root = Path(args.data).expanduser()
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            fail(f"--data {root} must be a folder with train/<class>/ and val/<class>/ subfolders")
    if args.benchmark != "memory" and args.data is None:
        fail(f"--benchmark {args.benchmark} needs --data, the dataset's folder")
    if args.checkpoint is not None and not Path(args.checkpoint).expanduser().is_file():
        fail(f"--checkpoint {args.checkpoint} does not exist")
    if args.backbone == "tiny" and (args.checkpoint or args.pretrained):
        fail("--backbone tiny is a random test ViT; name a timm model to load weights")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out {out} already exists and is not empty; results are never overwritten, choose a new folder")
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda requested but no CUDA device is available; use --device cpu")
    return {"methods": methods, "seeds": seeds, "device": device, **parsed}


def machine_description(device: str, threads: Any = None) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
            f"{threads or torch.get_num_threads()} torch thread(s) per run, torch {torch.__version__}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    checked = validate(args)
    from inflora_avalanche.baselines.methods import Settings
    from inflora_avalanche.baselines.runner import BackboneConfig, RunSpec, run_isolated, run_method
    from inflora_avalanche.baselines.streams import StreamConfig, StreamDataError, build_stream
    from inflora_avalanche.baselines.table import aggregate, plot_curves, to_markdown

    stream = StreamConfig(
        num_experiences=args.num_experiences, classes_per_experience=args.classes_per_experience,
        max_train_per_class=args.max_train_per_class, max_test_per_class=args.max_test_per_class,
        resolution=args.resolution, root=None if args.data is None else str(Path(args.data).expanduser()),
        normalize=args.normalize, benchmark=args.benchmark,
    )
    try:
        build_stream(stream)  # fail here, in one line, rather than in every run
    except (StreamDataError, ValueError) as err:
        fail(str(err))
    backbone = BackboneConfig(
        name=args.backbone, checkpoint=args.checkpoint, pretrained=args.pretrained,
        timm_kwargs=tuple(sorted(checked["timm_kwargs"].items())),
    )
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + argv)
    started = time.time()
    results = []
    for seed in checked["seeds"]:
        for method in checked["methods"]:
            spec = RunSpec(
                method=method, seed=seed, stream=stream, backbone=backbone, epochs=args.epochs,
                batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, device=checked["device"],
                precision=args.precision, num_workers=args.num_workers, threads=args.threads,
                hparams=checked["hparams"], lr_scale=args.lr_scale,
            )
            print(f"[{time.time() - started:7.0f} s] {method}, seed {seed}", flush=True)
            result = run_method(spec, log=print) if args.no_isolate else run_isolated(spec)
            if result["status"] != "ok":
                print(f"    {result['status']}: {result['reason']}", flush=True)
            (out / "runs" / f"{method}-seed{seed}.json").write_text(json.dumps(result, indent=1))
            results.append(result)
    rows = aggregate(results, order=checked["methods"])
    meta = {
        "command": command,
        "machine": machine_description(checked["device"], args.threads),
        "stream": stream.describe(),
        "backbone": args.backbone + (f" ({args.checkpoint})" if args.checkpoint else ""),
        "epochs": args.epochs, "batch_size": args.batch_size, "precision": args.precision,
        "device": checked["device"], "seeds": checked["seeds"],
        "lr_scale": args.lr_scale,
        "hparams": {
            m: Settings(num_classes=1, num_experiences=1, hparams=checked["hparams"], lr_scale=args.lr_scale)
            .method_hparams(m) for m in checked["methods"]
        },
        "total_time_s": time.time() - started,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": results}, indent=1))
    table = to_markdown(rows)
    memory_kind = next((r.get("memory_kind") for r in rows if r.get("memory_kind")), "")
    (out / "results.md").write_text(
        f"# Baseline comparison\n\nCommand: `{command}`\n\nMachine: {meta['machine']}\n\n"
        f"Stream: {meta['stream']}; backbone {meta['backbone']}; {args.epochs} epoch(s), batch {args.batch_size}, "
        f"learning rates x{args.lr_scale:g}, "
        f"{args.precision}; seeds {', '.join(map(str, checked['seeds']))}. Mean ± sample std over seeds. "
        f"Peak memory: {memory_kind}. Trainable params: tensors updated in one experience.\n\n{table}"
    )
    plot_curves(rows, str(out / "curves.png"), title=stream.describe())
    print(table)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
