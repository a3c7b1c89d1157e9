"""The adapted ViT: branch shapes, merge equivalence, state round trip, backbones and bad input."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from conftest import tiny_vit
from inflora_avalanche import InfLoRALinear, InfLoRAViT, export_timm_checkpoint
from inflora_avalanche.lora import qkv_row_ranges


def finish_random_task(model: InfLoRAViT, classes: list[int], seed: int) -> None:
    """Open a task, give its branches random designed/trained values, and finish (merge) it."""
    gen = torch.Generator().manual_seed(seed)
    model.start_task(classes)
    for _, adapter in model.adapters():
        down, _ = torch.linalg.qr(torch.randn(adapter.in_features, model.rank, generator=gen))
        adapter.set_down(down.T / 3**0.5)
        with torch.no_grad():
            adapter.up.copy_(0.5 * torch.randn(adapter.up.shape, generator=gen))
    model.finish_task()


def test_branches_only_on_keys_and_values():
    model = InfLoRAViT(tiny_vit(), rank=3)
    x = torch.randn(2, 3, 32, 32)
    finish_random_task(model, [0, 1], seed=0)
    adapter = model.backbone.blocks[0].attn.qkv
    tokens = torch.randn(2, 5, 32)
    base = nn.functional.linear(tokens, adapter.base_layer.weight, adapter.base_layer.bias)
    adapter.unmerge()
    plain = nn.functional.linear(tokens, adapter.base_layer.weight, adapter.base_layer.bias)
    adapter.merge()
    torch.testing.assert_close(base[..., :32], plain[..., :32], rtol=0, atol=0)  # queries untouched
    assert (base[..., 32:] - plain[..., 32:]).abs().max() > 1e-3  # keys and values changed
    assert model(x).shape == (2, 2)


def test_merged_equals_unmerged():
    model = InfLoRAViT(tiny_vit(depth=3), rank=4).eval()
    for t in range(4):
        finish_random_task(model, [2 * t, 2 * t + 1], seed=t)
    model.start_task([8, 9])  # an open (current) branch too
    for _, adapter in model.adapters():
        adapter.set_down(torch.randn(adapter.down.shape) / 10)
        with torch.no_grad():
            adapter.up.normal_()
    x = torch.randn(4, 3, 32, 32)
    merged = model(x)
    features_merged = model.forward_features(x)
    model.unmerge()
    assert all(not a.merged for _, a in model.adapters())
    unmerged = model(x)
    features_unmerged = model.forward_features(x)
    rel = (features_merged - features_unmerged).norm() / features_unmerged.norm()
    assert rel <= 1e-5, f"relative error {rel:.2e}"
    assert ((merged - unmerged).norm() / unmerged.norm()) <= 1e-5
    model.merge()
    torch.testing.assert_close(model(x), merged, rtol=1e-5, atol=1e-6)


def test_finished_branch_state_is_frozen_and_freed():
    model = InfLoRAViT(tiny_vit(), rank=2)
    model.start_task([0, 1])
    params = model.trainable_parameters()
    assert len(params) == len(model.adapted_blocks) + 2  # ups + head weight and bias
    assert all(p.requires_grad for p in params)
    model.finish_task()
    assert model.trainable_parameters() == []
    assert not any(p.requires_grad for p in model.parameters() if p.numel())
    for _, adapter in model.adapters():
        assert adapter.up.numel() == 0 and adapter.down.numel() == 0
        assert adapter.past_down.shape == (2, 32) and adapter.past_up.shape == (64, 2)


def test_state_dict_round_trip_into_fresh_model():
    model = InfLoRAViT(tiny_vit(seed=0), rank=3, num_classes=10).eval()
    finish_random_task(model, [3, 7], seed=1)
    finish_random_task(model, [0, 9, 4], seed=2)
    state = model.state_dict()
    fresh = InfLoRAViT(tiny_vit(seed=5), rank=3).eval()  # different random init, no tasks yet
    fresh.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert fresh.task_classes == [[3, 7], [0, 9, 4]] and fresh.num_classes == 10
    # and it keeps learning: a new task starts cleanly
    fresh.start_task([1, 2])
    assert fresh.num_tasks == 3


def test_output_is_indexed_by_label():
    model = InfLoRAViT(tiny_vit(), rank=2).eval()
    finish_random_task(model, [5, 2], seed=0)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    heads = model.forward_heads(model.forward_pooled(x))
    assert out.shape == (2, 6)
    torch.testing.assert_close(out[:, [5, 2]], heads)
    assert (out[:, [0, 1, 3, 4]] <= -1e3).all()


def test_first_n_blocks_and_explicit_blocks():
    model = InfLoRAViT(tiny_vit(depth=4), rank=2, adapted_blocks=2)
    assert [name for name, _ in model.adapters()] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert not isinstance(model.backbone.blocks[2].attn.qkv, InfLoRALinear)
    model.configure(adapted_blocks=[1, 3])
    assert model.adapted_blocks == [1, 3]
    assert isinstance(model.backbone.blocks[3].attn.qkv, InfLoRALinear)
    assert not isinstance(model.backbone.blocks[0].attn.qkv, InfLoRALinear)


def test_dinov2_layer_scale_backbone():
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=2, embed_dim=48, num_heads=3, init_values=1e-5
    )
    model = InfLoRAViT(vit, rank=4).eval()
    finish_random_task(model, [0, 1, 2], seed=0)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 3)


def test_shared_pretrained_weights_load(shared_weights):
    model = InfLoRAViT(
        "vit_small_patch14_dinov2", rank=4, checkpoint_path=shared_weights, img_size=56, dynamic_img_size=True
    ).eval()
    assert model.feature_dim == 384 and len(model.adapted_blocks) == 12
    features = model.forward_pooled(torch.rand(2, 3, 56, 56))
    assert features.shape == (2, 384) and torch.isfinite(features).all()
    # real weights, not a random init: the patch embedding equals the file's (cast to fp32)
    from safetensors.torch import load_file

    state = load_file(shared_weights)
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, state["patch_embed.proj.weight"].float())


def test_wrong_checkpoint_is_refused(tmp_path, shared_weights):
    with pytest.raises(ValueError, match="does not fit"):
        InfLoRAViT("vit_base_patch16_224", checkpoint_path=shared_weights, rank=4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InfLoRAViT("vit_small_patch14_dinov2", checkpoint_path=tmp_path / "missing.safetensors")


@pytest.mark.parametrize("rank", [0, 32, 40, -1])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        InfLoRAViT(tiny_vit(), rank=rank)


def test_backbone_without_qkv_is_refused():
    resnet = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="attn.qkv"):
        InfLoRAViT(resnet, rank=4)


@pytest.mark.parametrize("blocks", [0, 3, [5], [-1]])
def test_bad_adapted_blocks(blocks):
    with pytest.raises(ValueError, match="adapted_blocks"):
        InfLoRAViT(tiny_vit(), rank=2, adapted_blocks=blocks)


def test_bad_tasks():
    model = InfLoRAViT(tiny_vit(), rank=2)
    with pytest.raises(ValueError, match="empty"):
        model.start_task([])
    model.start_task([0, 1])
    model.finish_task()
    with pytest.raises(ValueError, match="already learned"):
        model.start_task([1, 2])
    with pytest.raises(ValueError, match="before the first task"):
        model.configure(rank=3)


def test_offline_download_failure_explains_how_to_supply_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    # huggingface_hub reads the variable once, at import: without this the test waits for network timeouts (~45 s)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from inflora_avalanche import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="checkpoint_path"):
        InfLoRAViT("vit_tiny_patch16_224.augreg_in21k", rank=4, pretrained=True)


def test_export_from_the_model_rebuilds_with_recorded_timm_kwargs(tmp_path):
    model = InfLoRAViT("vit_tiny_patch16_224", rank=2, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    finish_random_task(model, [1, 0], seed=0)
    assert model.timm_kwargs["img_size"] == 32
    export_timm_checkpoint(model, tmp_path / "m")
    from safetensors.torch import load_file

    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, **model.timm_kwargs).eval()
    plain.load_state_dict(load_file(str(tmp_path / "m" / "model.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), model.eval()(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- delta weight
def test_get_delta_weight_is_the_one_low_rank_update():
    torch.manual_seed(0)
    adapter = InfLoRALinear(nn.Linear(16, 48), qkv_row_ranges(48, ("k", "v")))
    for _ in range(2):
        adapter.start_branch(3)
        adapter.set_down(torch.randn(3, 16))
        adapter.up.data.normal_()
        adapter.finish_branch()
    adapter.start_branch(3)
    adapter.set_down(torch.randn(3, 16))
    adapter.up.data.normal_()
    up = torch.cat([adapter.past_up, adapter.up.detach()], dim=1).double()
    down = torch.cat([adapter.past_down, adapter.down], dim=0).double()
    delta = adapter.get_delta_weight()
    assert delta.shape == adapter.base_layer.weight.shape and delta.dtype == torch.float64
    assert not delta[:16].any()  # queries untouched
    torch.testing.assert_close(delta[16:], up @ down)
    torch.testing.assert_close(adapter.get_delta_weight(current=False)[16:], up[:, :6] @ down[:6])
    torch.testing.assert_close(adapter.get_delta_weight(finished=False)[16:], up[:, 6:] @ down[6:])
    second = adapter.get_delta_weight(finished=slice(3, 6), current=False)
    torch.testing.assert_close(second[16:], up[:, 3:6] @ down[3:6])
    torch.testing.assert_close(adapter.get_delta_weight(finished=[0, 1, 2], current=False)[16:], up[:, :3] @ down[:3])
    assert not adapter.get_delta_weight(finished=[], current=False).any()
    # merged: qkv.weight already holds the finished branches; effective_weight adds the open one
    torch.testing.assert_close(
        adapter.effective_weight().double(), adapter.base_layer.weight.double() + adapter.get_delta_weight(finished=False)
    )
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), nn.functional.linear(x, adapter.effective_weight(), adapter.base_layer.bias))
    adapter.unmerge()
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), nn.functional.linear(x, adapter.effective_weight(), adapter.base_layer.bias))


@pytest.mark.parametrize("where", ["finish", "merge"])
def test_non_finite_merge_raises_naming_the_layer_and_leaves_the_weight(where):
    model = InfLoRAViT(tiny_vit(), rank=2)
    finish_random_task(model, [0, 1], seed=0)
    model.start_task([2])
    adapter = model.backbone.blocks[1].attn.qkv
    adapter.set_down(torch.randn(2, 32))
    if where == "merge":
        model.unmerge()
        adapter.past_up[5, 1] = float("inf")
    else:
        adapter.up.data[5, 1] = float("nan")
    before = adapter.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv: merging the \w+ branch.* non-finite"):
        model.finish_task() if where == "finish" else model.merge()
    assert torch.equal(adapter.base_layer.weight, before)


# ----------------------------------------------------------------------------------------------- timm interface
def test_forward_is_forward_head_of_forward_features():
    vit = tiny_vit()
    model = InfLoRAViT(vit, rank=2).eval()
    finish_random_task(model, [4, 1], seed=0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (3, 17, 32)  # timm's meaning: the token features, before pooling
        torch.testing.assert_close(features, model.backbone.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), model.forward_head(features), rtol=0, atol=0)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (3, model.num_features)
        torch.testing.assert_close(pooled, model.forward_pooled(x), rtol=0, atol=0)
        torch.testing.assert_close(pooled, model.backbone(x), rtol=0, atol=0)  # num_classes=0: the pooled feature
        torch.testing.assert_close(model(x)[:, [4, 1]], model.forward_heads(pooled), rtol=0, atol=0)


def test_pretrained_cfg_is_the_backbones_so_timm_resolves_its_data_config():
    from timm.data import resolve_model_data_config

    model = InfLoRAViT("vit_tiny_patch16_224", rank=2, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    data = resolve_model_data_config(model)
    assert data == resolve_model_data_config(model.backbone)
    assert data["mean"] == (0.5, 0.5, 0.5) and data["crop_pct"] == 0.9  # augreg's, not timm's ImageNet defaults
    assert model.default_cfg == model.pretrained_cfg == model.backbone.pretrained_cfg
    dino = InfLoRAViT("vit_small_patch14_dinov2", rank=2, img_size=28, depth=1, embed_dim=48, num_heads=3)
    assert resolve_model_data_config(dino)["input_size"] == (3, 518, 518)  # timm's default would be 224
    bare = InfLoRAViT(tiny_vit(), rank=2)  # a ready module: its own cfg
    assert bare.pretrained_cfg["architecture"] == "vit_tiny_patch16_224"


def test_timm_model_interface_serves_timm_optimiser_factory_and_layer_decay():
    model = InfLoRAViT(tiny_vit(), rank=2)
    assert model.no_weight_decay() == {f"backbone.{n}" for n in model.backbone.no_weight_decay()}
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier() is model.heads
    model.start_task([0, 1])
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[i]: s for i, s in scale_of.items()}
    assert set(trained) == {n for n, p in model.named_parameters() if p.requires_grad}
    # Deeper blocks decay less; the head is in the last (undecayed) group.
    block0 = {s for n, s in trained.items() if n.startswith("backbone.blocks.0.")}
    block1 = {s for n, s in trained.items() if n.startswith("backbone.blocks.1.")}
    assert len(block0) == len(block1) == 1 and block0.pop() < block1.pop() < 1.0
    assert all(s == 1.0 for n, s in trained.items() if n.startswith("heads."))
    with pytest.raises(ValueError, match="reset_classifier after 1 task"):
        model.reset_classifier(10)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model = InfLoRAViT(tiny_vit(), rank=2)
        model.set_grad_checkpointing(checkpointing)
        assert model.backbone.grad_checkpointing is checkpointing
        model.start_task([0, 1])
        for _, adapter in model.adapters():
            torch.nn.init.normal_(adapter.up, std=0.1)
        model.train()
        model(x)[:, :2].logsumexp(1).sum().backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_loading_a_state_of_another_rank_is_refused():
    trained = InfLoRAViT(tiny_vit(), rank=2)
    trained.start_task([0, 1])
    trained.finish_task()
    other = InfLoRAViT(tiny_vit(), rank=3)
    with pytest.raises(ValueError, match="trained with rank 2 but this model has rank 3; build the model with rank=2"):
        other.load_trained_state_dict(trained.trained_state_dict())
    assert other.rank == 3 and other.num_tasks == 0
