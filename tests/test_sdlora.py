"""SD-LoRA against its official code: outputs, gradients and magnitudes recorded from the official
``backbone/lora.py`` (``tests/data/sdlora_official.safetensors``, made by ``benchmarks/sdlora_reference_vectors.py``
from WuYichen-97/SD-Lora-CL at the commit its metadata names), compared with ours on the same weights and inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from conftest import tiny_vit
from inflora_avalanche.sdlora import RANK_REDUCTION, SDLoRAViT

VECTORS = Path(__file__).parent / "data" / "sdlora_official.safetensors"


@pytest.fixture(scope="module")
def official():
    with safe_open(str(VECTORS), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["meta"])
    return tensors, meta


def _model(official, task: int, alphas: list[float], prefix: str = "task") -> SDLoRAViT:
    """Our model with the official run's ViT, the pairs of tasks 0..task (``prefix`` selects the recorded set) and
    the given magnitudes (old tasks first, then the current one)."""
    tensors, meta = official
    kwargs = {k: v for k, v in meta["vit_kwargs"].items() if k not in ("pretrained", "num_classes")}
    vit = timm.create_model(meta["vit_name"], pretrained=False, num_classes=0, **kwargs)
    vit.load_state_dict({k[len("vit."):]: v for k, v in tensors.items() if k.startswith("vit.")})
    model = SDLoRAViT(vit, rank=meta["rank"]).eval()
    blocks = meta["n_blocks"]
    for t in range(task + 1):
        model.start_task([2 * t, 2 * t + 1])
        with torch.no_grad():
            for b in range(blocks):
                adapter = model.backbone.blocks[b].attn.qkv
                for j, part in enumerate("qv"):
                    adapter.down[j].copy_(tensors[f"{prefix}{t}.block{b}.{part}.A"])
                    adapter.up[j].copy_(tensors[f"{prefix}{t}.block{b}.{part}.B"])
        if t < task:
            model.finish_task()
    with torch.no_grad():
        model.magnitudes.copy_(torch.tensor(alphas))
    return model


def _alphas(meta, key: str) -> list[float]:
    entry = meta["alphas"][key]
    return list(entry["old"]) + [entry["cur"]]


@pytest.mark.parametrize("task", [0, 1, 2])
def test_forward_equals_the_official_code(official, task):
    tensors, meta = official
    model = _model(official, task, _alphas(meta, f"task{task}"))
    with torch.no_grad():
        features = model.forward_pooled(tensors["x"])
        qkv = model.backbone.blocks[0].attn.qkv(tensors["x_tokens"])
    torch.testing.assert_close(features, tensors[f"task{task}.features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv, tensors[f"task{task}.block0.qkv"], rtol=1e-5, atol=1e-5)
    d = meta["embed_dim"]  # keys are the frozen projection's: SD-LoRA adapts q and v only
    base = model.backbone.blocks[0].attn.qkv.base_layer(tensors["x_tokens"]).detach()
    assert torch.equal(qkv[..., d:2 * d], base[..., d:2 * d])


def test_old_directions_are_divided_by_the_product_of_norms(official):
    """A pair with ||B A|| << ||B|| ||A||: the official code divides by ||B|| ||A|| (not ||B A||), and so do we."""
    tensors, meta = official
    model = _model(official, 1, [*meta["alphas_norm_case"]["task1"]["old"], meta["alphas_norm_case"]["task1"]["cur"]],
                   prefix="norm.task")
    with torch.no_grad():
        torch.testing.assert_close(model.forward_pooled(tensors["x"]), tensors["norm.task1.features"],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.backbone.blocks[0].attn.qkv(tensors["x_tokens"]),
                                   tensors["norm.task1.block0.qkv"], rtol=1e-5, atol=1e-5)


def test_gradients_equal_the_official_code_on_the_first_step_of_a_task(official):
    """Task 2 with B_2 = 0 (its first step): gradients on B_2 and the old magnitudes, exactly zero on A_2 and on the
    current magnitude, none on the ViT; old pairs are buffers. Every magnitude is shared by all blocks."""
    tensors, meta = official
    model = _model(official, 2, _alphas(meta, "task2"))
    with torch.no_grad():
        for _, adapter in model.adapters():
            adapter.up.zero_()
    model.forward_pooled(tensors["x"]).sum().backward()
    grads = {k[len("task2_zeroB.grad."):]: v for k, v in tensors.items() if k.startswith("task2_zeroB.grad.")}
    for b in range(meta["n_blocks"]):
        adapter = model.backbone.blocks[b].attn.qkv
        for j, part in enumerate("qv"):
            assert torch.equal(adapter.down.grad[j], torch.zeros_like(adapter.down.grad[j]))
            torch.testing.assert_close(adapter.up.grad[j], grads[f"block{b}.{part}.B"], rtol=1e-4, atol=1e-6)
            assert grads[f"block{b}.{part}.A"].abs().max() == 0
    alpha_grad = model.magnitudes.grad
    torch.testing.assert_close(alpha_grad[:2], torch.stack([grads["alpha.prev0"], grads["alpha.prev1"]]).reshape(2),
                               rtol=1e-4, atol=1e-6)
    assert alpha_grad[2] == 0 and grads["alpha.cur"].abs().max() == 0
    trained = {id(p) for p in model.trainable_parameters()}
    assert {n for n, p in model.named_parameters() if p.grad is not None and id(p) not in trained} == set()
    groups = model.trainable_parameter_groups()  # features only: the head is not on this path
    assert all(p.grad is not None for p in groups["branches"] + groups["magnitudes"])


def test_gradients_with_trained_pairs_equal_the_official_code(official):
    tensors, meta = official
    model = _model(official, 2, _alphas(meta, "task2"))
    model.forward_pooled(tensors["x"]).sum().backward()
    for b in range(meta["n_blocks"]):
        adapter = model.backbone.blocks[b].attn.qkv
        for j, part in enumerate("qv"):
            torch.testing.assert_close(adapter.down.grad[j], tensors[f"task2.grad.block{b}.{part}.A"],
                                       rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(adapter.up.grad[j], tensors[f"task2.grad.block{b}.{part}.B"],
                                       rtol=1e-4, atol=1e-6)
    expected = torch.stack([tensors["task2.grad.alpha.prev0"], tensors["task2.grad.alpha.prev1"],
                            tensors["task2.grad.alpha.cur"]]).reshape(3)
    torch.testing.assert_close(model.magnitudes.grad, expected, rtol=1e-4, atol=1e-6)


def test_a_new_task_resets_every_magnitude_as_the_official_code(official):
    """At a task boundary the official code re-creates every magnitude at 0.8: the task-2 model then computes
    W0 + sum_i 0.8 dir_i (+ 0.8 B_2 A_2)."""
    tensors, meta = official
    model = _model(official, 2, [meta["alphas_default"]] * 3)
    reset = _model(official, 2, [0.1, 0.2, 0.3])
    reset.finish_task()
    reset.start_task([100])
    assert reset.magnitudes.tolist() == pytest.approx([0.8] * 4)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.blocks[0].attn.qkv(tensors["x_tokens"]),
                                   tensors["task2_default_alpha.block0.qkv"], rtol=1e-5, atol=1e-5)
    kept = SDLoRAViT(tiny_vit(), rank=2, reset_magnitudes=False)
    kept.start_task([0, 1])
    with torch.no_grad():
        kept.magnitudes.fill_(1.7)
    kept.finish_task()
    kept.start_task([2, 3])
    assert kept.magnitudes.tolist() == pytest.approx([1.7, 0.8])


def test_folding_is_the_merged_weight_formula_and_restores_exactly(official):
    """W_q = W_q0 + sum_{i<t} alpha_i B_i A_i / (||B_i|| ||A_i||) + alpha_t B_t A_t (v alike; k and biases kept):
    the folded forward equals the unfolded one, and unfolding gives back the exact weights."""
    tensors, meta = official
    alphas = _alphas(meta, "task2")
    model = _model(official, 2, alphas)
    adapter = model.backbone.blocks[1].attn.qkv
    d = meta["embed_dim"]
    w0 = adapter.base_layer.weight.detach().clone()
    expected = w0.double().clone()
    for j, (part, rows) in enumerate((("q", slice(0, d)), ("v", slice(2 * d, 3 * d)))):
        for t in range(3):
            a = tensors[f"task{t}.block1.{part}.A"].double()
            b = tensors[f"task{t}.block1.{part}.B"].double()
            scale = alphas[t] if t == 2 else alphas[t] / (b.norm() * a.norm())
            expected[rows] += scale * (b @ a)
    torch.testing.assert_close(adapter.effective_weight().double(), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        unfolded = model.forward_pooled(tensors["x"])
        with model.folded():
            assert adapter.folded
            folded = model.forward_pooled(tensors["x"])
        assert torch.equal(adapter.base_layer.weight, w0) and not adapter.folded
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)


def test_rank_reduction_schedule():
    model = SDLoRAViT(tiny_vit(), rank=10, rank_schedule=RANK_REDUCTION)
    assert [model.branch_rank(t) for t in (0, 3, 4, 7, 8, 15)] == [10, 10, 8, 8, 6, 6]
    for t in range(5):
        model.start_task([t])
        assert all(a.rank == model.branch_rank(t) for _, a in model.adapters())
        model.finish_task()
    adapter = model.backbone.blocks[0].attn.qkv
    assert adapter.num_finished == 4 * 10 + 8 and adapter.past_task.tolist()[-8:] == [4] * 8
    with pytest.raises(ValueError, match="rank_schedule must be"):
        SDLoRAViT(tiny_vit(), rank=10, rank_schedule=((4, 8), (0, 10)))


def test_state_round_trip_continues_exactly(official):
    tensors, meta = official
    model = _model(official, 2, _alphas(meta, "task2"))
    model.finish_task()
    fresh = _model(official, 0, [0.8])
    fresh.finish_task()
    fresh_vit_state = {k: v.clone() for k, v in fresh.backbone.state_dict().items() if "qkv" not in k}
    fresh.load_trained_state_dict(model.trained_state_dict())
    assert {k: v for k, v in fresh.backbone.state_dict().items() if "qkv" not in k}.keys() == fresh_vit_state.keys()
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_pooled(tensors["x"]), model.forward_pooled(tensors["x"]),
                                   rtol=0, atol=0)
    for m in (model, fresh):
        m.start_task([50, 51])
    assert fresh.magnitudes.shape == model.magnitudes.shape == (4,)


# ----------------------------------------------------------------------------------------------- the strategy
def _sd_strategy(seed=0, **kwargs):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from inflora_avalanche import SDLoRAStrategy

    torch.manual_seed(seed)
    model = SDLoRAViT(tiny_vit(seed=seed), rank=2)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    return SDLoRAStrategy(model=model, lr=5e-2, train_epochs=2, train_mb_size=8, evaluator=evaluator, **kwargs)


def _sd_bench():
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark

    from conftest import SyntheticImages

    classes = list(range(6))
    return nc_benchmark(SyntheticImages(classes, 12, 0), SyntheticImages(classes, 6, 1), n_experiences=3,
                        task_labels=False, seed=0, fixed_class_order=classes)


def test_strategy_learns_trains_the_official_parameters_and_evaluates_folded():
    strategy = _sd_strategy()
    model = strategy.model
    bench = _sd_bench()
    seen_groups = []

    class Groups:  # the optimiser of each task: SGD with momentum over pairs, head and magnitudes
        def before_training_epoch(self, strategy, **kwargs):
            opt = strategy.optimizer
            seen_groups.append((type(opt).__name__, opt.defaults["momentum"],
                                sum(p.numel() for g in opt.param_groups for p in g["params"])))

    strategy.plugins.append(Groups())
    for t, experience in enumerate(bench.train_stream):
        weights = {n: a.base_layer.weight.clone() for n, a in model.adapters()}
        strategy.train(experience)
        results = strategy.eval(bench.test_stream[: t + 1])
        for n, a in model.adapters():  # training and the folded evaluation leave the frozen weights exactly
            assert torch.equal(a.base_layer.weight, weights[n]) and not a.folded
    accuracy = next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream"))
    assert accuracy > 0.5, results  # 6 classes: chance is 1/6
    assert model.magnitudes.numel() == 3 and not torch.allclose(model.magnitudes, torch.full((3,), 0.8))
    pairs = 2 * 2 * (2 * 32 + 32 * 2)  # blocks x (q, v) x (A + B) at rank 2, width 32
    assert seen_groups[0] == ("SGD", 0.9, pairs + (32 * 2 + 2) + 1)
    assert seen_groups[-1] == ("SGD", 0.9, pairs + (32 * 2 + 2) + 3)


def test_sdlora_restore_continues_exactly(tmp_path):
    from inflora_avalanche import load_strategy, save_strategy

    bench = _sd_bench()
    uninterrupted = _sd_strategy()
    uninterrupted.train(bench.train_stream[0])
    uninterrupted.eval(bench.test_stream[:1])
    save_strategy(uninterrupted, tmp_path / "ckpt.safetensors")
    uninterrupted.train(bench.train_stream[1])
    expected = uninterrupted.eval(bench.test_stream[:2])
    torch.manual_seed(99)
    restored = _sd_strategy()
    load_strategy(restored, tmp_path / "ckpt.safetensors")
    restored.train(bench.train_stream[1])
    assert restored.eval(bench.test_stream[:2]) == expected
    a, b = uninterrupted.model.state_dict(), restored.model.state_dict()
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key


def test_export_folds_every_branch_with_the_current_magnitudes(tmp_path):
    from conftest import TINY_VIT
    from inflora_avalanche.export import export_timm_checkpoint, load_exported

    strategy = _sd_strategy()
    bench = _sd_bench()
    for experience in bench.train_stream[:2]:
        strategy.train(experience)
    model = strategy.model
    export_timm_checkpoint(model, tmp_path / "export", timm_kwargs=TINY_VIT)
    net, _ = load_exported(tmp_path / "export")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x)[:, :4], model.eval()(x)[:, :4], rtol=1e-4, atol=1e-4)
    assert not any(a.folded for _, a in model.adapters())


def test_folded_branches_are_for_evaluation_only():
    model = SDLoRAViT(tiny_vit(), rank=2)
    model.start_task([0, 1])
    x = torch.randn(2, 3, 32, 32)
    with model.folded():
        with pytest.raises(RuntimeError, match="is folded: its branches and magnitudes would get no gradient"):
            model(x)
        with pytest.raises(RuntimeError, match="cannot finish a task while the branches are folded"):
            model.finish_task()
        with torch.no_grad():
            model(x)  # evaluation is what folding is for


def test_a_checkpoint_of_other_sdlora_settings_is_refused():
    saved = SDLoRAViT(tiny_vit(), rank=2, reset_magnitudes=False)
    saved.start_task([0, 1])
    saved.finish_task()
    other = SDLoRAViT(tiny_vit(), rank=2)
    with pytest.raises(ValueError, match="checkpoint was made with reset_magnitudes=False"):
        other.load_trained_state_dict(saved.trained_state_dict())
