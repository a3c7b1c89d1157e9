"""Run one method with one seed on one stream: train experience by experience, evaluate, measure cost."""

from __future__ import annotations

import gc
import random
import re
import resource
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from .methods import JOINT_METHODS, MethodNotApplicable, Settings, UpdatedParameterCounter, build_strategy
from .streams import StreamConfig, build_stream


@dataclass(frozen=True)
class BackboneConfig:
    """How to create the (fresh, identical for every method) timm backbone.

    ``name="tiny"`` is a 2-block, 32-wide random ViT for tests; otherwise a timm model name, with weights from
    ``checkpoint`` (a local file) or ``pretrained`` (timm's download/cache).
    """

    name: str = "tiny"
    checkpoint: Optional[str] = None
    pretrained: bool = False
    timm_kwargs: tuple = ()  # (key, value) pairs, hashable and picklable

    def create(self, resolution: int) -> nn.Module:
        import timm

        from ..model import create_backbone

        if self.name == "tiny":
            kwargs = dict(img_size=resolution, patch_size=8, depth=2, embed_dim=32, num_heads=2)
            kwargs.update(dict(self.timm_kwargs))
            return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
        return create_backbone(self.name, pretrained=self.pretrained, checkpoint_path=self.checkpoint,
                               **dict(self.timm_kwargs))


@dataclass
class RunSpec:
    """Everything one run needs; picklable, so it can run in a fresh process."""

    method: str
    seed: int
    stream: StreamConfig
    backbone: BackboneConfig
    epochs: int = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    device: str = "cpu"
    precision: str = "fp32"
    num_workers: int = 0
    threads: Optional[int] = None  # torch CPU threads; None keeps torch's default
    hparams: dict = field(default_factory=dict)
    lr_scale: float = 1.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _proc_status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_memory(device: str) -> float:
    """Start a new peak-memory window; returns the baseline the peak is measured above (MiB).

    CUDA: resets the allocator's peak, baseline 0. CPU (Linux): resets the process's peak RSS (``VmHWM``, via
    ``/proc/self/clear_refs``) and returns the RSS now, i.e. libraries and data already loaded. Elsewhere the
    baseline is the lifetime peak RSS so far (``getrusage``), so a peak below it reads as 0.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        rss = _proc_status_mb("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_mb(device: str) -> tuple[float, str]:
    """Peak memory of the current window: CUDA max allocated, else the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm, "peak RSS above the process baseline (libraries and data loaded)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "max RSS above the process baseline"


_EXP_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/[^/]+/(?:Task\d+/)?Exp(\d+)$")
_STREAM_KEY = re.compile(r"^Top1_Acc_Stream/eval_phase/")


def parse_accuracies(metrics: dict) -> tuple[dict[int, float], Optional[float]]:
    """Per-experience and stream accuracy (in %) from Avalanche's last eval metrics."""
    per_exp: dict[int, float] = {}
    stream = None
    for key, value in metrics.items():
        match = _EXP_KEY.match(key)
        if match:
            per_exp[int(match.group(1))] = 100.0 * float(value)
        elif _STREAM_KEY.match(key):
            stream = 100.0 * float(value)
    return per_exp, stream


def run_method(spec: RunSpec, log: Callable[[str], None] = lambda _msg: None) -> dict[str, Any]:
    """Train ``spec.method`` on the stream and return its accuracies and costs (a JSON-able dict).

    ``acc_matrix[t][j]`` is the accuracy (%) on test experience j after training experience t (j <= t);
    ``A_t[t]`` the accuracy on the test data of all classes seen after t. A method that cannot run on the
    backbone comes back with ``status="n/a"`` and the reason; a crash with ``status="error"``.
    """
    result: dict[str, Any] = {
        "method": spec.method, "seed": spec.seed, "status": "ok", "reason": None, "joint": spec.method in JOINT_METHODS
    }
    try:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        benchmark = build_stream(spec.stream)
        num_exps = len(benchmark.train_stream)
        num_classes = 1 + max(int(c) for exp in benchmark.train_stream for c in exp.classes_in_this_experience)
        settings = Settings(
            num_classes=num_classes, num_experiences=num_exps, epochs=spec.epochs,
            batch_size=spec.batch_size, eval_batch_size=spec.eval_batch_size, device=spec.device,
            precision=spec.precision, seed=spec.seed, hparams=spec.hparams, lr_scale=spec.lr_scale,
        )
        gc.collect()
        baseline = reset_peak_memory(spec.device)
        seed_everything(spec.seed)
        backbone = spec.backbone.create(spec.stream.resolution)
        seed_everything(spec.seed)
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
        counter = UpdatedParameterCounter()
        strategy = build_strategy(spec.method, backbone, settings, evaluator, plugins=[counter])
        loader = {"num_workers": spec.num_workers}
        train_time = eval_time = 0.0
        acc_matrix: list[list[Optional[float]]] = []
        a_t: list[float] = []
        if spec.method in JOINT_METHODS:
            start = time.perf_counter()
            strategy.train(benchmark.train_stream, eval_streams=[], **loader)
            train_time = time.perf_counter() - start
            start = time.perf_counter()
            per_exp, stream_acc = parse_accuracies(strategy.eval(benchmark.test_stream, **loader))
            eval_time = time.perf_counter() - start
            acc_matrix.append([per_exp.get(j) for j in range(num_exps)])
            a_t.append(float(stream_acc))
            log(f"{spec.method} seed {spec.seed}: joint A_last {stream_acc:.2f}")
        else:
            for t, experience in enumerate(benchmark.train_stream):
                start = time.perf_counter()
                strategy.train(experience, eval_streams=[], **loader)
                train_time += time.perf_counter() - start
                start = time.perf_counter()
                per_exp, stream_acc = parse_accuracies(strategy.eval(benchmark.test_stream[: t + 1], **loader))
                eval_time += time.perf_counter() - start
                acc_matrix.append([per_exp.get(j) for j in range(num_exps)])
                a_t.append(float(stream_acc))
                log(f"{spec.method} seed {spec.seed}: after experience {t}: A_t {stream_acc:.2f} "
                    f"({train_time:.0f} s training so far)")
        peak, kind = peak_memory_mb(spec.device)
        result.update(
            acc_matrix=acc_matrix,
            A_t=a_t,
            trainable_params=max(counter.per_experience, default=0),
            trainable_params_total=counter.total,
            train_time_s=train_time,
            eval_time_s=eval_time,
            peak_memory_mb=max(0.0, peak - baseline),
            process_baseline_mb=baseline,
            memory_kind=kind,
        )
    except MethodNotApplicable as err:
        result.update(status="n/a", reason=str(err))
    except Exception as err:  # one failing method must not lose the others' results
        result.update(status="error", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    result["spec"] = _spec_dict(spec)
    return result


def _spec_dict(spec: RunSpec) -> dict[str, Any]:
    out = asdict(spec)
    out["backbone"]["timm_kwargs"] = dict(spec.backbone.timm_kwargs)
    return out


def _child(spec: RunSpec, queue: Any) -> None:
    queue.put(run_method(spec, log=lambda msg: print(msg, flush=True)))


def run_isolated(spec: RunSpec) -> dict[str, Any]:
    """:func:`run_method` in a fresh spawned process, so that peak memory and timings are the method's own."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(spec, queue))
    process.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=5.0)
        except Exception:  # queue.Empty: still running, or died
            if not process.is_alive():
                break
    process.join()
    if result is None:
        return {"method": spec.method, "seed": spec.seed, "status": "error",
                "reason": f"worker process exited with code {process.exitcode} (out of memory?)",
                "spec": _spec_dict(spec)}
    return result
