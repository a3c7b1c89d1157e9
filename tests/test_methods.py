"""Every method of the registry trains end to end through the one runner (``run_experiment``) on a tiny ViT and the
synthetic stream; the method-specific pieces (L2P's compatibility layer, sequential LoRA's random subspace, the
peak-memory window) behave as documented; EWC and LwF resume exactly after an interruption."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import timm
import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from conftest import TINY_VIT, SyntheticImages
from inflora_avalanche.checkpoint import load_checkpoint
from inflora_avalanche.methods import METHODS, MethodNotApplicable
from inflora_avalanche.methods.l2p import BackboneNotSupported, L2PCompat
from inflora_avalanche.methods.seq_lora import RandomSubspacePlugin, random_down_projection
from inflora_avalanche.results import average_forgetting, forgetting_per_experience
from inflora_avalanche.run import resume as R
from inflora_avalanche.run.config import ConfigError
from inflora_avalanche.run.loop import run_experiment
from inflora_avalanche.run.metrics import UpdatedParameterCounter, experience_accuracies
from inflora_avalanche.run.presets import layered_config

TINY_BACKBONE = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
FAST = {
    "backbone": "vit_tiny_patch16_224", "pretrained": False, "backbone_kwargs": TINY_BACKBONE, "resolution": 32,
    "n_experiences": 2, "max_train_per_class": 8, "max_test_per_class": 4, "epochs": 1, "batch_size": 8,
    "eval_batch_size": 16, "precision": "fp32", "cpu_threads": 1, "num_workers": 0, "device": "cpu",
    "progress": False, "diagnostics": False, "seeds": [0],
}
TIMING_KEYS = ("train_time_s", "eval_time_s", "runtime_s", "peak_memory_mb")  # measured, not computed

WIDTH, DEPTH = TINY_BACKBONE["embed_dim"], TINY_BACKBONE["depth"]
HEAD = WIDTH * 4 + 4  # one linear layer over the 4 classes of the stream
TASK_HEAD = WIDTH * 2 + 2  # InfLoRA's per-task head: 2 classes
TINY_VIT_PARAMS = sum(p.numel() for p in timm.create_model(
    "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **TINY_BACKBONE).parameters())


def _branches(rank: int, blocks: int) -> int:
    return blocks * 2 * WIDTH * rank  # key and value up-projections of every adapted block


#: Parameters each experience trains, per method, on the 2-block, 32-wide ViT.
EXPECTED_TRAINABLE = {
    "inflora": [_branches(10, DEPTH) + TASK_HEAD] * 2,
    "seq_lora": [_branches(10, DEPTH) + TASK_HEAD] * 2,
    # CA retrains both heads on sampled features after the second experience.
    "inflora_ca": [_branches(5, DEPTH) + TASK_HEAD, _branches(5, DEPTH) + 2 * TASK_HEAD],
    "linear_probe": [HEAD] * 2,
    "naive": [TINY_VIT_PARAMS + HEAD] * 2,
    "ewc": [TINY_VIT_PARAMS + HEAD] * 2,
    "lwf": [TINY_VIT_PARAMS + HEAD] * 2,
    "joint": [TINY_VIT_PARAMS + HEAD],
    "l2p": [10 * 5 * WIDTH + 10 * WIDTH + HEAD] * 2,  # prompt pool, prompt keys, head
    # SD-LoRA: A and B on q and v of every block, the head, and the magnitudes of every task so far
    "sd_lora": [DEPTH * 2 * 2 * WIDTH * 10 + TASK_HEAD + 1, DEPTH * 2 * 2 * WIDTH * 10 + TASK_HEAD + 2],
}
#: Distinct parameters trained over the whole stream: InfLoRA-style methods add new branches (and a head) per task.
EXPECTED_TOTAL = {
    "inflora": 2 * EXPECTED_TRAINABLE["inflora"][0],
    "seq_lora": 2 * EXPECTED_TRAINABLE["seq_lora"][0],
    "inflora_ca": 2 * _branches(5, DEPTH) + 2 * TASK_HEAD,
    "sd_lora": sum(EXPECTED_TRAINABLE["sd_lora"]),  # new pairs, head and magnitudes every task
    **{m: EXPECTED_TRAINABLE[m][0] for m in ("linear_probe", "naive", "ewc", "lwf", "joint", "l2p")},
}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # run_experiment applies cpu_threads=1 to the whole process; give the other test files their setting back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _config(method: str, out: Path, **overrides: Any) -> dict:
    return layered_config("synthetic_smoke", method, {**FAST, "out": str(out), **overrides})


def _run(config: dict, on_experience_end: Optional[Callable] = None) -> dict:
    return run_experiment(config, on_experience_end=on_experience_end, log=lambda *_: None)


def _counter(strategy: Any) -> UpdatedParameterCounter:
    return next(p for p in strategy.plugins if isinstance(p, UpdatedParameterCounter))


# --------------------------------------------------------------------------------------------------- end to end
def test_the_registry_and_the_expectations_name_the_same_methods() -> None:
    assert set(METHODS) == set(EXPECTED_TRAINABLE) | {"inflora_b5"}  # b5 needs five blocks: tested below


@pytest.mark.parametrize("method", [m for m in METHODS if m != "inflora_b5"])
def test_every_method_trains_and_evaluates_on_a_tiny_vit(method: str, tmp_path: Path) -> None:
    totals: list[int] = []
    results = _run(_config(method, tmp_path / "run"),
                   on_experience_end=lambda seed, t, strategy, partial: totals.append(_counter(strategy).total))
    assert results["method"] == method and results["benchmark"]["num_classes"] == 4
    (seed,) = results["seeds"]
    joint = method == "joint"
    steps = 1 if joint else 2
    assert len(seed["A_t"]) == len(seed["accuracy_matrix"]) == steps and seed["experiences_done"] == steps
    assert seed["test_sizes"] == [8, 8]  # 2 classes x 4 test images per experience
    for t, row in enumerate(seed["accuracy_matrix"]):
        seen = 2 if joint else t + 1
        assert len(row) == 2 and all(a is None for a in row[seen:])
        assert all(0.0 <= a <= 100.0 for a in row[:seen])
        # A_t weighs experiences by their test size (equal here): it is the mean of the seen experiences.
        assert seed["A_t"][t] == pytest.approx(sum(row[:seen]) / seen)
        if not joint:  # joint: see test_joint_task_aware_accuracy_knows_every_experience
            _assert_task_awareness_helps(seed["task_aware_matrix"][t][:seen], row[:seen])
    assert seed["A_last"] == seed["A_t"][-1]
    if joint:
        assert seed["joint"] is True and seed["A_avg"] is None and seed["forgetting"] is None
    else:
        assert seed["A_avg"] == pytest.approx(sum(seed["A_t"]) / 2)
        assert seed["forgetting"] == pytest.approx(average_forgetting(seed["accuracy_matrix"]))
    assert seed["trainable_params"] == EXPECTED_TRAINABLE[method]
    assert totals[-1] == EXPECTED_TOTAL[method]
    assert len(seed["train_time_s"]) == steps and all(s > 0 for s in seed["train_time_s"])
    assert seed["peak_memory_mb"] >= 0 and seed["memory_kind"]
    # What the run returned is what it wrote.
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["seeds"] == results["seeds"]
    assert json.loads((tmp_path / "run" / "seed0" / "metrics.json").read_text()) == seed


def _assert_task_awareness_helps(task_aware: list, class_incremental: list) -> None:
    # A right class-incremental answer stays right when the argmax runs over the sample's own task's classes only.
    assert all(ta >= a for ta, a in zip(task_aware, class_incremental)), (task_aware, class_incremental)


def test_joint_task_aware_accuracy_knows_every_experience(tmp_path: Path) -> None:
    (seed,) = _run(_config("joint", tmp_path / "run"))["seeds"]
    _assert_task_awareness_helps(seed["task_aware_matrix"][0], seed["accuracy_matrix"][0])


def test_inflora_b5_needs_five_blocks_and_says_so_otherwise(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"adapted_blocks=5 .*depth 2"):
        _run(_config("inflora_b5", tmp_path / "short"))
    assert not (tmp_path / "short").exists()  # refused before anything was written
    deep = _run(_config("inflora_b5", tmp_path / "deep", backbone_kwargs={**TINY_BACKBONE, "depth": 5}))
    assert deep["seeds"][0]["trainable_params"] == [_branches(10, 5) + TASK_HEAD] * 2


def test_inflora_trains_branches_on_the_configured_layers_and_rows(tmp_path: Path) -> None:
    """``--qkv-rows`` and ``--target-modules`` reach the model: every adapted row of every adapted layer trains
    rank-wide up-projections (needs an InfLoRAViT that takes both keywords)."""
    rows = _run(_config("inflora", tmp_path / "qkv", qkv_rows=["q", "k", "v"]))
    assert rows["seeds"][0]["trainable_params"] == [DEPTH * 3 * WIDTH * 10 + TASK_HEAD] * 2
    mlp = _run(_config("inflora", tmp_path / "mlp", target_modules=["attn.qkv", "mlp.fc1"]))
    assert mlp["seeds"][0]["trainable_params"] == [DEPTH * (2 + 4) * WIDTH * 10 + TASK_HEAD] * 2  # fc1: 4 x width


# --------------------------------------------------------------------------------------------------- costs
def test_peak_memory_window_sees_a_new_allocation() -> None:
    """In a fresh process (a long test session's freed memory can be reused without growing the RSS): a 64 MiB
    allocation shows in the window, and a new window forgets it."""
    probe = (
        "import torch\n"
        "from inflora_avalanche.run.metrics import peak_memory_mb, reset_peak_memory\n"
        "baseline = reset_peak_memory('cpu')\n"
        "block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident\n"
        "peak, kind = peak_memory_mb('cpu')\n"
        "del block\n"
        "first = peak - baseline\n"
        "baseline = reset_peak_memory('cpu')\n"
        "peak, _ = peak_memory_mb('cpu')\n"
        "print('WINDOWS', first, peak - baseline, bool(kind))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second, kind = proc.stdout.split("WINDOWS", 1)[1].split()
    assert float(first) >= 60.0 and kind == "True"
    assert float(second) < 60.0


# --------------------------------------------------------------------------------------------------- L2P
def test_avalanche_l2p_itself_does_not_build_on_timm_1x() -> None:
    """The premise of the compatibility layer: Avalanche's own constructor fails (no download is attempted)."""
    from avalanche.training import LearningToPrompt

    with pytest.raises(TypeError, match="not subscriptable"):
        LearningToPrompt(model_name="vit_tiny_patch16_224", pretrained=False, num_classes=4)


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)


def test_l2p_trains_only_current_classes_with_a_set_of_classes() -> None:
    torch.set_num_threads(1)
    # Avalanche's new-API benchmarks give the classes as a set (the runner's streams give a list: covered end to end).
    bench = class_incremental_benchmark(
        {"train": SyntheticImages(range(4), per_class=8, seed=0), "test": SyntheticImages(range(4), 4, seed=1)},
        class_order=[0, 1, 2, 3], num_experiences=2)
    first = bench.train_stream[0]
    assert isinstance(first.classes_in_this_experience, set)  # what broke Avalanche's own mask
    strategy = L2PCompat(backbone=_tiny_vit(), num_classes=4, lr=1e-2, train_mb_size=8,
                         evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]))
    backbone_before = {k: v.clone() for k, v in strategy.model.backbone.state_dict().items()}
    head_before = strategy.model.head.weight.detach().clone()
    trained = sorted(first.classes_in_this_experience)
    untrained = [c for c in range(4) if c not in trained]
    strategy.train(first, num_workers=0)
    assert torch.isfinite(strategy.loss).all()
    head_after = strategy.model.head.weight.detach()
    # The other experience's classes are masked out of the loss: their head rows get no update; these classes learn.
    assert torch.equal(head_after[untrained], head_before[untrained])
    assert not torch.equal(head_after[trained], head_before[trained])
    after = strategy.model.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in backbone_before.items())  # the backbone stays frozen


def test_l2p_on_a_backbone_without_patch_tokens_is_reported_not_applicable(tmp_path: Path) -> None:
    not_a_vit = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 32))
    with pytest.raises(BackboneNotSupported, match="VisionTransformer.*Sequential lacks patch_embed"):
        L2PCompat(backbone=not_a_vit, num_classes=4)
    # Through the runner: a timm MLP model (no position embedding, no prefix tokens) is not applicable, in one line.
    config = _config("l2p", tmp_path / "gmlp", backbone="gmlp_ti16_224", backbone_kwargs={})
    with pytest.raises(MethodNotApplicable, match="L2P needs a timm VisionTransformer") as err:
        _run(config)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------- sequential LoRA
def test_random_subspace_is_orthonormal_and_scaled_like_inflora() -> None:
    down = random_down_projection(64, 6, torch.Generator().manual_seed(0))
    assert down.shape == (6, 64)
    torch.testing.assert_close(down @ down.T, torch.eye(6, dtype=torch.float64) / 3.0)
    again = random_down_projection(64, 6, torch.Generator().manual_seed(0))
    other = random_down_projection(64, 6, torch.Generator().manual_seed(1))
    assert torch.equal(down, again) and not torch.allclose(down, other)
    with pytest.raises(ValueError, match="rank must be in"):
        random_down_projection(8, 8)


def test_sequential_lora_keeps_no_memory_and_ignores_the_data(tmp_path: Path) -> None:
    seen: dict = {}

    def keep(seed: int, t: int, strategy: Any, partial: dict) -> None:
        seen["strategy"] = strategy

    _run(_config("seq_lora", tmp_path / "run"), on_experience_end=keep)
    strategy = seen["strategy"]
    plugin = strategy.subspace_plugin
    assert isinstance(plugin, RandomSubspacePlugin)
    assert plugin.memories == {}
    adapter = strategy.model.backbone.blocks[0].attn.qkv
    assert adapter.past_down.shape == (2 * 10, WIDTH)  # two finished tasks of rank 10
    # Each task's rows are orthonormal (over sqrt 3); the two tasks' subspaces overlap (InfLoRA would keep the
    # second out of the first one's input space).
    first, second = adapter.past_down[:10].double(), adapter.past_down[10:].double()
    torch.testing.assert_close(first @ first.T, torch.eye(10, dtype=torch.float64) / 3.0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(second @ second.T, torch.eye(10, dtype=torch.float64) / 3.0, atol=1e-6, rtol=1e-6)
    assert (first @ second.T).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------- metrics
def test_experience_accuracies_read_avalanche_metric_names() -> None:
    metrics = {
        "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000": 0.5,
        "Top1_Acc_Exp/eval_phase/test_stream/Exp001": 0.25,  # with or without the task level
        "TaskAware_Acc_Exp/eval_phase/test_stream/Exp000": 0.75,
        "TaskAware_Acc_Exp/eval_phase/test_stream/Exp001": 0.5,
        "Top1_Acc_Stream/eval_phase/test_stream/Task000": 0.375,
        "Top1_Acc_Exp/eval_phase/train_stream/Task000/Exp002": 1.0,  # not the test stream
        "Loss_Exp/eval_phase/test_stream/Task000/Exp000": 1.0,
    }
    assert experience_accuracies(metrics) == ({0: 0.5, 1: 0.25}, {0: 0.75, 1: 0.5})


# --------------------------------------------------------------------------------------------------- forgetting
def test_forgetting_is_the_mean_drop_from_the_best_earlier_accuracy() -> None:
    acc = [[90.0, None, None], [70.0, 80.0, None], [60.0, 85.0, 50.0]]
    # experience 0: best 90 -> 60 (30); experience 1: best 80 (only t=1 counts before the end) -> 85 (-5)
    assert forgetting_per_experience(acc) == pytest.approx([30.0, -5.0])
    assert average_forgetting(acc) == pytest.approx((30.0 - 5.0) / 2)
    assert average_forgetting([[70.0]]) is None  # one experience: nothing to forget


# --------------------------------------------------------------------------------------------------- resume
class Stop(Exception):
    pass


def _stop_after(experiences: int) -> Callable:
    def callback(seed: int, t: int, strategy: Any, partial: dict) -> None:
        if t + 1 == experiences:
            raise Stop

    return callback


def _without_timings(results: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in results["seeds"]]


def _final_model(out: Path) -> dict:
    return load_checkpoint(out / R.CHECKPOINT_NAME)["strategy"]["model"]


def _same_tensors(a: dict, b: dict) -> bool:
    same = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y  # noqa: E731 (extra state)
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ewc", "lwf"])
def test_stopped_after_one_experience_then_resumed_gives_the_metrics_of_an_uninterrupted_run(
        method: str, tmp_path: Path, monkeypatch) -> None:
    full = _run(_config(method, tmp_path / "full"))
    with pytest.raises(Stop):
        _run(_config(method, tmp_path / "cut"), on_experience_end=_stop_after(1))
    assert not (tmp_path / "cut" / "results.json").exists()
    saved = load_checkpoint(tmp_path / "cut" / R.CHECKPOINT_NAME)
    assert saved["experiences_done"] == 1
    plugin_class = {"ewc": "SaveableEWCPlugin", "lwf": "SaveableLwFPlugin"}[method]
    kept = [key for key in saved["strategy"]["plugins"] if key.endswith(plugin_class)]
    assert len(kept) == 1 and saved["strategy"]["plugins"][kept[0]]  # EWC's importances / LwF's teacher are kept
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_without_plugin_state")

    resumed = _run(_config(method, tmp_path / "cut", resume=True))
    assert _without_timings(resumed) == _without_timings(full)
    assert _same_tensors(_final_model(tmp_path / "cut"), _final_model(tmp_path / "full"))

    # The same resume without EWC's / LwF's state trains the second experience differently: the check above
    # depends on that state being restored.
    from inflora_avalanche.methods import finetune

    plugin = finetune.SaveableEWCPlugin if method == "ewc" else finetune.SaveableLwFPlugin
    monkeypatch.setattr(plugin, "load_state_dict", lambda self, state: None)
    _run(_config(method, tmp_path / "cut_without_plugin_state", resume=True))
    assert not _same_tensors(_final_model(tmp_path / "cut_without_plugin_state"), _final_model(tmp_path / "full"))


@pytest.mark.parametrize("method, targets", [("seq_lora", None), ("l2p", None), ("sd_lora", None),
                                             ("inflora", ["mlp.fc1", "mlp.fc2"]), ("sd_lora", ["attn.proj"])])
def test_resume_is_exact_for_methods_with_their_own_state(method: str, targets: Any, tmp_path: Path) -> None:
    """Sequential LoRA's random generator (each task draws a new subspace), L2P's mask of trained classes,
    SD-LoRA's pairs, magnitudes and norms, and branches on any target layers are part of the checkpoint: a run
    stopped after experience 1 and resumed ends exactly as one that never stopped."""
    extra = {"n_experiences": 3, "classes": 6, **({"target_modules": targets} if targets else {})}
    full = _run(_config(method, tmp_path / "full", **extra))
    with pytest.raises(Stop):
        _run(_config(method, tmp_path / "cut", **extra), on_experience_end=_stop_after(1))
    resumed = _run(_config(method, tmp_path / "cut", resume=True, **extra))
    assert _without_timings(resumed) == _without_timings(full)
    assert _same_tensors(_final_model(tmp_path / "cut"), _final_model(tmp_path / "full"))


def test_l2p_never_predicts_a_class_no_experience_has_trained() -> None:
    """L2P's head covers every class of the stream from the start; at evaluation the untrained columns are masked
    out, as the other methods' heads do, so right after training an experience only its classes are predicted."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bench = class_incremental_benchmark(
        {"train": SyntheticImages(range(4), per_class=8, seed=0), "test": SyntheticImages(range(4), 4, seed=1)},
        class_order=[0, 1, 2, 3], num_experiences=2)
    predictions = []

    class Record(SupervisedPlugin):
        def after_eval_forward(self, strategy, **kwargs):
            predictions.extend(strategy.mb_output.argmax(dim=1).tolist())

    strategy = L2PCompat(backbone=_tiny_vit(), num_classes=4, lr=1e-2, train_mb_size=8, plugins=[Record()],
                         evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]))
    strategy.train(bench.train_stream[0], num_workers=0)
    strategy.eval(bench.test_stream, num_workers=0)
    assert strategy.trained_classes == {0, 1}
    assert predictions and set(predictions) <= {0, 1}
