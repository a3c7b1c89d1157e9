"""Continual-learning results: the accuracy matrix, ``A_t``, ``A_last``, ``A_avg``, forgetting, mean ± std, plots.

Conventions (all accuracies in percent):

- ``matrix[t][j]``: accuracy on test experience ``j`` after training experience ``t`` (``None`` for ``j > t``).
- ``A_t``: accuracy on the union of the test data of experiences ``0..t`` (every class seen so far), i.e. the mean of
  ``matrix[t][0..t]`` **weighted by the test-set sizes** — what the paper reports; it equals the plain mean of the
  row only when the experiences have equally many test samples.
- ``A_last = A_{T-1}``; ``A_avg`` = plain mean of the ``A_t`` curve over the T experiences.
- forgetting of experience ``j < T-1``: ``max_{t in [j, T-2]} matrix[t][j] - matrix[T-1][j]`` (Chaudhry et al., 2018);
  average forgetting is its plain mean over ``j = 0..T-2`` (undefined, ``None``, for a single experience).
- task-aware accuracy: the prediction is restricted to the classes of the sample's own task (the task id is given).
- over seeds: mean and sample standard deviation (``ddof=1``; ``None`` for a single seed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

Matrix = Sequence[Sequence[Optional[float]]]


def _check_matrix(matrix: Matrix) -> int:
    T = len(matrix)
    for t, row in enumerate(matrix):
        if len(row) < t + 1 or any(row[j] is None for j in range(t + 1)):
            raise ValueError(f"row {t} of the accuracy matrix must hold accuracies for experiences 0..{t}, got {row}")
    return T


def incremental_accuracies(matrix: Matrix, test_sizes: Sequence[int]) -> list[float]:
    """``A_t`` for every ``t``: accuracy on the test data of experiences ``0..t``, weighted by ``test_sizes``."""
    T = _check_matrix(matrix)
    if len(test_sizes) < T or any(n <= 0 for n in test_sizes[:T]):
        raise ValueError(f"need a positive test-set size for each of the {T} experiences, got {list(test_sizes)}")
    curve = []
    for t in range(T):
        total = sum(test_sizes[: t + 1])
        curve.append(sum(float(matrix[t][j]) * test_sizes[j] for j in range(t + 1)) / total)
    return curve


def average_incremental_accuracy(curve: Sequence[float]) -> float:
    """``A_avg``: the plain mean of the ``A_t`` curve."""
    if not curve:
        raise ValueError("the A_t curve is empty")
    return float(sum(curve) / len(curve))


def forgetting_per_experience(matrix: Matrix) -> list[float]:
    """Forgetting of experiences ``0..T-2`` after the last one: best earlier accuracy minus final accuracy."""
    T = _check_matrix(matrix)
    return [max(float(matrix[t][j]) for t in range(j, T - 1)) - float(matrix[T - 1][j]) for j in range(T - 1)]


def average_forgetting(matrix: Matrix) -> Optional[float]:
    """Mean forgetting over experiences ``0..T-2``; ``None`` when there is only one experience."""
    values = forgetting_per_experience(matrix)
    return float(sum(values) / len(values)) if values else None


def mean_std(values: Sequence[Optional[float]]) -> dict:
    """``{"mean", "std", "n"}`` of the non-``None`` values (sample std, ``None`` below two values)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": mean, "std": std, "n": len(xs)}


def seed_result(
    matrix: Matrix,
    test_sizes: Sequence[int],
    task_aware_matrix: Optional[Matrix] = None,
    **extra: Any,
) -> dict:
    """Everything reported for one run: the matrices, ``A_t``, ``A_last``, ``A_avg``, forgetting, task-aware accuracy."""
    curve = incremental_accuracies(matrix, test_sizes)
    T = len(curve)
    out = {
        **extra,
        "test_sizes": list(test_sizes[:T]),
        "accuracy_matrix": [[None if v is None else float(v) for v in row] for row in matrix],
        "A_t": curve,
        "A_last": curve[-1],
        "A_avg": average_incremental_accuracy(curve),
        "forgetting": average_forgetting(matrix),
        "forgetting_per_experience": forgetting_per_experience(matrix),
    }
    if task_aware_matrix is not None:
        ta_curve = incremental_accuracies(task_aware_matrix, test_sizes)
        out.update(
            task_aware_matrix=[[None if v is None else float(v) for v in row] for row in task_aware_matrix],
            task_aware_A_t=ta_curve,
            task_aware_last=ta_curve[-1],
        )
    return out


def joint_result(
    matrix: Matrix,
    test_sizes: Sequence[int],
    task_aware_matrix: Optional[Matrix] = None,
    **extra: Any,
) -> dict:
    """The result of a joint run (all experiences trained at once, evaluated once): one row over every test
    experience; ``A_t`` has one value, and there is no ``A_avg`` or forgetting."""
    row = [float(v) for v in matrix[-1]]
    if len(row) != len(test_sizes) or any(v is None for v in row):
        raise ValueError(f"a joint run needs an accuracy for each of the {len(test_sizes)} test experiences, got {row}")
    total = sum(test_sizes)
    a_last = sum(a * n for a, n in zip(row, test_sizes)) / total
    out = {**extra, "joint": True, "test_sizes": list(test_sizes), "accuracy_matrix": [row], "A_t": [a_last],
           "A_last": a_last, "A_avg": None, "forgetting": None, "forgetting_per_experience": []}
    if task_aware_matrix is not None:
        ta = [float(v) for v in task_aware_matrix[-1]]
        ta_last = sum(a * n for a, n in zip(ta, test_sizes)) / total
        out.update(task_aware_matrix=[ta], task_aware_A_t=[ta_last], task_aware_last=ta_last)
    return out


def aggregate(seed_results: Sequence[dict]) -> dict:
    """Mean ± std over seeds of ``A_last``, ``A_avg``, forgetting, task-aware accuracy, and of each ``A_t``."""
    if not seed_results:
        raise ValueError("no seed results to aggregate")
    out: dict = {"seeds": [r.get("seed") for r in seed_results]}
    for key in ("A_last", "A_avg", "forgetting", "task_aware_last"):
        out[key] = mean_std([r.get(key) for r in seed_results])
    lengths = {len(r["A_t"]) for r in seed_results}
    if len(lengths) == 1:
        T = lengths.pop()
        out["A_t"] = [mean_std([r["A_t"][t] for r in seed_results]) for t in range(T)]
        if all("task_aware_A_t" in r for r in seed_results):
            out["task_aware_A_t"] = [mean_std([r["task_aware_A_t"][t] for r in seed_results]) for t in range(T)]
        width = len(seed_results[0]["accuracy_matrix"][0])
        out["accuracy_matrix_mean"] = [
            [mean_std([r["accuracy_matrix"][t][j] for r in seed_results])["mean"]
             if j <= t or _is_joint(seed_results) else None for j in range(width)]
            for t in range(T)
        ]
    return out


def _is_joint(seed_results: Sequence[dict]) -> bool:
    return bool(seed_results and seed_results[0].get("joint"))


def format_value(stat: dict, digits: int = 2) -> str:
    """``"86.51 ± 0.73"``, or ``"86.51"`` for one seed, or ``"n/a"``."""
    if stat.get("mean") is None:
        return "n/a"
    if stat.get("std") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_summary(results: dict) -> str:
    """A readable summary of ``results.json``'s content."""
    agg = results["aggregate"]
    seeds = agg["seeds"]
    lines = []
    if results.get("demo"):
        lines.append("DEMO run (scikit-learn digits, tiny random-init ViT): checks the pipeline, NOT the benchmark.")
    bench = results.get("benchmark", {})
    lines.append(
        f"{results.get('method_label', 'InfLoRA')}, preset {results.get('preset')!r}: {bench.get('name')} with {bench.get('num_classes')} classes in "
        f"{bench.get('n_experiences')} experiences; backbone {results.get('config', {}).get('backbone')}"
    )
    n = len(seeds)
    lines.append(f"seeds: {' '.join(str(s) for s in seeds)}" + (f" (mean ± sample std over {n} seeds)" if n > 1 else ""))
    lines.append("")
    if "A_t" in agg:
        lines.append("after experience t:  A_t (all seen classes)   task-aware")
        ta = agg.get("task_aware_A_t")
        for t, stat in enumerate(agg["A_t"]):
            right = format_value(ta[t]) if ta else "-"
            lines.append(f"  t={t + 1:<3d}             {format_value(stat):>16s}   {right:>16s}")
        lines.append("")
    published = results.get("published") or {}
    for key, label in (("A_last", "A_last"), ("A_avg", "A_avg"), ("forgetting", "forgetting"),
                       ("task_aware_last", "task-aware A_last")):
        text = f"{label:<18s} {format_value(agg[key]):>16s}"
        if key in published:
            text += f"   (published: {published[key]})"
        lines.append(text)
    if results.get("runtime_s") is not None:
        lines.append(f"{'runtime':<18s} {results['runtime_s']:>14.1f} s")
    lines.append("")
    lines.append(
        "A_t: accuracy (%) on the test data of all classes seen so far (sample-weighted); A_avg: mean of the A_t "
        "curve; forgetting: mean over old experiences of (best earlier accuracy - final accuracy)."
    )
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_curve(results: dict, path: Union[str, Path]) -> Path:
    """PNG of ``A_t`` against the number of experiences learned: one thin line per seed, the mean in bold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    runs = results["seeds"]
    for r in runs:
        xs = range(1, len(r["A_t"]) + 1)
        ax.plot(xs, r["A_t"], color="tab:blue", alpha=0.3 if len(runs) > 1 else 1.0, lw=1, marker="o", ms=3,
                label=None if len(runs) > 1 else "A_t")
    agg = results["aggregate"]
    if len(runs) > 1 and "A_t" in agg:
        xs = range(1, len(agg["A_t"]) + 1)
        ax.plot(xs, [s["mean"] for s in agg["A_t"]], color="tab:blue", lw=2.5, marker="o", label="A_t (mean over seeds)")
    if "task_aware_A_t" in agg:
        xs = range(1, len(agg["task_aware_A_t"]) + 1)
        ax.plot(xs, [s["mean"] for s in agg["task_aware_A_t"]], color="tab:green", ls="--", lw=1.5,
                label="task-aware accuracy")
    ax.set_xticks(range(1, len(runs[0]["A_t"]) + 1))
    ax.set_xlabel("experiences learned (t)")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    title = f"{results.get('preset')}: A_last {format_value(agg['A_last'])}, A_avg {format_value(agg['A_avg'])}"
    ax.set_title(("DEMO - " if results.get("demo") else "") + title, fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy_matrix(results: dict, path: Union[str, Path]) -> Path:
    """PNG heat map of the accuracy matrix (task trained x task tested), averaged over seeds."""
    import numpy as np

    plt = _pyplot()
    agg = results["aggregate"]
    matrix = agg.get("accuracy_matrix_mean") or results["seeds"][0]["accuracy_matrix"]
    T = len(matrix)
    data = np.array([[np.nan if v is None else v for v in row[:T]] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * T, 1.2 + 0.4 * T), dpi=120)
    image = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=100, cmap="viridis")
    if T <= 20:
        for t in range(T):
            for j in range(t + 1):
                ax.text(j, t, f"{data[t, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if data[t, j] < 60 else "black")
    ax.set_xticks(range(T), [str(j + 1) for j in range(T)], fontsize=7)
    ax.set_yticks(range(T), [str(t + 1) for t in range(T)], fontsize=7)
    ax.set_xlabel("experience tested")
    ax.set_ylabel("after training experience")
    ax.set_title(("DEMO - " if results.get("demo") else "") + "class-incremental accuracy (%)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
