#!/usr/bin/env python
"""Throughput of InfLoRA's training step, covariance pass and evaluation, fast path vs the reference's way.

For each number of finished tasks it builds an ``InfLoRAViT`` with that many finished branches (random designed
``down`` rows, random ``up``; speed does not depend on the values) plus an open current task, and measures in the
same run, one mode after the other:

- ``fast``: this project's path. Finished branches merged into ``qkv``, bf16 autocast on CUDA (``--precision``),
  timm's fused attention, fused Adam on CUDA, the loss accumulated on the device (no ``.item()`` per step),
  covariance accumulated on the device (``collect_input_covariances``), optional ``torch.compile`` (``--compile``).
- ``resum``: the core's unmerged state (``model.unmerge()``): all finished branches re-summed in one low-rank path at
  every forward, fp32; otherwise as ``fast``.
- ``paper``: an emulation of the reference implementation: fp32 (no TF32), at every forward each layer rebuilds dense
  key and value weight deltas by summing ``up_t @ down_t`` over all tasks and applies them as two extra dense
  matmuls, unfused (manual) attention, non-fused Adam, ``loss.item()`` every step, and the covariance summed on the
  host with a device-to-host copy per layer per batch.

Figures: images/s of a training step (forward, backward, optimiser step), of the covariance pass (no-grad forward
with the covariance hooks) and of evaluation (no-grad forward over all heads, accuracy counted), and the peak
allocated device memory (CUDA only). Prints a table and writes JSON (``--out``).

Options shared with the runner (``inflora-avalanche run``) have its names: ``--batch-size``, ``--cpu-threads``,
``--resolution``, ``--rank``, ``--precision``, ``--backbone``, ``--device``, ``--out``, ``--overwrite`` (the old
``--batch`` and ``--threads`` still work).

CPU (CI-sized):   python benchmarks/throughput.py --backbone vit_tiny_patch16_224 --depth 2 --resolution 32 \
                      --batch-size 4
GPU (the issue):  python benchmarks/throughput.py --device cuda --backbone vit_base_patch16_224 --batch-size 128 \
                      --resolution 224 --tasks-finished 0 49 --out throughput_h100.json
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from inflora_avalanche.run.options import ScriptHelpFormatter, ScriptParser, script_main
from inflora_avalanche.run.options import ScriptUsageError as UsageError

MODES = ("fast", "resum", "paper")
GIB = 1024**3


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0], formatter_class=ScriptHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm ViT name (random weights)")
    p.add_argument("--depth", type=int, default=None, help="override the backbone's number of blocks")
    p.add_argument("--embed-dim", type=int, default=None, help="override the backbone's width")
    p.add_argument("--num-heads", type=int, default=None, help="override the backbone's attention heads")
    p.add_argument("--patch-size", type=int, default=None, help="override the backbone's patch size")
    p.add_argument("--resolution", type=int, default=32, help="input side in pixels")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=8, help="minibatch size")
    p.add_argument("--rank", type=int, default=10, help="InfLoRA rank per task")
    p.add_argument("--classes-per-task", type=int, default=10, help="classes (head width) of every task")
    p.add_argument("--tasks-finished", type=int, nargs="+", default=[0, 9, 49],
                   help="numbers of finished tasks to measure at")
    p.add_argument("--modes", default="fast,paper", help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="fast mode's precision: auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast mode's backbone (falls back to eager)")
    p.add_argument("--augment", action="store_true",
                   help="feed uint8 --source-resolution images through DeviceAugment inside every step")
    p.add_argument("--source-resolution", type=int, default=32, help="stored image side with --augment")
    p.add_argument("--steps", type=int, default=5, help="timed iterations per figure")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before each figure")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole sweep, modes interleaved, and keep each figure's best round")
    p.add_argument("--cpu-threads", "--threads", dest="cpu_threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--out", type=Path, default=None, help="write the JSON results here (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="allow --out to replace an existing file")
    args = p.parse_args(argv)

    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        raise UsageError(f"--modes must list some of {', '.join(MODES)}, got {bad or 'nothing'}")
    if len(set(args.modes)) != len(args.modes):
        raise UsageError("--modes lists a mode twice")
    for name in ("resolution", "batch_size", "rank", "classes_per_task", "steps", "source_resolution", "rounds"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if any(n < 0 for n in args.tasks_finished):
        raise UsageError(f"--tasks-finished must be >= 0, got {args.tasks_finished}")
    args.tasks_finished = sorted(set(args.tasks_finished))
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise UsageError(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a torch device (use cpu or cuda)") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available on this machine")
    if args.device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {args.device}")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it or choose another --out")
    return args


# ------------------------------------------------------------------------------------------------- model setup
def _orthonormal_rows(rank: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float64))
    return (q.T / math.sqrt(3.0)).float()


def _design_branch(model: Any, gen: torch.Generator) -> None:
    for _, adapter in model.adapters():
        adapter.set_down(_orthonormal_rows(adapter.rank, adapter.in_features, gen))
        with torch.no_grad():
            adapter.up.copy_(0.01 * torch.randn(adapter.up.shape, generator=gen))


def build_model(args: argparse.Namespace, tasks_finished: int) -> Any:
    """An ``InfLoRAViT`` (random weights) with ``tasks_finished`` finished tasks and one open, designed task, on CPU."""
    from inflora_avalanche import InfLoRAViT

    kwargs = {"img_size": args.resolution}
    for name in ("depth", "embed_dim", "num_heads", "patch_size"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    torch.manual_seed(args.seed)
    total_classes = args.classes_per_task * (tasks_finished + 1)
    model = InfLoRAViT(args.backbone, rank=args.rank, num_classes=total_classes, **kwargs)
    gen = torch.Generator().manual_seed(args.seed + 1)
    c = args.classes_per_task
    for t in range(tasks_finished):
        model.start_task(range(t * c, (t + 1) * c))
        _design_branch(model, gen)
        model.finish_task()
    model.start_task(range(tasks_finished * c, (tasks_finished + 1) * c))
    _design_branch(model, gen)
    return model


def _paper_qkv_forward(adapter: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference's per-forward re-sum: dense k and v deltas rebuilt from every task's branch, applied densely."""
    a, r = adapter.row_ranges[0][0], adapter.rank

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = adapter.base_layer(x)
        downs = [adapter.past_down[i : i + r] for i in range(0, adapter.num_finished, r)] + [adapter.down]
        ups = [adapter.past_up[:, i : i + r] for i in range(0, adapter.num_finished, r)] + [adapter.up]
        weight_k = torch.stack([u[:a] @ d for u, d in zip(ups, downs)]).sum(0)
        weight_v = torch.stack([u[a:] @ d for u, d in zip(ups, downs)]).sum(0)
        q, k, v = out.split(a, dim=-1)
        return torch.cat([q, k + F.linear(x, weight_k), v + F.linear(x, weight_v)], dim=-1)

    return forward


def configure_mode(model: Any, mode: str) -> None:
    """Put ``model`` in ``mode``'s state (merged or not, forward of the adapters, attention kernel)."""
    if mode == "fast":
        model.merge()
        return
    model.unmerge()
    if mode == "paper":
        for _, adapter in model.adapters():
            adapter.forward = _paper_qkv_forward(adapter)
        for block in model.backbone.blocks:
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = False


def set_matmul_precision(device: torch.device, mode: str) -> None:
    # fast / resum may use TF32 for whatever stays fp32; the reference ran plain fp32.
    if device.type == "cuda":
        torch.set_float32_matmul_precision("highest" if mode == "paper" else "high")


# ------------------------------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls.

    CUDA: the mean over ``steps`` calls, the device synced only at both ends (per-call syncs would hide the cost of
    host syncs inside ``fn``). CPU: the fastest of ``steps`` single calls, since a shared machine's contention only
    ever adds time.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        return (time.perf_counter() - start) / steps
    best = math.inf
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class Bench:
    """One model in one mode: the three measured callables share inputs, targets and the optimiser."""

    def __init__(self, args: argparse.Namespace, mode: str, tasks_finished: int) -> None:
        from inflora_avalanche.device_augment import DeviceAugment

        self.args, self.mode, self.device = args, mode, args.device
        self.tasks_finished = tasks_finished
        self.model = build_model(args, tasks_finished)
        configure_mode(self.model, mode)
        self.model.to(self.device).train()
        self.bf16 = mode == "fast" and (
            args.precision == "bf16" or (args.precision == "auto" and self.device.type == "cuda")
        )
        gen = torch.Generator().manual_seed(args.seed + 2)
        b = args.batch_size
        if args.augment:
            self.augment: Optional[DeviceAugment] = DeviceAugment(args.resolution, seed=args.seed)
            s = args.source_resolution
            self.x = torch.randint(0, 256, (b, 3, s, s), generator=gen, dtype=torch.uint8).to(self.device)
        else:
            self.augment = None
            self.x = torch.rand(b, 3, args.resolution, args.resolution, generator=gen).to(self.device)
        c = args.classes_per_task
        self.y = (tasks_finished * c + torch.randint(0, c, (b,), generator=gen)).to(self.device)
        self.columns = torch.arange(tasks_finished * c, (tasks_finished + 1) * c, device=self.device)
        self.local = torch.full((self.model.output_width,), -100, dtype=torch.long)
        self.local[tasks_finished * c :] = torch.arange(c)
        self.local = self.local.to(self.device)

        params = self.model.trainable_parameters()
        if mode == "paper":
            self.optimizer = torch.optim.Adam(params, lr=1e-4, foreach=False)
        else:
            fused = True if self.device.type == "cuda" else None
            self.optimizer = torch.optim.Adam(params, lr=1e-4, fused=fused)
        self.loss_sum = torch.zeros((), device=self.device)
        self.logged: list[float] = []
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.correct_host = 0
        self.features: Callable[[torch.Tensor], torch.Tensor] = self.model.backbone
        self.compile_status = "off"
        if mode == "fast" and args.compile:
            self._try_compile()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def inputs(self, training: bool) -> torch.Tensor:
        return self.x if self.augment is None else self.augment(self.x, training)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # InfLoRAViT.forward with a (possibly compiled) backbone
        model = self.model
        heads = model.forward_heads(self.features(x)).float()
        out = heads.new_full((x.shape[0], model.output_width), -1.0e4)
        out[:, model._class_index] = heads
        return out

    def _try_compile(self) -> None:
        eager = self.features
        try:
            self.features = torch.compile(self.model.backbone)
            self.train_step()  # compiles; errors surface here
            with torch.no_grad():
                self.eval_step()
            _sync(self.device)
            self.compile_status = "on"
        except Exception as err:  # noqa: BLE001 - any backend failure means: run eager
            msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            warnings.warn(f"torch.compile failed, running eager: {type(err).__name__}: {msg}")
            self.features = eager
            self.compile_status = f"failed ({type(err).__name__}: {msg})"
            self.optimizer.zero_grad(set_to_none=True)

    # --------------------------------------------------------------------------------------- the three figures
    def train_step(self) -> None:
        with self.autocast():
            out = self.logits(self.inputs(True))
        loss = F.cross_entropy(out[:, self.columns], self.local[self.y])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.mode == "paper":
            self.logged.append(loss.item())  # the reference logs the loss with a host sync per step
        else:
            self.loss_sum += loss.detach()

    @torch.no_grad()
    def eval_step(self) -> None:
        with self.autocast():
            out = self.logits(self.inputs(False))
        hits = (out.argmax(dim=1) == self.y).sum()
        if self.mode == "paper":
            self.correct_host += int(hits.item())
        else:
            self.correct += hits

    def covariance_pass(self, batches: int) -> None:
        if self.mode == "paper":
            self._host_covariance_pass(batches)
            return
        from inflora_avalanche.plugins import ForwardContext, collect_input_covariances

        prepare = None if self.augment is None else (lambda x: self.augment(x, True))
        forward = ForwardContext(prepare, self.autocast if self.bf16 else None)
        collect_input_covariances(self.model, [self.x] * batches, self.device, forward)

    @torch.no_grad()
    def _host_covariance_pass(self, batches: int) -> None:
        # The reference: per layer per batch, bmm + sum on the device, copy to the host, running mean on the host.
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def make_hook(name: str):
            def hook(_m: Any, args: tuple) -> None:
                x = args[0].detach()
                cur = torch.bmm(x.permute(0, 2, 1), x).sum(dim=0).cpu()
                n = x.shape[0] * x.shape[1]
                prev, k = sums.get(name), counts.get(name, 0)
                sums[name] = cur / n if prev is None else (prev * k + cur) / (k + n)
                counts[name] = k + n

            return hook

        handles = [a.register_forward_pre_hook(make_hook(n)) for n, a in self.model.adapters()]
        self.model.eval()
        try:
            for _ in range(batches):
                self.model.forward_features(self.inputs(True))
        finally:
            for h in handles:
                h.remove()
            self.model.train()

    def close(self) -> None:
        del self.optimizer, self.model, self.x
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def measure(args: argparse.Namespace, mode: str, tasks_finished: int) -> dict:
    """The figures of one mode at one number of finished tasks."""
    device = args.device
    set_matmul_precision(device, mode)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    bench = Bench(args, mode, tasks_finished)
    steps, warmup = args.steps, args.warmup
    peaks: dict[str, Optional[float]] = {}

    def peak(name: str) -> None:
        peaks[name] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    train_s = timed(bench.train_step, steps, warmup, device)
    peak("train")
    # CUDA: passes of `steps` batches (the plugin's unit is a whole pass); CPU: best single-batch pass
    per_pass = steps if device.type == "cuda" else 1
    cov_s = timed(lambda: bench.covariance_pass(per_pass), steps if per_pass == 1 else 1,
                  1 if warmup else 0, device) / per_pass
    peak("covariance")
    eval_s = timed(bench.eval_step, steps, warmup, device)
    peak("eval")
    result = _result(bench, train_s, cov_s, eval_s, peaks if device.type == "cuda" else None)
    bench.close()
    return result


def _result(bench: "Bench", train_s: float, cov_s: float, eval_s: float, peaks: Optional[dict]) -> dict:
    b = bench.args.batch_size
    loss = float(bench.loss_sum) if bench.mode != "paper" else float(sum(bench.logged))  # one sync, after timing
    return {
        "mode": bench.mode,
        "tasks_finished": bench.tasks_finished,
        "precision": "bf16" if bench.bf16 else "fp32",
        "merged": bench.mode == "fast",
        "compile": bench.compile_status,
        "train_img_s": b / train_s,
        "train_step_ms": 1000.0 * train_s,
        "covariance_img_s": b / cov_s,
        "eval_img_s": b / eval_s,
        "peak_mem_gib": max(peaks.values()) if peaks else None,
        "peak_mem_gib_by_phase": peaks,
        "finite_loss": math.isfinite(loss),
    }


def measure_interleaved(args: argparse.Namespace, tasks_finished: int) -> list[dict]:
    """CPU: all modes at once, alternating single iterations, each figure the best call of each mode.

    On a shared machine the load drifts between seconds; alternating the modes call by call puts them in the same
    windows, so their ratio is far steadier than with one mode after the other.
    """
    benches = {mode: Bench(args, mode, tasks_finished) for mode in args.modes}
    calls = {
        "train": lambda b: b.train_step(),
        "covariance": lambda b: b.covariance_pass(1),
        "eval": lambda b: b.eval_step(),
    }
    best = {mode: {fig: math.inf for fig in calls} for mode in benches}
    for fig, call in calls.items():
        for bench in benches.values():
            for _ in range(args.warmup):
                call(bench)
        for _ in range(args.steps):
            for mode, bench in benches.items():
                start = time.perf_counter()
                call(bench)
                best[mode][fig] = min(best[mode][fig], time.perf_counter() - start)
    results = [
        _result(bench, best[m]["train"], best[m]["covariance"], best[m]["eval"], None) for m, bench in benches.items()
    ]
    for bench in benches.values():
        bench.close()
    return results


def best_of_rounds(raw: list[dict]) -> list[dict]:
    """One row per (mode, finished tasks): each figure's best value over the rounds."""
    rows: dict[tuple, dict] = {}
    for r in raw:
        key = (r["mode"], r["tasks_finished"])
        if key not in rows:
            rows[key] = {k: v for k, v in r.items() if k != "round"}
            continue
        best = rows[key]
        for k in ("train_img_s", "covariance_img_s", "eval_img_s"):
            best[k] = max(best[k], r[k])
        best["train_step_ms"] = min(best["train_step_ms"], r["train_step_ms"])
        best["finite_loss"] = best["finite_loss"] and r["finite_loss"]
    return list(rows.values())


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def ratios(results: list[dict], baseline: str) -> list[dict]:
    """``fast / baseline`` per number of finished tasks, for every figure (memory: baseline / fast)."""
    by_key = {(r["mode"], r["tasks_finished"]): r for r in results}
    out = []
    for n in sorted({r["tasks_finished"] for r in results}):
        fast, base = by_key.get(("fast", n)), by_key.get((baseline, n))
        if fast is None or base is None:
            continue
        row = {"tasks_finished": n, "baseline": baseline}
        for key in ("train_img_s", "covariance_img_s", "eval_img_s"):
            row[key.replace("_img_s", "_speedup")] = fast[key] / base[key]
        if fast["peak_mem_gib"] and base["peak_mem_gib"]:
            row["memory_saving"] = base["peak_mem_gib"] / fast["peak_mem_gib"]
        out.append(row)
    return out


def step_growth(results: list[dict]) -> dict:
    """Per mode, training step time at the most finished tasks relative to the fewest (1.0 = no growth)."""
    growth = {}
    for mode in dict.fromkeys(r["mode"] for r in results):
        rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["tasks_finished"])
        if len(rows) > 1:
            growth[mode] = {
                "from_tasks": rows[0]["tasks_finished"],
                "to_tasks": rows[-1]["tasks_finished"],
                "step_time_ratio": rows[-1]["train_step_ms"] / rows[0]["train_step_ms"],
            }
    return growth


def format_table(results: list[dict], ratio_rows: list[dict], growth: dict) -> str:
    def mem(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"{'tasks done':>10} {'mode':>6} {'prec':>5} {'train img/s':>12} {'cov img/s':>10} {'eval img/s':>11} "
        f"{'step ms':>9} {'peak GiB':>9}"
    ]
    for r in results:
        lines.append(
            f"{r['tasks_finished']:>10} {r['mode']:>6} {r['precision']:>5} {r['train_img_s']:>12.1f} "
            f"{r['covariance_img_s']:>10.1f} {r['eval_img_s']:>11.1f} {r['train_step_ms']:>9.1f} {mem(r['peak_mem_gib']):>9}"
        )
    for row in ratio_rows:
        saving = f", memory x{row['memory_saving']:.2f} less" if "memory_saving" in row else ""
        lines.append(
            f"fast vs {row['baseline']} at {row['tasks_finished']} finished tasks: train x{row['train_speedup']:.2f}, "
            f"covariance x{row['covariance_speedup']:.2f}, eval x{row['eval_speedup']:.2f}{saving}"
        )
    for mode, g in growth.items():
        lines.append(
            f"{mode}: step time at {g['to_tasks']} finished tasks / at {g['from_tasks']}: {g['step_time_ratio']:.3f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    raw = []
    for round_ in range(args.rounds):
        for n in args.tasks_finished:
            if args.device.type == "cpu":
                rows = measure_interleaved(args, n)
            else:  # one mode at a time: peak memory must be the mode's own
                rows = [measure(args, mode, n) for mode in args.modes]
            for r in rows:
                r["round"] = round_
                raw.append(r)
                print(f"  round {round_}: {r['mode']} at {n} finished tasks: train {r['train_img_s']:.1f} img/s",
                      file=sys.stderr)
    results = best_of_rounds(raw)
    baseline = "paper" if "paper" in args.modes else ("resum" if "resum" in args.modes else None)
    ratio_rows = ratios(results, baseline) if baseline and "fast" in args.modes else []
    if "resum" in args.modes and baseline == "paper" and "fast" in args.modes:
        ratio_rows += ratios(results, "resum")
    growth = step_growth(results)
    config = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}
    report = {
        "benchmark": "throughput",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "config": config,
        "environment": environment(args.device),
        "results": results,
        "rounds": raw if args.rounds > 1 else None,
        "ratios": ratio_rows,
        "step_time_growth": growth,
    }
    print(format_table(results, ratio_rows, growth))
    return report


def main(argv: Optional[list[str]] = None) -> int:
    return script_main("throughput.py", parse_args, run, argv, user_errors=(ValueError,))  # an unknown timm model, a rank too large


if __name__ == "__main__":
    sys.exit(main())
