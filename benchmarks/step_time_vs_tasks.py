"""Training step time against the number of finished tasks: InfLoRA (finished branches merged into the weights) and
SD-LoRA (every old branch stays live while training, its magnitude trains), on the same ViT, batch and rank.

    python benchmarks/step_time_vs_tasks.py --out step_time.json              # ViT-S/14 at 56 px, batch 16, CPU

Finished tasks are made with random factors (timing only). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from inflora_avalanche.run.options import ScriptHelpFormatter


def _model(method: str, args: argparse.Namespace):
    from inflora_avalanche import InfLoRAViT, SDLoRAViT

    cls = InfLoRAViT if method == "inflora" else SDLoRAViT
    torch.manual_seed(0)
    return cls(args.backbone, rank=args.rank, img_size=args.resolution, pretrained=False)


def _finish_random_tasks(model, tasks: int, per_task: int) -> None:
    with torch.no_grad():
        for t in range(tasks):
            model.start_task(range(t * per_task, (t + 1) * per_task))
            for _, adapter in model.adapters():
                if hasattr(adapter, "set_down"):
                    adapter.set_down(torch.randn_like(adapter.down) * 0.01)
                for p in adapter.trainable_parameters():
                    p.normal_(0, 0.01)
            model.finish_task()


def step_seconds(method: str, finished: int, args: argparse.Namespace) -> list[float]:
    model = _model(method, args)
    _finish_random_tasks(model, finished, args.classes_per_task)
    model.start_task(range(finished * args.classes_per_task, (finished + 1) * args.classes_per_task))
    params = model.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution)
    y = torch.randint(0, args.classes_per_task, (args.batch_size,))
    columns = torch.arange(finished * args.classes_per_task, (finished + 1) * args.classes_per_task)
    times = []
    model.train()
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x)[:, columns], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=ScriptHelpFormatter)
    parser.add_argument("--backbone", default="vit_small_patch14_dinov2")
    parser.add_argument("--resolution", type=int, default=56)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--classes-per-task", type=int, default=4)
    parser.add_argument("--finished-tasks", type=int, nargs="+", default=[0, 4, 9, 19, 49],
                        help="numbers of finished tasks to time the next task's step at")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="JSON file to write (optional)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.cpu_threads)
    rows = []
    for finished in args.finished_tasks:
        row = {"finished_tasks": finished}
        for method in ("inflora", "sd_lora"):
            times = step_seconds(method, finished, args)
            row[method] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
        rows.append(row)
        print(f"{finished:3d} finished: InfLoRA {row['inflora']['median_s'] * 1e3:7.1f} ms, "
              f"SD-LoRA {row['sd_lora']['median_s'] * 1e3:7.1f} ms", flush=True)
    base = {m: rows[0][m]["median_s"] for m in ("inflora", "sd_lora")}
    print("\n| finished tasks | InfLoRA step (ms) | x task 1 | SD-LoRA step (ms) | x task 1 |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[m]['median_s'] * 1e3:.1f} | {row[m]['median_s'] / base[m]:.2f}" for m in ("inflora", "sd_lora")]
        print(f"| {row['finished_tasks']} | {' | '.join(cells)} |")
    if args.out:
        report = {"settings": vars(args) | {"out": str(args.out)}, "torch": torch.__version__,
                  "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)", "rows": rows,
                  "date": time.strftime("%Y-%m-%d")}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
