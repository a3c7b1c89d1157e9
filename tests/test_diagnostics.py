"""Subspace diagnostics: the math on plain tensors, and the plugin inside a real (tiny) InfLoRA run."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from conftest import TINY_VIT, SyntheticImages
from inflora_avalanche import InfLoRALinear, InfLoRAViT, LayerMemory, design_down_projection
from inflora_avalanche.diagnostics import (
    FILE_NAMES,
    PER_LAYER_METRICS,
    SubspaceDiagnosticsPlugin,
    branch_change,
    adapted_weight_without_branch,
    load_records,
    plot_heatmaps,
    random_down,
    relative_change,
    sample_rows,
)
from inflora_avalanche.lora import qkv_row_ranges
from inflora_avalanche.subspace import DOWN_SCALE

LAYERS = ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def _adapter_with_branches(d: int = 12, rank: int = 3, tasks: int = 3, seed: int = 0) -> InfLoRALinear:
    torch.manual_seed(seed)
    adapter = InfLoRALinear(torch.nn.Linear(d, 3 * d), qkv_row_ranges(3 * d, ("k", "v")))
    for _ in range(tasks):
        adapter.start_branch(rank)
        adapter.set_down(torch.randn(rank, d))
        adapter.up.data.normal_()
        adapter.finish_branch()
    return adapter


def _kv(adapter: InfLoRALinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return adapter(x.float())[..., adapter.row_ranges[0][0] :].double()


# ----------------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("merged", [True, False])
def test_adapted_weight_without_branch_is_the_layer_before_that_branch(merged):
    full = _adapter_with_branches()
    two = _adapter_with_branches(tasks=2)  # same seed: the first two branches are identical
    if not merged:
        full.unmerge()
    weight, bias = adapted_weight_without_branch(full, 6, 9)
    x = torch.randn(20, 12, dtype=torch.float64)
    torch.testing.assert_close(x @ weight.T + bias, _kv(two, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        adapted_weight_without_branch(full, 6, 12)


def test_branch_change_is_the_measured_change_of_the_layer_output():
    adapter = _adapter_with_branches()
    before = _adapter_with_branches(tasks=2)
    x = torch.randn(50, 12, dtype=torch.float64)
    weight, bias = adapted_weight_without_branch(adapter, 6, 9)
    change, ref = branch_change(x, adapter.past_down[6:9], adapter.past_up[:, 6:9], weight, bias)
    measured = (_kv(adapter, x) - _kv(before, x)).norm() / _kv(before, x).norm()
    assert relative_change([(change, ref)]) == pytest.approx(float(measured), rel=1e-4)


def test_designed_branch_leaves_old_inputs_alone_and_a_random_one_does_not():
    gen = torch.Generator().manual_seed(0)
    d, k, rank = 16, 6, 3
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    old = torch.randn(100, k, generator=gen, dtype=torch.float64) @ basis.T  # old inputs span `basis` exactly
    new = torch.randn(100, d, generator=gen, dtype=torch.float64)
    memory = LayerMemory(dim=d, basis=basis, kind="remove")
    down = design_down_projection(new.T @ new / 100, rank, memory)
    up = torch.randn(2 * d, rank, generator=gen, dtype=torch.float64)
    weight = torch.randn(2 * d, d, generator=gen, dtype=torch.float64)
    designed = relative_change([branch_change(old, down, up, weight, None)])
    on_new = relative_change([branch_change(new, down, up, weight, None)])
    rand = relative_change([branch_change(old, random_down(rank, d, gen), up, weight, None)])
    assert designed < 1e-12
    assert on_new > 0.01 and rand > 0.01
    # Pooling weighs samples by their reference energy, it is not a mean of ratios.
    pairs = [(1.0, 4.0), (0.0, 12.0)]
    assert relative_change(pairs) == pytest.approx(0.25)
    assert relative_change([]) is None


def test_random_down_has_orthonormal_rows_at_the_design_scale():
    down = random_down(4, 10, torch.Generator().manual_seed(1))
    torch.testing.assert_close(down @ down.T, torch.eye(4, dtype=torch.float64) * DOWN_SCALE**2)


def test_sample_rows_takes_distinct_rows_and_is_bounded():
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    rows = sample_rows(x, 5, torch.Generator().manual_seed(0))
    assert rows.shape == (5, 3)
    flat = x.reshape(-1, 3)
    assert len({tuple(r.tolist()) for r in rows}) == 5
    assert all(any(torch.equal(r, f) for f in flat) for r in rows)
    assert sample_rows(x, 100).shape == (14, 3)


def test_plot_heatmaps_writes_a_png_and_refuses_empty_records(tmp_path):
    records = [
        {"experience": e, "layer": layer, "memory_kind": "retain" if e == 2 else "remove", "memory_size": 3,
         "old_space_share": 0.2 * (e + 1), "memory_coverage": 0.5, "threshold": 0.95 + 0.01 * e, "energy_in_old": None if e == 0 else 0.9,
         "interference_old": None if e == 0 else 1e-3, "change_new": 0.05, "random_down_old": None if e == 0 else 0.02}
        for e in range(3)
        for layer in LAYERS
    ]
    plot_heatmaps(records, tmp_path / "h.png", title="test")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]
    with pytest.raises(ValueError, match="no diagnostics"):
        plot_heatmaps([], tmp_path / "e.png")
    # a run without a memory (sequential LoRA) has no threshold: the heatmaps still draw
    plot_heatmaps([{**r, "threshold": None} for r in records], tmp_path / "n.png")
    assert (tmp_path / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------- plugin
def _benchmark():
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset

    labels = list(range(6))
    return class_incremental_benchmark(
        {"train": as_classification_dataset(SyntheticImages(labels, 8, seed=1)),
         "test": as_classification_dataset(SyntheticImages(labels, 2, seed=2))},
        num_experiences=3,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 experiences of a tiny InfLoRA run with the diagnostics plugin, TensorBoard logging and adapter snapshots."""
    from avalanche.core import SupervisedPlugin
    from avalanche.logging import TensorboardLogger
    from avalanche.training.plugins import EvaluationPlugin

    from inflora_avalanche import InfLoRAStrategy

    class Snapshot(SupervisedPlugin):
        """Copies of the adapters before each task's training (the new branch's up is still zero)."""

        def __init__(self) -> None:
            super().__init__()
            self.adapters: list[dict] = []

        def before_training_exp(self, strategy, **kwargs):
            self.adapters.append({n: copy.deepcopy(a) for n, a in strategy.model.adapters()})

    out = tmp_path_factory.mktemp("diag")
    tb = TensorboardLogger(str(out / "tb"))
    torch.manual_seed(0)
    model = InfLoRAViT("vit_tiny_patch16_224", rank=4, **TINY_VIT)
    diag = SubspaceDiagnosticsPlugin(sample_images=12, sample_tokens=40, out_dir=out / "diag")
    snap = Snapshot()
    strategy = InfLoRAStrategy(
        model=model, lr=1e-2, train_mb_size=16, train_epochs=1, device="cpu", precision="fp32",
        plugins=[diag, snap], evaluator=EvaluationPlugin(loggers=[tb]),
    )
    memories = []
    for exp in _benchmark().train_stream:
        strategy.train(exp)
        memories.append(dict(strategy.subspace_plugin.memories))
    tb.writer.flush()
    return strategy, diag, snap, memories, out


def test_records_describe_memory_threshold_and_energy(run):
    strategy, diag, _, memories, _ = run
    assert [(r["experience"], r["layer"]) for r in diag.records] == [(e, n) for e in range(3) for n in LAYERS]
    for rec in diag.records:
        memory = memories[rec["experience"]][rec["layer"]]
        assert rec["memory_kind"] == memory.kind and rec["memory_size"] == memory.size
        assert rec["old_space_share"] == pytest.approx(memory.old_space_dim() / 32)
        assert rec["threshold"] == strategy.subspace_plugin.thresholds[rec["experience"]]
        if rec["experience"] == 0:
            assert rec["energy_in_old"] is None and rec["interference_old"] is None
        else:
            assert 0.0 <= rec["energy_in_old"] <= 1.0
            assert rec["sample_tokens_old"] == 40 * rec["experience"]
        assert rec["change_new"] > 0
        assert 0.0 < rec["memory_coverage"] <= 1.0 + 1e-9


def test_interference_equals_the_change_of_the_adapter_output_on_stored_old_inputs(run):
    strategy, diag, snap, _, _ = run
    adapters = dict(strategy.model.adapters())
    # After the last task, only the last branch separates the current adapters from the snapshot before it.
    last = [r for r in diag.records if r["experience"] == 2]
    for rec in last:
        name = rec["layer"]
        old = torch.cat(diag.old_tokens[name][:2])
        before, after = _kv(snap.adapters[2][name], old), _kv(adapters[name], old)
        measured = float((after - before).norm() / before.norm())
        assert rec["interference_old"] == pytest.approx(measured, rel=1e-3, abs=1e-7)
        per_task = [float((_kv(adapters[name], x) - _kv(snap.adapters[2][name], x)).norm()
                          / _kv(snap.adapters[2][name], x).norm()) for x in diag.old_tokens[name][:2]]
        assert rec["interference_per_task"] == pytest.approx(per_task, rel=1e-3, abs=1e-7)


def test_metrics_reach_avalanche_loggers_and_files(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    strategy, diag, _, _, out = run
    metrics = strategy.evaluator.get_all_metrics()
    xs, values = metrics[f"SubspaceDiag/interference_old/{LAYERS[1]}"]
    assert xs == [1, 2]
    assert values == pytest.approx([r["interference_old"] for r in diag.records if r["layer"] == LAYERS[1]][1:])
    assert metrics["SubspaceDiag/memory_size/mean"][0] == [0, 1, 2]

    events = EventAccumulator(str(out / "tb")).Reload()
    steps = [e.step for e in events.Scalars(f"SubspaceDiag/change_new/{LAYERS[0]}")]
    assert steps == [0, 1, 2]

    assert load_records(out / "diag" / FILE_NAMES[0]) == diag.records
    with open(out / "diag" / FILE_NAMES[1]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * len(LAYERS) * (2 + len(PER_LAYER_METRICS))
    energy = [r for r in rows if r["metric"] == "energy_in_old" and r["experience"] == "2"]
    assert float(energy[0]["value"]) == pytest.approx(diag.records[4]["energy_in_old"])
    assert (out / "diag" / FILE_NAMES[2]).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="already holds"):
        SubspaceDiagnosticsPlugin(out_dir=out / "diag")


def test_plugin_order_does_not_matter(run):
    """The strategy updates the memories and merges when it closes the task, before any plugin's
    after_training_exp: the diagnostics read the same memory whether they come before or after the memory plugin."""
    from avalanche.training.plugins import EvaluationPlugin

    from inflora_avalanche import InfLoRAStrategy, SubspaceUpdatePlugin

    _, after, _, _, _ = run
    torch.manual_seed(0)
    model = InfLoRAViT("vit_tiny_patch16_224", rank=4, **TINY_VIT)
    before = SubspaceDiagnosticsPlugin(sample_images=12, sample_tokens=40)
    strategy = InfLoRAStrategy(
        model=model, lr=1e-2, train_mb_size=16, train_epochs=1, device="cpu", precision="fp32",
        plugins=[before, SubspaceUpdatePlugin()], evaluator=EvaluationPlugin(loggers=[]),
    )
    for exp in _benchmark().train_stream[:2]:
        strategy.train(exp)
    assert len(before.records) == 2 * len(list(model.adapters())) > 0
    for mine, theirs in zip(before.records, after.records):  # the same up to float rounding of the passes
        assert set(mine) == set(theirs)
        for key, value in mine.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert value == pytest.approx(theirs[key], rel=1e-6), key
            elif "seconds" not in key:
                assert value == theirs[key], key
