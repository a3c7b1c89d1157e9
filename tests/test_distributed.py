"""Two CPU processes (gloo) against one: identical branches, memory and metrics."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

GLOBAL_BATCH = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream_and_evaluator():
    """Two experiences of 3 synthetic classes and an evaluator without loggers, the same in every process."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from conftest import SyntheticImages

    torch.set_num_threads(1)
    classes = list(range(6))
    data = {"train": SyntheticImages(classes, 8, seed=0), "test": SyntheticImages(classes, 5, seed=1)}
    benchmark = class_incremental_benchmark(data, class_order=classes, num_experiences=2)
    torch.manual_seed(0)
    return benchmark, EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def _spawn(target, out_dir: str) -> None:
    mp.spawn(_worker, args=(2, _free_port(), out_dir, target.__name__), nprocs=2, join=True)


def run_one_experience(out_path: str) -> None:
    """Train the first experience (no shuffling) and evaluate on the test stream; save what must agree."""
    from conftest import tiny_vit
    from inflora_avalanche import InfLoRAStrategy, InfLoRAViT

    benchmark, evaluator = _stream_and_evaluator()
    model = InfLoRAViT(tiny_vit(), rank=3)
    strategy = InfLoRAStrategy(
        model=model, lr=1e-2, train_epochs=2, train_mb_size=GLOBAL_BATCH, eval_mb_size=5, evaluator=evaluator
    )
    strategy.train(benchmark.train_stream[0], shuffle=False)
    metrics = strategy.eval(benchmark.test_stream)
    torch.save(
        {
            "past_down": {n: a.past_down for n, a in model.adapters()},
            "past_up": {n: a.past_up for n, a in model.adapters()},
            "qkv": {n: a.base_layer.weight for n, a in model.adapters()},
            "memory": {n: (m.kind, m.basis) for n, m in strategy.subspace_plugin.memories.items()},
            "heads": model.heads.state_dict(),
            "metrics": {k: float(v) for k, v in metrics.items() if k.startswith("Top1_Acc")},
        },
        out_path,
    )


def _worker(rank: int, world: int, port: int, out_dir: str, target: str) -> None:
    import avalanche.training  # noqa: F401  (Avalanche creates loggers at import: import before the group exists)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        globals()[target](os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _spawn(run_one_experience, str(out))
    run_one_experience(str(out / "single.pt"))
    load = lambda name: torch.load(out / name, weights_only=False)  # noqa: E731
    return load("rank0.pt"), load("rank1.pt"), load("single.pt")


def test_ranks_hold_bit_identical_branches_and_memory(runs):
    rank0, rank1, _ = runs
    for key in ("past_down", "past_up", "qkv"):
        for name in rank0[key]:
            assert torch.equal(rank0[key][name], rank1[key][name]), (key, name)
    for name, (kind, basis) in rank0["memory"].items():
        assert rank1["memory"][name][0] == kind
        assert torch.equal(rank1["memory"][name][1], basis)
    for name, value in rank0["heads"].items():
        assert torch.equal(rank1["heads"][name], value)


def test_distributed_equals_single_process(runs):
    rank0, _, single = runs
    for key in ("past_down", "past_up", "qkv"):
        for name in single[key]:
            torch.testing.assert_close(rank0[key][name], single[key][name], rtol=1e-4, atol=1e-5)
    for name, (kind, basis) in single["memory"].items():
        assert rank0["memory"][name][0] == kind
        got = rank0["memory"][name][1]
        assert got.shape == basis.shape
        torch.testing.assert_close(got @ got.T, basis @ basis.T, rtol=0, atol=1e-6)
    assert rank0["metrics"] == single["metrics"]
    assert len(single["metrics"]) == 3  # two experiences and the stream


# ----------------------------------------------------------------------------------------------- SD-LoRA
def run_sdlora(out_path: str) -> None:
    """SD-LoRA, two experiences (the second trains old magnitudes too), no shuffling; save what must agree."""
    from conftest import tiny_vit
    from inflora_avalanche import SDLoRAStrategy, SDLoRAViT

    benchmark, evaluator = _stream_and_evaluator()
    model = SDLoRAViT(tiny_vit(), rank=3)
    strategy = SDLoRAStrategy(model=model, lr=1e-2, train_epochs=2, train_mb_size=GLOBAL_BATCH, eval_mb_size=5,
                              evaluator=evaluator)
    for experience in benchmark.train_stream:
        strategy.train(experience, shuffle=False)
    torch.save({"state": {k: v for k, v in model.trained_state_dict().items() if torch.is_tensor(v)}}, out_path)


def test_sdlora_distributed_equals_single_process(tmp_path):
    """Both factors, the shared magnitudes and the heads are all-reduced like InfLoRA's branches: the ranks agree
    bit for bit, and with one process to float rounding."""
    _spawn(run_sdlora, str(tmp_path))
    run_sdlora(str(tmp_path / "single.pt"))
    load = lambda name: torch.load(tmp_path / name, weights_only=False)["state"]  # noqa: E731
    rank0, rank1, single = load("rank0.pt"), load("rank1.pt"), load("single.pt")
    assert set(rank0) == set(single) and any(k.endswith("magnitudes") for k in single)
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-5)
