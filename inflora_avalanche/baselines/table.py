"""Aggregate comparison runs: A_last, A_avg, forgetting and costs per method, mean ± std over seeds.

The metric definitions (forgetting, sample std over seeds) are those of :mod:`inflora_avalanche.results`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from ..results import average_forgetting, mean_std
from .methods import METHOD_LABELS

METRICS = ("A_last", "A_avg", "forgetting", "trainable_params", "train_time_s", "peak_memory_mb")
METRIC_HEADERS = {
    "A_last": "A_last (%)",
    "A_avg": "A_avg (%)",
    "forgetting": "Forgetting (%)",
    "trainable_params": "Trainable params",
    "train_time_s": "Train time (s)",
    "peak_memory_mb": "Peak memory (MiB)",
}


def run_metrics(result: dict[str, Any]) -> dict[str, Optional[float]]:
    """A_last, A_avg, forgetting and the costs of one successful run.

    A joint-training run is evaluated once, after all data: it has an A_last but no A_avg or forgetting.
    """
    a_t = list(result["A_t"])
    joint = bool(result.get("joint", False))
    return {
        "A_last": a_t[-1],
        "A_avg": None if joint else sum(a_t) / len(a_t),
        "forgetting": None if joint else average_forgetting(result["acc_matrix"]),
        "trainable_params": float(result["trainable_params"]),
        "train_time_s": float(result["train_time_s"]),
        "peak_memory_mb": float(result["peak_memory_mb"]),
    }


def aggregate(results: Iterable[dict[str, Any]], order: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """One row per method: mean and std of every metric over its successful seeds, the mean A_t curve, and
    the reason when the method could not run."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_method.setdefault(result["method"], []).append(result)
    methods = [m for m in (order or METHOD_LABELS) if m in by_method] + [
        m for m in by_method if m not in (order or METHOD_LABELS)
    ]
    rows = []
    for method in methods:
        runs = by_method[method]
        ok = [r for r in runs if r["status"] == "ok"]
        row: dict[str, Any] = {
            "method": method,
            "label": METHOD_LABELS.get(method, method),
            "seeds": sorted(r["seed"] for r in ok),
            "status": "ok" if ok else runs[0]["status"],
            "reason": None,
        }
        failed = [r for r in runs if r["status"] != "ok"]
        if failed:
            row["reason"] = "; ".join(sorted({f"{r['status']}: {r['reason']}" for r in failed}))
            row["failed_seeds"] = sorted(r["seed"] for r in failed)
        if ok:
            per_run = [run_metrics(r) for r in ok]
            for metric in METRICS:
                values = [m[metric] for m in per_run if m[metric] is not None]
                row[metric] = mean_std(values) if values else None
            curves = [r["A_t"] for r in ok]
            row["A_t"] = [mean_std([c[t] for c in curves])["mean"] for t in range(len(curves[0]))]
            row["memory_kind"] = ok[0].get("memory_kind")
        rows.append(row)
    return rows


def _cell(stat: Optional[dict], metric: str, show_std: bool) -> str:
    if stat is None:
        return "—"
    if metric == "trainable_params":
        return f"{stat['mean']:,.0f}"
    digits = 0 if metric in ("train_time_s", "peak_memory_mb") else 2
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if show_std and stat["std"] is not None else "")


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table in markdown; methods that could not run say why instead of disappearing."""
    header = ["Method", "Seeds"] + [METRIC_HEADERS[m] for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            reason = (row["reason"] or "").replace("|", "/").replace("\n", " ")
            lines.append(f"| {row['label']} | — | {row['status']}: " + reason.split(": ", 1)[-1] + " |"
                         + " |" * (len(METRICS) - 1))
            continue
        show_std = len(row["seeds"]) > 1
        cells = [_cell(row[m], m, show_std and m != "trainable_params") for m in METRICS]
        seeds = ",".join(str(s) for s in row["seeds"])
        if row.get("failed_seeds"):
            seeds += f" (failed: {','.join(str(s) for s in row['failed_seeds'])})"
        lines.append(f"| {row['label']} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """A_t after each experience for every method (joint training: a dashed line at its final accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.0, 5.0))
    ax.set_prop_cycle(color=plt.get_cmap("tab10").colors)
    num_steps = max((len(r["A_t"]) for r in rows if r["status"] == "ok"), default=1)
    for row in rows:
        if row["status"] != "ok":
            continue
        curve = row["A_t"]
        if len(curve) == 1 and num_steps > 1:
            ax.axhline(curve[0], linestyle="--", color="black", label=f"{row['label']} (final)")
        else:
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=row["label"])
    ax.set_xlabel("experiences learned (t)")
    ax.set_ylabel("A_t: accuracy on all seen classes (%)")
    ax.set_xticks(range(1, num_steps + 1))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
