"""Regenerate the plots of docs/diagnostics.md: a small class-incremental InfLoRA run on real images, on the CPU.

Tiny-ImageNet-100 (64 px JPEGs, resized to 56), a DINOv2-S/14 checkpoint, 5 experiences x 4 classes. Writes
``subspace_heatmaps.png``, ``summary.png``, ``subspace_diagnostics.json`` and ``.csv`` to ``--out``, and exports the
final model to check that the plain timm checkpoint predicts exactly like the strategy.

Options shared with the runner (``inflora-avalanche run``) have its names: ``--data-root``, ``--weights``, ``--out``,
``--overwrite``, ``--n-experiences``, ``--max-train-per-class``, ``--max-test-per-class``, ``--resolution``,
``--epochs``, ``--rank``, ``--lr``, ``--lamb``, ``--cpu-threads`` (the old ``--data``, ``--experiences``,
``--train-per-class``, ``--test-per-class``, ``--img-size`` and ``--threads`` still work).

    python experiments/diagnostics_demo.py --data-root /path/to/tiny-imagenet-100 \
        --weights /path/to/vit_small_patch14_dinov2.safetensors --max-train-per-class 40 --out docs/diagnostics
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from inflora_avalanche.io import atomic_write_json, list_images, open_rgb
from inflora_avalanche.run.cli import ScriptHelpFormatter

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, targets: list[int]) -> None:
        self.x, self.targets = x, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]


def load_split(root: Path, wnids: list[str], split: str, per_class: int, size: int) -> Images:
    """At most ``per_class`` images of each class (the first in name order)."""
    from torchvision.transforms.functional import pil_to_tensor, resize

    xs, ys = [], []
    for label, wnid in enumerate(wnids):
        files = list_images(root / split / wnid, recursive=False)[:per_class]
        if not files:
            raise ValueError(f"{root / split / wnid} holds no image files")
        for f in files:
            x = pil_to_tensor(open_rgb(f)).float() / 255.0
            xs.append((resize(x, [size, size], antialias=True) - MEAN) / STD)
            ys.append(label)
    return Images(torch.stack(xs), ys)


def summary_plot(records: list[dict], accuracy: list[float], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    exps = sorted({r["experience"] for r in records})

    def mean(metric: str) -> list[float]:
        out = []
        for e in exps:
            vals = [r[metric] for r in records if r["experience"] == e and r[metric] is not None]
            out.append(sum(vals) / len(vals) if vals else float("nan"))
        return out

    fig = Figure(figsize=(10, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    a, b, c = fig.subplots(1, 3)
    for metric, style in (("change_new", "o-"), ("random_down_old", "s--"), ("interference_old", "^-")):
        a.semilogy(exps, mean(metric), style, label=metric)
    a.set(title="relative change of layer k/v (mean over layers)", xlabel="experience")
    a.legend(fontsize=7)
    b.plot(exps, mean("energy_in_old"), "o-", label="energy of new input in old space")
    b.plot(exps, mean("memory_coverage"), "^-", label="task's input energy held by memory")
    b.plot(exps, mean("old_space_share"), "s-", label="old space / width")
    b.plot(exps, [records[[r["experience"] for r in records].index(e)]["threshold"] for e in exps], "k:",
           label="threshold ε_t")
    b.set(title="subspace memory (mean over layers)", xlabel="experience", ylim=(0, 1.05))
    b.legend(fontsize=6, loc="center", bbox_to_anchor=(0.5, 0.3))
    c.plot(exps, accuracy, "o-")
    c.set(title="accuracy on all seen classes (%)", xlabel="experience", ylim=(0, 100))
    for ax in (a, b, c):
        ax.set_xticks(exps)
        ax.title.set_fontsize(9)
    fig.savefig(path, dpi=120)


def replot(out: Path) -> int:
    from inflora_avalanche.diagnostics import FILE_NAMES, load_records, plot_heatmaps

    if not (out / FILE_NAMES[0]).is_file() or not (out / "run.json").is_file():
        print(f"error: {out} holds no finished run (subspace_diagnostics.json, run.json)", file=sys.stderr)
        return 2
    records = load_records(out / FILE_NAMES[0])
    plot_heatmaps(records, out / FILE_NAMES[2])
    summary_plot(records, json.loads((out / "run.json").read_text())["accuracy"], out / "summary.png")
    print(f"redrew the plots in {out}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=ScriptHelpFormatter)
    parser.add_argument("--data-root", "--data", dest="data_root", default=os.environ.get("INFLORA_TEST_DATA"),
                        help="the tiny-imagenet-100 folder (classes.tsv, train/<wnid>/, val/<wnid>/) "
                             "(default: $INFLORA_TEST_DATA)")
    parser.add_argument("--weights", default=os.environ.get("INFLORA_TEST_WEIGHTS"),
                        help="local DINOv2-S/14 checkpoint (.safetensors, timm key names) "
                             "(default: $INFLORA_TEST_WEIGHTS)")
    parser.add_argument("--out", default="docs/diagnostics", help="folder of the diagnostics files and plots")
    parser.add_argument("--n-experiences", "--experiences", dest="n_experiences", type=int, default=5,
                        help="number of experiences (tasks)")
    parser.add_argument("--classes-per-exp", type=int, default=4, help="classes of each experience")
    parser.add_argument("--max-train-per-class", "--train-per-class", dest="max_train_per_class", type=int,
                        default=50, help="at most this many training images per class")
    parser.add_argument("--max-test-per-class", "--test-per-class", dest="max_test_per_class", type=int, default=20,
                        help="at most this many test images per class")
    parser.add_argument("--resolution", "--img-size", dest="resolution", type=int, default=56,
                        help="input resolution in pixels")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per experience")
    parser.add_argument("--rank", type=int, default=8, help="InfLoRA: rank of each task's branches")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    parser.add_argument("--lamb", type=float, default=0.95, help="InfLoRA: threshold of the first task")
    parser.add_argument("--sample-images", type=int, default=32, help="diagnostics: images sampled per experience")
    parser.add_argument("--sample-tokens", type=int, default=256,
                        help="diagnostics: token vectors sampled per experience")
    parser.add_argument("--cpu-threads", "--threads", dest="cpu_threads", type=int, default=2,
                        help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, training and sampling")
    parser.add_argument("--overwrite", action="store_true", help="replace the diagnostics files already in --out")
    parser.add_argument("--replot", action="store_true", help="only redraw the plots from the files in --out")
    args = parser.parse_args(argv)
    if not args.replot:
        for name, variable in (("data_root", "INFLORA_TEST_DATA"), ("weights", "INFLORA_TEST_WEIGHTS")):
            if not getattr(args, name):
                parser.error(f"pass --{name.replace('_', '-')} or set {variable}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(Path(args.out))

    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from inflora_avalanche import InfLoRAStrategy, InfLoRAViT
    from inflora_avalanche.diagnostics import SubspaceDiagnosticsPlugin
    from inflora_avalanche.export import export_timm_checkpoint, load_exported

    torch.set_num_threads(args.cpu_threads)
    torch.manual_seed(args.seed)
    root, out = Path(args.data_root), Path(args.out)
    if not (root / "classes.tsv").is_file():
        print(f"error: {root} is not tiny-imagenet-100 (no classes.tsv); pass --data-root", file=sys.stderr)
        return 2
    rows = [line.split("\t") for line in (root / "classes.tsv").read_text().splitlines() if line.strip()]
    num_classes = args.n_experiences * args.classes_per_exp
    wnids = [r[1] for r in rows[:num_classes]]
    names = [r[2].split(",")[0].strip() for r in rows[:num_classes]]
    started = time.perf_counter()
    train = load_split(root, wnids, "train", args.max_train_per_class, args.resolution)
    test = load_split(root, wnids, "val", args.max_test_per_class, args.resolution)
    bench = class_incremental_benchmark(
        {"train": as_classification_dataset(train), "test": as_classification_dataset(test)},
        class_order=list(range(num_classes)), num_experiences=args.n_experiences,
    )
    timm_kwargs = {"img_size": args.resolution, "dynamic_img_size": True}
    model = InfLoRAViT("vit_small_patch14_dinov2", rank=args.rank, checkpoint_path=args.weights, **timm_kwargs)
    diagnostics = SubspaceDiagnosticsPlugin(
        sample_images=args.sample_images, sample_tokens=args.sample_tokens, out_dir=out, seed=args.seed,
        overwrite=args.overwrite,
    )
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    strategy = InfLoRAStrategy(
        model=model, lr=args.lr, lamb=args.lamb, train_mb_size=32, eval_mb_size=100, train_epochs=args.epochs,
        device="cpu", precision="fp32", plugins=[diagnostics], evaluator=evaluator,
    )
    print(f"data loaded in {time.perf_counter() - started:.1f} s: {len(train)} train / {len(test)} test images")

    accuracy, timings = [], []
    for t, experience in enumerate(bench.train_stream):
        t0 = time.perf_counter()
        strategy.train(experience)
        t1 = time.perf_counter()
        metrics = strategy.eval(bench.test_stream[: t + 1])
        accuracy.append(100.0 * metrics["Top1_Acc_Stream/eval_phase/test_stream"])
        timings.append(t1 - t0)
        last = [r for r in diagnostics.records if r["experience"] == t]
        mean = {k: sum(r[k] for r in last) / len(last) for k in ("change_new", "old_space_share")}
        print(f"experience {t}: A_t {accuracy[-1]:.1f}%  train+diagnostics {t1 - t0:.1f} s  "
              f"mean change_new {mean['change_new']:.3g}  "
              + (f"mean interference_old {sum(r['interference_old'] for r in last) / len(last):.3g}  "
                 f"mean random_down_old {sum(r['random_down_old'] for r in last) / len(last):.3g}" if t else ""))

    summary_plot(diagnostics.records, accuracy, out / "summary.png")

    # The exported plain timm model predicts what the strategy predicts on the same test images.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        export_timm_checkpoint(model, path, class_names=names, timm_kwargs=timm_kwargs)
        net, meta = load_exported(path)
        with torch.no_grad():
            exported = net(test.x).argmax(1)
            live = model.eval()(test.x).argmax(1)
        agree = int((exported == live).sum())
    print(f"export: {agree}/{len(test)} test predictions equal the strategy's ({meta['num_classes']} columns)")
    run_info = {"args": vars(args), "accuracy": accuracy, "train_seconds": timings, "export_agreement": [agree, len(test)],
                "total_seconds": time.perf_counter() - started, "class_names": names}
    atomic_write_json(out / "run.json", run_info, indent=1)
    print(f"done in {run_info['total_seconds']:.0f} s; plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
