"""Subspace diagnostics of InfLoRA: what the memory holds, and how much a new branch disturbs old tasks' layers.

Per experience ``t`` and adapted layer ``l``:

- ``memory_size`` / ``memory_kind`` / ``old_space_share``: the DualGPM memory after the update of task ``t``
  (``old_space_share`` = dimension of the old tasks' input space / layer width, whatever the memory kind);
- ``threshold``: the energy threshold ``eps_t`` the update used;
- ``memory_coverage``: share of task ``t``'s input energy (after training) that the updated memory's old-task space
  holds. The threshold counts squared covariance eigenvalues, this counts plain energy, so it is usually lower;
- ``energy_in_old``: share of task ``t``'s input energy (before training) lying in the old tasks' subspace, i.e. the
  memory as it was before task ``t``. High values leave the new branch little room;
- ``interference_old``: ``||U_t D_t x|| / ||W x + b||`` over a sample ``x`` of earlier tasks' inputs of the
  layer, ``W`` the layer's map on its adapted rows (keys and values of the reference's qkv) without task ``t``'s
  branch: the relative change of those outputs on old inputs caused by the new branch, which InfLoRA designs ``D_t``
  to keep near zero;
- ``change_new``: the same ratio on task ``t``'s own inputs (what the branch was trained to change);
- ``random_down_old``: the same ratio on old inputs had ``D_t`` been a random matrix of the same shape and scale
  (an unconstrained low-rank branch): the interference InfLoRA's design avoids.

The math functions take plain tensors (no strategy needed); :class:`SubspaceDiagnosticsPlugin` gathers bounded
samples during an Avalanche run and reports.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from .io import atomic_write, atomic_write_text
from .lora import InfLoRALinear
from .plugins import ForwardContext, SubspaceUpdatePlugin, forward_context, pass_with_input_hooks, unwrap_model
from .subspace import DOWN_SCALE, CovarianceAccumulator, LayerMemory, energy_in_subspace

PER_LAYER_METRICS = (
    "memory_size",
    "old_space_share",
    "memory_coverage",
    "energy_in_old",
    "interference_old",
    "change_new",
    "random_down_old",
)
FILE_NAMES = ("subspace_diagnostics.json", "subspace_diagnostics.csv", "subspace_heatmaps.png")


# ----------------------------------------------------------------------------------------------------- pure math
def adapted_weight_without_branch(adapter: InfLoRALinear, start: int, stop: int
                                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The map of ``adapter``'s adapted rows (float64, CPU; the key and value rows of the reference's qkv) as it was
    before its finished branch rows ``start:stop``.

    That is the base weight's adapted rows plus every finished branch except ``start:stop``, whether or not the
    adapter keeps its branches merged. An open branch is not included.
    """
    if not 0 <= start <= stop <= adapter.num_finished:
        raise ValueError(f"branch rows {start}:{stop} are outside the {adapter.num_finished} finished rows")
    weight = adapter.adapted(adapter.base_layer.weight.detach()).cpu().to(torch.float64)
    if adapter.merged:  # the weight holds every finished branch: take this one out
        weight = weight - adapter.adapted(adapter.get_delta_weight(finished=slice(start, stop), current=False)).cpu()
    else:  # the weight holds none: add all the others
        keep = list(range(0, start)) + list(range(stop, adapter.num_finished))
        weight = weight + adapter.adapted(adapter.get_delta_weight(finished=keep, current=False)).cpu()
    bias = adapter.base_layer.bias
    return weight, None if bias is None else adapter.adapted(bias.detach()).cpu().to(torch.float64)


def branch_change(
    tokens: torch.Tensor, down: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[float, float]:
    """``(||up down x||^2, ||W x + b||^2)`` summed over the rows ``x`` of ``tokens`` (float64)."""
    x = tokens.reshape(-1, tokens.shape[-1]).to(torch.float64)
    delta = (x @ down.to(torch.float64).T) @ up.to(torch.float64).T
    ref = x @ weight.to(torch.float64).T
    if bias is not None:
        ref = ref + bias.to(torch.float64)
    return float(delta.square().sum()), float(ref.square().sum())


def relative_change(pairs: Iterable[tuple[float, float]]) -> Optional[float]:
    """``sqrt(sum change^2 / sum reference^2)`` over ``(change^2, reference^2)`` pairs; ``None`` when empty."""
    pairs = list(pairs)
    if not pairs:
        return None
    num = sum(p[0] for p in pairs)
    den = sum(p[1] for p in pairs)
    return math.sqrt(num / den) if den > 0 else float("nan")


def random_down(rank: int, dim: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random ``rank x dim`` matrix with orthonormal rows scaled like a designed ``down`` (float64)."""
    gauss = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gauss)
    return q.T.contiguous() * DOWN_SCALE


def sample_rows(x: torch.Tensor, count: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``count`` distinct random rows of the token vectors ``x`` (any leading shape), all of them if fewer."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= count:
        return flat
    index = torch.randperm(flat.shape[0], generator=generator)[:count]
    return flat[index.to(flat.device)]


@torch.no_grad()
def sample_layer_inputs(
    model: nn.Module,
    batches: Iterable[Any],
    device: torch.device,
    num_tokens: int,
    generator: Optional[torch.Generator] = None,
    forward: Optional[ForwardContext] = None,
) -> tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """One no-grad pass of an ``InfLoRAViT`` over ``batches``: per adapted layer, the uncentred covariance of all its
    input tokens (float64) and ``num_tokens`` randomly chosen input token vectors (float32, CPU)."""
    adapters = dict(model.adapters())
    covs = {name: CovarianceAccumulator(a.in_features) for name, a in adapters.items()}
    pools: Dict[str, list] = {name: [] for name in adapters}

    def on_input(name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        covs[name].update(x)
        pools[name].append(sample_rows(x, num_tokens, generator).cpu())

    pass_with_input_hooks(model, batches, device, on_input, forward)
    tokens = {name: sample_rows(torch.cat(pool), num_tokens, generator) for name, pool in pools.items()}
    return {name: acc.covariance() for name, acc in covs.items()}, tokens


# ----------------------------------------------------------------------------------------------------- outputs
def records_to_rows(records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Long-format rows ``experience, layer, metric, value`` of per-layer records (for CSV)."""
    rows = []
    for rec in records:
        for metric in ("memory_kind", "threshold") + PER_LAYER_METRICS:
            rows.append({"experience": rec["experience"], "layer": rec["layer"], "metric": metric, "value": rec[metric]})
    return rows


def _threshold_label(threshold: Optional[float]) -> str:
    """The threshold under a heatmap column; none for runs without a memory (sequential LoRA)."""
    return "none" if threshold is None else f"{threshold:.4g}"


def _short(layer: str) -> str:
    return layer.replace("blocks.", "b").replace(".attn.qkv", "")


def plot_heatmaps(records: Sequence[Mapping[str, Any]], path: Union[str, os.PathLike], title: str = "") -> None:
    """Layer x experience heatmaps of the diagnostics in ``records`` (per-layer dicts), saved to ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    layers = list(dict.fromkeys(r["layer"] for r in records))
    exps = sorted({int(r["experience"]) for r in records})
    if not layers or not exps:
        raise ValueError("no diagnostics records to plot: run at least one training experience first")
    by_key = {(r["layer"], int(r["experience"])): r for r in records}
    thresholds = {int(r["experience"]): r["threshold"] for r in records}

    def grid(metric: str) -> torch.Tensor:
        out = torch.full((len(layers), len(exps)), float("nan"), dtype=torch.float64)
        for i, layer in enumerate(layers):
            for j, e in enumerate(exps):
                value = by_key.get((layer, e), {}).get(metric)
                if value is not None:
                    out[i, j] = float(value)
        return out

    change_panels = [grid(m) for m in ("interference_old", "change_new", "random_down_old")]
    finite = torch.cat([p[torch.isfinite(p) & (p > 0)] for p in change_panels])
    lo = float(finite.min()) if finite.numel() else 1e-4
    hi = float(finite.max()) if finite.numel() else 1.0
    change_norm = LogNorm(vmin=lo, vmax=max(hi, lo * 10))
    panels = [
        ("old-task space / width (R: retain memory)", grid("old_space_share"), Normalize(0, 1), "Blues"),
        ("memory_coverage: task's input energy in memory", grid("memory_coverage"), Normalize(0, 1), "Greens"),
        ("energy_in_old: new task's input energy in old space", grid("energy_in_old"), Normalize(0, 1), "Oranges"),
        ("interference_old: ||ΔKV(x_old)|| / ||KV(x_old)||", change_panels[0], change_norm, "viridis"),
        ("change_new: ||ΔKV(x_new)|| / ||KV(x_new)||", change_panels[1], change_norm, "viridis"),
        ("random_down_old: same, random D", change_panels[2], change_norm, "viridis"),
    ]
    fig = Figure(figsize=(3.2 * 3 + 1.5, 0.32 * len(layers) * 2 + 2.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    kinds = {(r["layer"], int(r["experience"])): r["memory_kind"] for r in records}
    for ax, (name, data, norm, cmap) in zip(axes.flat, panels):
        masked = data.clone()
        masked[~torch.isfinite(masked)] = float("nan")
        image = ax.imshow(masked.numpy(), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(exps)), [f"t{e}\nε={_threshold_label(thresholds[e])}" for e in exps], fontsize=6)
        ax.set_yticks(range(len(layers)), [_short(layer) for layer in layers], fontsize=6)
        ax.set_xlabel("experience", fontsize=7)
        for i in range(len(layers)):
            for j in range(len(exps)):
                value = float(data[i, j])
                if not math.isfinite(value):
                    ax.text(j, i, "–", ha="center", va="center", fontsize=6, color="gray")
                    continue
                label = f"{value:.2f}" if norm.__class__ is Normalize else f"{value:.1e}"
                if name.startswith("old-task") and kinds.get((layers[i], exps[j])) == "retain":
                    label += " R"
                red, green, blue, _ = image.cmap(norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(j, i, label, ha="center", va="center", fontsize=5, color="white" if dark else "black")
        fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=130, format="png"))


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------------- plugin
class SubspaceDiagnosticsPlugin(SupervisedPlugin):
    """Measures, per experience and adapted layer, the subspace memory and the interference of the new branch.

    It reads the memory of the strategy's :class:`~inflora_avalanche.plugins.SubspaceUpdatePlugin`, in any order
    among the plugins: ``InfLoRAStrategy`` updates the memories and merges the branches when it closes the task,
    before any plugin's ``after_training_exp``. Before each training experience it runs
    ``sample_images`` images of the experience (test-time transforms) through the model and keeps every adapted
    layer's input covariance; after the experience (memory updated, branch merged) it runs them again and keeps
    ``sample_tokens`` input token vectors per layer for later experiences. Overhead: two forward passes over
    ``sample_images`` images per experience, and ``experiences x layers x sample_tokens x width`` floats of memory.

    Values are published to ``strategy.evaluator`` as ``SubspaceDiag/<metric>/<layer>`` (and ``.../mean``) with the
    experience index as x, so TensorBoard, text and interactive loggers record them (Avalanche's ``CSVLogger`` only
    writes accuracy and loss: the CSV is written here). With ``out_dir`` the plugin also writes
    ``subspace_diagnostics.json``, ``subspace_diagnostics.csv`` and ``subspace_heatmaps.png`` after every experience.

    Args:
        sample_images: images per experience run through the model for the samples.
        sample_tokens: token vectors per layer kept per experience.
        out_dir: folder for the JSON, CSV and heatmaps (``None``: only publish to the evaluator and keep ``records``).
        plot: write the heatmaps (needs matplotlib).
        seed: seed of the image and token sampling and of the random baseline.
        overwrite: replace diagnostics files already in ``out_dir``; otherwise they are an error.
    """

    def __init__(
        self,
        sample_images: int = 32,
        sample_tokens: int = 256,
        out_dir: Optional[Union[str, os.PathLike]] = None,
        plot: bool = True,
        seed: int = 0,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        if sample_images < 1 or sample_tokens < 1:
            raise ValueError(f"sample_images and sample_tokens must be >= 1, got {sample_images}, {sample_tokens}")
        self.sample_images = int(sample_images)
        self.sample_tokens = int(sample_tokens)
        self.out_dir = None if out_dir is None else Path(out_dir).expanduser()
        self.plot = plot
        self.seed = int(seed)
        if self.out_dir is not None and not overwrite:
            existing = [n for n in FILE_NAMES if (self.out_dir / n).exists()]
            if existing:
                raise ValueError(
                    f"{self.out_dir} already holds {', '.join(existing)}; choose another out_dir or pass overwrite=True"
                )
        self.records: list[dict] = []
        self.old_tokens: Dict[str, list[torch.Tensor]] = {}  # layer -> one sample per finished experience
        self._memory_before: Dict[str, LayerMemory] = {}
        self._finished_before: Dict[str, int] = {}
        self._new_covariances: Dict[str, torch.Tensor] = {}
        self.seconds: list[float] = []  # wall time of the plugin's passes and math per experience (not file writing)
        self._before_seconds = 0.0

    # ------------------------------------------------------------------------------------------------- callbacks
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        subspace = self._subspace_plugin(strategy)
        model = unwrap_model(strategy.model)
        self._memory_before = dict(subspace.memories)
        self._finished_before = {name: a.num_finished for name, a in model.adapters()}
        self._new_covariances, _ = self._sample(strategy, model, salt=0)
        self._before_seconds = time.perf_counter() - started

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        resumed = time.perf_counter()
        subspace = self._subspace_plugin(strategy)
        model = unwrap_model(strategy.model)
        if model.task_open:
            raise RuntimeError("the task is still open after its training: SubspaceDiagnosticsPlugin needs "
                               "InfLoRAStrategy, which updates the memories and merges the branches when a task ends")
        experience = int(getattr(strategy.experience, "current_experience", len(self.seconds)))
        covs_after, new_tokens = self._sample(strategy, model, salt=1)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * experience + 1)
        threshold = subspace.thresholds[-1] if subspace.thresholds else None
        new_records = []
        for name, adapter in model.adapters():
            start, stop = self._finished_before.get(name, 0), adapter.num_finished
            down = adapter.past_down[start:stop].detach().cpu().double()
            up = adapter.past_up[:, start:stop].detach().cpu().double()
            weight, bias = adapted_weight_without_branch(adapter, start, stop)
            old = self.old_tokens.get(name, [])
            per_task = [branch_change(x, down, up, weight, bias) for x in old]
            rand = random_down(down.shape[0], adapter.in_features, gen) if stop > start else down
            memory = subspace.memories.get(name)
            cov = self._new_covariances.get(name)
            before = self._memory_before.get(name)
            record = {
                "experience": experience,
                "layer": name,
                "dim": adapter.in_features,
                "memory_kind": memory.kind if memory is not None else None,
                "memory_size": memory.size if memory is not None else 0,
                "old_space_share": memory.old_space_dim() / adapter.in_features if memory is not None else 0.0,
                "threshold": threshold,
                "memory_coverage": None if memory is None else energy_in_subspace(covs_after[name], memory),
                "energy_in_old": None
                if cov is None or before is None or before.is_empty
                else energy_in_subspace(cov, before),
                "interference_old": relative_change(per_task),
                "interference_per_task": [relative_change([p]) for p in per_task],
                "change_new": relative_change([branch_change(new_tokens[name], down, up, weight, bias)]),
                "random_down_old": relative_change(branch_change(x, rand, up, weight, bias) for x in old),
                "sample_tokens_old": int(sum(x.shape[0] for x in old)),
            }
            new_records.append(record)
            self.old_tokens.setdefault(name, []).append(new_tokens[name])
        self.records.extend(new_records)
        self._publish(strategy, new_records, experience)
        self.seconds.append(self._before_seconds + time.perf_counter() - resumed)
        self._write_files()

    # ------------------------------------------------------------------------------------------------- helpers
    def _subspace_plugin(self, strategy: Any):
        plugins = list(getattr(strategy, "plugins", []))
        found = [p for p in plugins if isinstance(p, SubspaceUpdatePlugin)]
        if not found:
            raise ValueError("SubspaceDiagnosticsPlugin needs a SubspaceUpdatePlugin: use it with InfLoRAStrategy")
        return found[0]

    def _sample(self, strategy: Any, model: nn.Module, salt: int):
        dataset = strategy.experience.dataset
        dataset = dataset.eval() if hasattr(dataset, "eval") else dataset
        experience = int(getattr(strategy.experience, "current_experience", 0))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * experience + 2 + salt)
        count = min(self.sample_images, len(dataset))
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed + experience))[:count]
        batch_size = max(1, min(count, int(getattr(strategy, "eval_mb_size", None) or count)))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, index.tolist()),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=getattr(dataset, "collate_fn", None),
        )
        return sample_layer_inputs(
            model,
            loader,
            torch.device(strategy.device),
            self.sample_tokens,
            generator=gen,
            forward=forward_context(strategy, training=False),
        )

    def _publish(self, strategy: Any, records: Sequence[dict], experience: int) -> None:
        evaluator = getattr(strategy, "evaluator", None)
        if evaluator is None:
            return
        from avalanche.evaluation.metric_results import MetricValue

        for metric in PER_LAYER_METRICS:
            values = []
            for rec in records:
                value = rec[metric]
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                values.append(float(value))
                evaluator.publish_metric_value(
                    MetricValue(self, f"SubspaceDiag/{metric}/{rec['layer']}", float(value), experience)
                )
            if values:
                mean = sum(values) / len(values)
                evaluator.publish_metric_value(MetricValue(self, f"SubspaceDiag/{metric}/mean", mean, experience))
        if records and records[0]["threshold"] is not None:
            evaluator.publish_metric_value(
                MetricValue(self, "SubspaceDiag/threshold", float(records[0]["threshold"]), experience)
            )

    def _write_files(self) -> None:
        if self.out_dir is None:
            return
        json_text = json.dumps({"sample_images": self.sample_images, "sample_tokens": self.sample_tokens,
                                "seconds": self.seconds, "records": self.records}, indent=1)
        _write_text(self.out_dir / FILE_NAMES[0], json_text + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["experience", "layer", "metric", "value"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(records_to_rows(self.records))
        _write_text(self.out_dir / FILE_NAMES[1], buffer.getvalue())
        if self.plot:
            plot_heatmaps(self.records, self.out_dir / FILE_NAMES[2])

    # ------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"records": [dict(r) for r in self.records],
                "old_tokens": {k: [t.clone() for t in v] for k, v in self.old_tokens.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.old_tokens = {k: [t.clone() for t in v] for k, v in state["old_tokens"].items()}


def load_records(path: Union[str, os.PathLike]) -> list[dict]:
    """The per-layer records of a ``subspace_diagnostics.json`` written by the plugin."""
    with open(path, encoding="utf-8") as handle:
        return list(json.load(handle)["records"])
