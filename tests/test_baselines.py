"""Baselines of the comparison: every method trains end to end on a tiny ViT; the table aggregates correctly."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from inflora_avalanche.baselines import (
    METHODS,
    BackboneNotSupported,
    L2PCompat,
    MethodNotApplicable,
    RandomSubspacePlugin,
    Settings,
    build_strategy,
    random_down_projection,
)
from inflora_avalanche.baselines.runner import (
    BackboneConfig,
    RunSpec,
    parse_accuracies,
    peak_memory_mb,
    reset_peak_memory,
    run_method,
)
from inflora_avalanche.baselines.streams import StreamConfig, build_stream
from inflora_avalanche.baselines.table import aggregate, average_forgetting, to_markdown

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: thread hand-offs cost more than they save, a lot on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TINY_STREAM = StreamConfig(num_experiences=2, classes_per_experience=2, max_train_per_class=8, max_test_per_class=4,
                           resolution=32)
TINY_WIDTH, TINY_DEPTH = 32, 2
HEAD = TINY_WIDTH * 4 + 4  # one linear layer over the 4 classes of the stream
TINY_VIT_PARAMS = sum(p.numel() for p in BackboneConfig().create(32).parameters())


def _spec(method: str, **backbone: object) -> RunSpec:
    return RunSpec(method=method, seed=0, stream=TINY_STREAM, epochs=1, batch_size=8, eval_batch_size=16,
                   backbone=BackboneConfig(timm_kwargs=tuple(backbone.items())))


def _branch_params(rank: int, blocks: int) -> int:
    return blocks * 2 * TINY_WIDTH * rank  # key and value up-projections of every adapted block


#: Parameters one experience trains, per method, on the 2-block, 32-wide ViT (InfLoRA's per-task head is 2 classes).
EXPECTED_TRAINABLE = {
    "inflora": _branch_params(10, TINY_DEPTH) + TINY_WIDTH * 2 + 2,
    "seq_lora": _branch_params(10, TINY_DEPTH) + TINY_WIDTH * 2 + 2,
    # CA also retrains both heads on sampled features after the second experience.
    "inflora_ca": _branch_params(5, TINY_DEPTH) + 2 * (TINY_WIDTH * 2 + 2),
    "linear_probe": HEAD,
    "naive": TINY_VIT_PARAMS + HEAD,
    "ewc": TINY_VIT_PARAMS + HEAD,
    "lwf": TINY_VIT_PARAMS + HEAD,
    "joint": TINY_VIT_PARAMS + HEAD,
    "l2p": 10 * 5 * TINY_WIDTH + 10 * TINY_WIDTH + HEAD,  # prompt pool, prompt keys, head
}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "inflora_b5"])
def test_every_method_trains_and_evaluates_on_a_tiny_vit(method: str) -> None:
    result = run_method(_spec(method))
    assert result["status"] == "ok", result.get("traceback") or result["reason"]
    steps = 1 if method == "joint" else 2
    assert len(result["A_t"]) == steps
    for t, row in enumerate(result["acc_matrix"]):
        seen = 2 if method == "joint" else t + 1
        assert all(0.0 <= a <= 100.0 for a in row[:seen]) and all(a is None for a in row[seen:])
        # A_t weighs experiences by their test size (equal here): it is the mean of the seen experiences.
        assert result["A_t"][t] == pytest.approx(sum(row[:seen]) / seen)
    assert result["trainable_params"] == EXPECTED_TRAINABLE[method]
    assert result["train_time_s"] > 0 and result["peak_memory_mb"] >= 0
    if method == "inflora":
        assert result["trainable_params_total"] == 2 * result["trainable_params"]  # new branches per task


def test_inflora_b5_needs_five_blocks_and_says_so_otherwise() -> None:
    short = run_method(_spec("inflora_b5"))
    assert short["status"] == "n/a" and "adapted_blocks=5" in short["reason"]
    deep = run_method(_spec("inflora_b5", depth=5))
    assert deep["status"] == "ok", deep.get("traceback")
    assert deep["trainable_params"] == _branch_params(10, 5) + TINY_WIDTH * 2 + 2


def test_peak_memory_window_sees_a_new_allocation() -> None:
    baseline = reset_peak_memory("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident
    peak, _ = peak_memory_mb("cpu")
    del block
    assert peak - baseline >= 60.0


def test_avalanche_l2p_itself_does_not_build_on_timm_1x() -> None:
    """The premise of the compatibility layer: Avalanche's own constructor fails (no download is attempted)."""
    from avalanche.training import LearningToPrompt

    with pytest.raises(TypeError, match="not subscriptable"):
        LearningToPrompt(model_name="vit_tiny_patch16_224", pretrained=False, num_classes=4)


def test_l2p_trains_only_current_classes_with_a_set_of_classes() -> None:
    benchmark = build_stream(TINY_STREAM)
    assert isinstance(benchmark.train_stream[0].classes_in_this_experience, set)
    torch.manual_seed(0)
    strategy = L2PCompat(backbone=BackboneConfig().create(32), num_classes=4, lr=1e-2, train_mb_size=8,
                         evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]))
    backbone_before = {k: v.clone() for k, v in strategy.model.backbone.state_dict().items()}
    head_before = strategy.model.head.weight.detach().clone()
    strategy.train(benchmark.train_stream[0])
    assert torch.isfinite(strategy.loss)
    head_after = strategy.model.head.weight.detach()
    # Classes 2 and 3 are masked out of the loss: their head rows get no update; classes 0 and 1 learn.
    assert torch.equal(head_after[2:], head_before[2:])
    assert not torch.equal(head_after[:2], head_before[:2])
    assert all(torch.equal(v, strategy.model.backbone.state_dict()[k]) for k, v in backbone_before.items())


def test_l2p_on_a_backbone_without_patch_tokens_is_reported_not_applicable() -> None:
    not_a_vit = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32))
    with pytest.raises(BackboneNotSupported, match="VisionTransformer"):
        L2PCompat(backbone=not_a_vit, num_classes=4)
    settings = Settings(num_classes=4, num_experiences=2)
    with pytest.raises(MethodNotApplicable, match="L2P needs a timm VisionTransformer"):
        build_strategy("l2p", not_a_vit, settings, evaluator=EvaluationPlugin(loggers=[]))


def test_random_subspace_is_orthonormal_and_scaled_like_inflora() -> None:
    down = random_down_projection(64, 6, torch.Generator().manual_seed(0))
    assert down.shape == (6, 64)
    torch.testing.assert_close(down @ down.T, torch.eye(6, dtype=torch.float64) / 3.0)
    other = random_down_projection(64, 6, torch.Generator().manual_seed(1))
    assert not torch.allclose(down, other)


def test_sequential_lora_keeps_no_memory_and_ignores_the_data() -> None:
    benchmark = build_stream(TINY_STREAM)
    torch.manual_seed(0)
    settings = Settings(num_classes=4, num_experiences=2, batch_size=8)
    strategy = build_strategy("seq_lora", BackboneConfig().create(32), settings, EvaluationPlugin(loggers=[]))
    plugin = strategy.subspace_plugin
    assert isinstance(plugin, RandomSubspacePlugin)
    for experience in benchmark.train_stream:
        strategy.train(experience)
    assert plugin.memories == {}
    adapter = strategy.model.backbone.blocks[0].attn.qkv
    # Two finished tasks, each a random orthonormal subspace: rows of one task are orthonormal (over sqrt 3) and the
    # two tasks' subspaces overlap (InfLoRA would keep the second out of the first one's input space).
    first, second = adapter.past_down[:10].double(), adapter.past_down[10:].double()
    torch.testing.assert_close(first @ first.T, torch.eye(10, dtype=torch.float64) / 3.0)
    assert (first @ second.T).abs().max() > 1e-3


def test_parse_accuracies_reads_avalanche_metric_names() -> None:
    metrics = {
        "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000": 0.5,
        "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001": 0.25,
        "Top1_Acc_Stream/eval_phase/test_stream/Task000": 0.375,
        "Loss_Stream/eval_phase/test_stream/Task000": 1.0,
    }
    assert parse_accuracies(metrics) == ({0: 50.0, 1: 25.0}, 37.5)


# --------------------------------------------------------------------------------------------------- table
def _run(method: str, seed: int, acc_matrix: list, **costs: float) -> dict:
    a_t = [float(np.mean([a for a in row if a is not None])) for row in acc_matrix]
    return {"method": method, "seed": seed, "status": "ok", "reason": None, "joint": False,
            "acc_matrix": acc_matrix, "A_t": a_t, "trainable_params": costs.get("params", 10),
            "train_time_s": costs.get("time", 1.0), "peak_memory_mb": costs.get("mem", 100.0)}


def test_forgetting_is_the_mean_drop_from_the_best_earlier_accuracy() -> None:
    acc = [[90.0, None, None], [70.0, 80.0, None], [60.0, 85.0, 50.0]]
    # experience 0: best 90 -> 60 (30); experience 1: best 80 (only t=1 counts before the end) -> 85 (-5)
    assert average_forgetting(acc) == pytest.approx((30.0 - 5.0) / 2)
    assert average_forgetting([[70.0]]) is None


def test_aggregate_gives_mean_and_sample_std_over_seeds() -> None:
    runs = [
        _run("inflora", 0, [[80.0, None], [60.0, 40.0]], time=10.0),
        _run("inflora", 1, [[90.0, None], [50.0, 70.0]], time=20.0),
        {"method": "l2p", "seed": 0, "status": "n/a", "reason": "L2P needs a timm VisionTransformer"},
        {**_run("joint", 0, [[70.0, 90.0]]), "joint": True},
    ]
    rows = {r["method"]: r for r in aggregate(runs)}
    inflora = rows["inflora"]
    # A_last per seed: 50 and 60; A_avg: (80 + 50) / 2 = 65 and (90 + 60) / 2 = 75; forgetting: 20 and 40.
    assert inflora["A_last"]["mean"] == pytest.approx(55.0)
    assert inflora["A_last"]["std"] == pytest.approx(math.sqrt(50.0))
    assert inflora["A_avg"]["mean"] == pytest.approx(70.0)
    assert inflora["forgetting"]["mean"] == pytest.approx(30.0)
    assert inflora["forgetting"]["std"] == pytest.approx(math.sqrt(200.0))
    assert inflora["train_time_s"]["mean"] == pytest.approx(15.0)
    assert inflora["A_t"] == pytest.approx([85.0, 55.0])
    assert rows["joint"]["A_last"]["mean"] == pytest.approx(80.0) and rows["joint"]["A_avg"] is None
    assert rows["l2p"]["status"] == "n/a"
    table = to_markdown(list(rows.values()))
    lines = table.splitlines()
    assert len({line.count("|") for line in lines}) == 1  # every row has every column
    assert "| InfLoRA | 0,1 | 55.00 ± 7.07 | 70.00 ± 7.07 | 30.00 ± 14.14 |" in table
    assert "n/a: L2P needs a timm VisionTransformer" in table


def test_a_failed_seed_is_named_and_left_out_of_the_mean() -> None:
    runs = [_run("naive", 0, [[40.0]]), _run("naive", 1, [[60.0]]),
            {"method": "naive", "seed": 2, "status": "error", "reason": "RuntimeError: boom"}]
    (row,) = aggregate(runs)
    assert row["seeds"] == [0, 1] and row["failed_seeds"] == [2]
    assert row["A_last"]["mean"] == pytest.approx(50.0)
    assert "failed: 2" in to_markdown([row])


# --------------------------------------------------------------------------------------------------- script
def _script(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Run the script's ``main`` in this process (no second interpreter start); exit code and stderr."""
    spec = importlib.util.spec_from_file_location("compare_baselines", REPO / "experiments" / "compare_baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        code = module.main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_script_writes_table_json_and_plot_and_never_overwrites(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    args = ["--out", str(out), "--methods", "linear_probe,inflora_b5", "--epochs", "1", "--batch-size", "8",
            "--max-train-per-class", "6", "--max-test-per-class", "3", "--no-isolate"]
    code, err = _script(capsys, *args)
    assert code == 0, err
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["linear_probe", "inflora_b5"]
    assert data["rows"][1]["status"] == "n/a"
    assert "n/a: adapted_blocks=5" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 0
    code, err = _script(capsys, *args)
    assert code == 2 and "never overwritten" in err


def test_script_rejects_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    code, err = _script(capsys, "--out", str(tmp_path / "x"), "--methods", "naive,bogus")
    assert code == 2 and err.strip().count("\n") == 0 and "unknown method(s) bogus" in err
    code, err = _script(capsys, "--out", str(tmp_path / "x"), "--hparams", '{"ewc": {"lam": 1}}')
    assert code == 2 and "ewc has no setting(s) lam" in err
    code, err = _script(capsys, "--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing"))
    assert code == 2 and "train/<class>/" in err
    code, err = _script(capsys, "--out", str(tmp_path / "x"), "--benchmark", "cifar100", "--data", str(tmp_path))
    assert code == 2 and "cifar-100-python" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not os.environ.get("INFLORA_TEST_DATA"), reason="INFLORA_TEST_DATA (tiny-imagenet-100) not set")
def test_folder_stream_reads_real_images() -> None:
    config = StreamConfig(num_experiences=2, classes_per_experience=2, max_train_per_class=3, max_test_per_class=2,
                          resolution=28, root=os.environ["INFLORA_TEST_DATA"])
    benchmark = build_stream(config)
    first = benchmark.train_stream[0]
    assert first.classes_in_this_experience == {0, 1} and len(first.dataset) == 6
    x, y, _ = first.dataset[0]
    assert tuple(x.shape) == (3, 28, 28) and y in (0, 1)
    assert len(benchmark.test_stream[1].dataset) == 4
    assert abs(float(x.mean())) < 3.0 and float(x.std()) > 0.05  # normalised pixels, not a blank image
