"""InfLoRA on any linear layer: the row-slice adapter, ``target_modules`` / ``qkv_rows``, and a strategy that trains,
remembers, merges and exports whatever layers it is given."""

from __future__ import annotations

import pytest
import timm
import torch
from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from conftest import TINY_VIT, SyntheticImages, tiny_vit
from inflora_avalanche import InfLoRALinear, InfLoRAStrategy, InfLoRAViT
from inflora_avalanche.export import export_timm_checkpoint, load_exported
from inflora_avalanche.lora import qkv_row_ranges

D = 32  # tiny_vit's width; its MLP is 4 x D wide


def _open_random_branch(adapter: InfLoRALinear, rank: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    adapter.start_branch(rank)
    adapter.set_down(torch.randn(rank, adapter.in_features, generator=gen))
    with torch.no_grad():
        adapter.up.copy_(torch.randn(adapter.up.shape, generator=gen))


# ----------------------------------------------------------------------------------------------- the adapter
def test_qkv_row_ranges_are_the_chosen_blocks_in_weight_order():
    assert qkv_row_ranges(3 * D, ("k", "v")) == ((D, 3 * D),)
    assert qkv_row_ranges(3 * D, ("v", "q")) == ((0, D), (2 * D, 3 * D))
    assert qkv_row_ranges(3 * D, ("q", "k", "v")) == ((0, 3 * D),)
    for bad in ((), ("k", "k"), ("x",)):
        with pytest.raises(ValueError, match="qkv_rows must be distinct letters"):
            qkv_row_ranges(3 * D, bad)
    with pytest.raises(ValueError, match="3 x attention-width"):
        qkv_row_ranges(3 * D + 1, ("k",))


@pytest.mark.parametrize("rows", [("q", "v"), ("k",), ("q", "k", "v"), None])
def test_branch_writes_exactly_its_rows(rows):
    """The output is the base layer's plus ``up @ down @ x`` on the adapted rows, the base output elsewhere, and the
    one delta weight says the same (open, finished-merged and finished-unmerged)."""
    torch.manual_seed(0)
    base = nn.Linear(D, 3 * D)
    ranges = None if rows is None else qkv_row_ranges(3 * D, rows)
    adapter = InfLoRALinear(base, ranges)
    x = torch.randn(5, 7, D)
    _open_random_branch(adapter, 3, seed=1)
    adapted = torch.zeros(3 * D, dtype=torch.bool)
    for start, stop in ranges or ((0, 3 * D),):
        adapted[start:stop] = True
    assert adapter.up.shape == (int(adapted.sum()), 3)
    with torch.no_grad():
        out, plain = adapter(x), base(x)
        torch.testing.assert_close(out[..., ~adapted], plain[..., ~adapted], rtol=0, atol=0)
        expected = plain[..., adapted] + x @ adapter.down.T @ adapter.up.T
        torch.testing.assert_close(out[..., adapted], expected, rtol=1e-5, atol=1e-5)
        delta = adapter.get_delta_weight()
        assert delta[~adapted].abs().sum() == 0
        torch.testing.assert_close(adapter.adapted(delta), adapter.up.double() @ adapter.down.double())
        torch.testing.assert_close(out, nn.functional.linear(x, adapter.effective_weight(), base.bias),
                                   rtol=1e-5, atol=1e-5)
        before = base.weight.clone()
        adapter.finish_branch()  # merged into the base weight
        torch.testing.assert_close(adapter(x), out, rtol=1e-5, atol=1e-5)
        assert torch.equal(base.weight[~adapted], before[~adapted]) and not torch.equal(base.weight, before)
        adapter.unmerge()  # re-summed in the forward
        torch.testing.assert_close(adapter(x), out, rtol=1e-5, atol=1e-5)


def test_only_the_up_projection_gets_gradients():
    adapter = InfLoRAViT(tiny_vit(), rank=2, target_modules="all-linear")
    adapter.start_task([0, 1])
    for _, layer in adapter.adapters():
        layer.set_down(torch.randn_like(layer.down))
    adapter(torch.randn(2, 3, 32, 32)).sum().backward()
    trained = {id(p) for p in adapter.trainable_parameters()}
    for name, p in adapter.named_parameters():
        if id(p) in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


# ----------------------------------------------------------------------------------------------- targets
def test_default_targets_are_the_references_key_and_value_rows():
    model = InfLoRAViT(tiny_vit(), rank=2)
    assert model.target_modules == ("attn.qkv",) and model.qkv_rows == ("k", "v")
    assert [n for n, _ in model.adapters()] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert all(a.row_ranges == ((D, 3 * D),) for _, a in model.adapters())


def test_target_modules_place_one_adapter_per_matching_linear():
    model = InfLoRAViT(tiny_vit(), rank=2, target_modules=["mlp.fc1", "attn.qkv"], qkv_rows=["v", "q"],
                       adapted_blocks=[1])
    adapters = dict(model.adapters())
    assert list(adapters) == ["blocks.1.attn.qkv", "blocks.1.mlp.fc1"]  # module order within the block
    assert adapters["blocks.1.attn.qkv"].row_ranges == ((0, D), (2 * D, 3 * D))
    assert adapters["blocks.1.mlp.fc1"].row_ranges == ((0, 4 * D),) and adapters["blocks.1.mlp.fc1"].in_features == D
    assert not isinstance(model.backbone.blocks[0].mlp.fc1, InfLoRALinear)
    # PEFT-style suffixes, and every linear layer of each adapted block
    assert [n for n, _ in InfLoRAViT(tiny_vit(), rank=2, target_modules=["fc2"]).adapters()] == [
        "blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    every = [n for n, _ in InfLoRAViT(tiny_vit(), rank=2, target_modules="all-linear").adapters()]
    assert every == [f"blocks.{b}.{m}" for b in (0, 1) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules=["mlp.fc3"]), r"target module 'mlp.fc3' is not in block 0 \(Block\); its linear layers are "
                                       r"attn.qkv, attn.proj, mlp.fc1, mlp.fc2"),
    (dict(target_modules=["mlp.act"]), r"'mlp.act' is mlp.act in block 0, a GELU, not an nn.Linear"),
    (dict(target_modules=[]), r"target_modules must be module names"),
    (dict(target_modules=["all-linear", "mlp.fc1"]), r"'all-linear' already takes every linear layer"),
    (dict(target_modules=["mlp.fc1"], qkv_rows=["q"]), r"qkv_rows=\['q'\] applies to a fused qkv layer"),
    (dict(qkv_rows=["k", "z"]), r"qkv_rows must be distinct letters"),
    (dict(target_modules=["mlp.fc1"], rank=32), r"rank must be an integer in \[1, 31\]"),
])
def test_bad_targets_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        InfLoRAViT(tiny_vit(), **{"rank": 2, **kwargs})
    assert "\n" not in str(info.value)


class _ReadsItsWeight(nn.Module):
    """An MLP whose forward reads ``fc1.weight`` instead of calling ``fc1``: a branch there would be skipped."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = mlp.fc1, mlp.act, mlp.fc2

    def forward(self, x):
        return self.fc2(self.act(nn.functional.linear(x, self.fc1.weight, self.fc1.bias)))


def test_a_target_its_module_bypasses_is_refused():
    vit = tiny_vit()
    for block in vit.blocks:
        block.mlp = _ReadsItsWeight(block.mlp)
    with pytest.raises(ValueError, match=r"_ReadsItsWeight.forward never calls mlp.fc1\(x\)"):
        InfLoRAViT(vit, rank=2, target_modules=["mlp.fc1"])
    assert len(list(InfLoRAViT(vit, rank=2, target_modules=["mlp.fc2"]).adapters())) == 2


def test_structure_changes_before_the_first_task_only():
    model = InfLoRAViT(tiny_vit(), rank=2)
    model.configure(target_modules=["mlp.fc2"])
    assert [n for n, _ in model.adapters()] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert isinstance(model.backbone.blocks[0].attn.qkv, nn.Linear)  # the old adapter is gone, the layer restored
    model.start_task([0])
    with pytest.raises(ValueError, match="only change before the first task"):
        model.configure(target_modules=["mlp.fc1"])


def test_a_checkpoint_of_other_targets_is_refused():
    saved = InfLoRAViT(tiny_vit(), rank=2, target_modules=["mlp.fc1"])
    saved.start_task([0, 1])
    saved.finish_task()
    other = InfLoRAViT(tiny_vit(), rank=2)
    with pytest.raises(ValueError, match=r"checkpoint adapts the layers .*mlp.fc1.* but this model adapts"):
        other.load_trained_state_dict(saved.trained_state_dict())


def test_a_checkpoint_of_version_0_2_loads():
    """0.2 named the wrapped layer ``qkv`` (``...attn.qkv.qkv.weight``); such checkpoints still load."""
    model = InfLoRAViT(tiny_vit(), rank=2)
    model.start_task([0, 1])
    for _, adapter in model.adapters():
        adapter.set_down(torch.randn_like(adapter.down))
        with torch.no_grad():
            adapter.up.normal_()
    model.finish_task()
    old = {k.replace(".attn.qkv.base_layer.", ".attn.qkv.qkv."): v for k, v in model.trained_state_dict().items()}
    fresh = InfLoRAViT(tiny_vit(), rank=2)
    fresh.load_trained_state_dict(old)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- end to end
def _bench():
    classes = list(range(4))
    return nc_benchmark(SyntheticImages(classes, 12, 0, patterns_per_group=3),
                        SyntheticImages(classes, 6, 1, patterns_per_group=3),
                        n_experiences=2, task_labels=False, seed=0, fixed_class_order=classes)


def test_every_adapted_layer_has_its_own_covariance_design_and_memory(tmp_path):
    torch.manual_seed(0)
    model = InfLoRAViT(tiny_vit(), rank=2, target_modules=["attn.qkv", "mlp.fc2"])
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()
              if ".mlp.fc2." not in k and ".attn.qkv." not in k}
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    strategy = InfLoRAStrategy(model=model, lr=1e-2, train_epochs=2, train_mb_size=8, evaluator=evaluator)
    bench = _bench()
    for experience in bench.train_stream:
        strategy.train(experience)
    memories = strategy.subspace_plugin.memories
    assert set(memories) == {n for n, _ in model.adapters()}
    for name, adapter in model.adapters():
        assert memories[name].dim == adapter.in_features  # 4 x D for fc2, D for qkv
        assert memories[name].old_space_dim() > 0
        assert adapter.num_finished == 4 and not adapter.rank  # two tasks of rank 2, both merged
        # the second task's down avoids the first task's input subspace, which the memory holds: exactly where the
        # layer's inputs did not change with training (the first block's qkv), nearly elsewhere
        first = adapter.past_down[:2].double()
        second = adapter.past_down[2:].double()
        tolerance = 1e-5 if name == "blocks.0.attn.qkv" else 0.05
        assert (second @ first.T).abs().max() < tolerance * second.norm(dim=1).max() ** 2, name
    # nothing outside the adapted layers moved; the merged layers did
    after = model.backbone.state_dict()
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key
    # export folds every branch into its layer: the timm model predicts what the live model predicts
    export_timm_checkpoint(model, tmp_path / "export", timm_kwargs=TINY_VIT)
    net, _ = load_exported(tmp_path / "export")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        live = model.eval()(x)[:, :4]
        torch.testing.assert_close(net.eval()(x), live, rtol=1e-4, atol=1e-4)
    assert isinstance(net, timm.models.VisionTransformer)


def test_a_refused_configuration_changes_nothing():
    model = InfLoRAViT(tiny_vit(), rank=2)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 31\]"):
        model.configure(rank=1000, target_modules=["mlp.fc1"])
    assert [n for n, _ in model.adapters()] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"] and model.rank == 2
    assert isinstance(model.backbone.blocks[0].mlp.fc1, nn.Linear)
