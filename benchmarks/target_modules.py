"""InfLoRA with branches on different layers, same stream, backbone, budget and seeds: accuracy, forgetting,
trainable parameters and time per experience. Each variant is one ``inflora-avalanche run`` in a fresh process.

    python benchmarks/target_modules.py --data-root TINY_IMAGENET_100 --weights DINOV2_S_WEIGHTS --out OUT

Writes ``OUT/<variant>/`` (each run's own results) and ``OUT/target_modules.json``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from inflora_avalanche.run.options import ScriptHelpFormatter

VARIANTS = {  # name -> (output folder, --target-modules)
    "default (attn.qkv k,v)": ("attn_qkv", ["attn.qkv"]),
    "+ mlp.fc1": ("attn_qkv_mlp_fc1", ["attn.qkv", "mlp.fc1"]),
    "all-linear": ("all_linear", ["all-linear"]),
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: dict) -> dict:
    seeds = results["seeds"]
    per_seed = {key: [float(s[key]) for s in seeds] for key in ("A_last", "A_avg", "forgetting")}
    times = [t for s in seeds for t in s["train_time_s"]]
    return {
        **{key: dict(zip(("mean", "std"), _mean_std(values))) for key, values in per_seed.items()},
        "per_seed": per_seed,
        "trainable_params_per_experience": seeds[0]["trainable_params"][0],
        "train_time_per_experience_s": dict(zip(("mean", "std"), _mean_std(times))),
        "runtime_s": results["runtime_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=ScriptHelpFormatter)
    parser.add_argument("--data-root", required=True, help="the tiny-imagenet-100 folder")
    parser.add_argument("--weights", required=True, help="DINOv2-S weights file")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--preset", default="tinyimagenet_dinov2", help="preset of every variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every variant")
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once (each on the preset's CPU threads); "
                        "with as many jobs as variants they all share the machine alike")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
                    "preset": args.preset, "seeds": args.seeds,
                    "machine": f"{platform.machine()}, {platform.processor()}",
                    "date": time.strftime("%Y-%m-%d"), "variants": {}}
    pending = list(VARIANTS.items())
    running: list[tuple[str, Path, list[str], subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            name, (folder_name, targets) = pending.pop(0)
            folder = args.out / folder_name
            command = [sys.executable, "-m", "inflora_avalanche", "run", "--preset", args.preset, "--data-root",
                       args.data_root, "--weights", args.weights, "--seeds", *map(str, args.seeds),
                       "--target-modules", *targets, "--out", str(folder), "--no-progress"]
            print(f"[{name}] {' '.join(command[1:])}", flush=True)
            running.append((name, folder, targets, subprocess.Popen(command, stdout=subprocess.DEVNULL)))
        name, folder, targets, process = running.pop(0)
        if process.wait():
            print(f"[{name}] failed (exit {process.returncode}); see {folder}", file=sys.stderr)
            return process.returncode
        results = json.loads((folder / "results.json").read_text())
        report["variants"][name] = {"target_modules": targets, "folder": folder.name, **summarize(results)}
    report["variants"] = {name: report["variants"][name] for name in VARIANTS}
    (args.out / "target_modules.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n| targets | A_last (%) | A_avg (%) | forgetting (%) | trainable params / exp | train time / exp (s) |")
    print("|---|---|---|---|---|---|")
    for name, v in report["variants"].items():
        cells = [f"{v[k]['mean']:.2f} ± {v[k]['std']:.2f}" for k in ("A_last", "A_avg", "forgetting")]
        t = v["train_time_per_experience_s"]
        print(f"| {name} | {' | '.join(cells)} | {v['trainable_params_per_experience']:,} | "
              f"{t['mean']:.1f} ± {t['std']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
