"""Every timm ViT-family backbone either works with InfLoRA or is refused at construction with a one-line reason.

"Works" means, on a tiny random version of the model: the branch changes the output when ``up`` is non-zero, the
input hooks the subspace plugin relies on see every adapted layer, ``up`` receives gradients, the merged and unmerged
models agree, and the export reloads with timm alone (``local-dir:``) with the same logits.
"""

from __future__ import annotations

import pytest
import timm
import torch

from inflora_avalanche import InfLoRAViT
from inflora_avalanche.export import export_timm_checkpoint, load_exported

SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
P14 = dict(img_size=28, depth=2, embed_dim=32, num_heads=2)

WORKS = {
    "vit_tiny_patch16_224": SMALL,
    "deit_tiny_patch16_224": SMALL,
    "deit_tiny_distilled_patch16_224": SMALL,  # two classifier heads, averaged
    "deit3_small_patch16_224": SMALL,  # layer scale
    "vit_small_patch14_dinov2": dict(P14, embed_dim=48, num_heads=3),  # layer scale
    "vit_small_patch14_reg4_dinov2": dict(P14, embed_dim=48, num_heads=3),  # register tokens
    "flexivit_small": SMALL,
    "vit_base_patch16_clip_224": SMALL,  # pre-norm
    "vit_base_patch16_siglip_224": SMALL,  # attention-pool (MAP) head
    "vit_base_patch16_reg4_gap_256": SMALL,  # average pooling
    "vit_relpos_small_patch16_224": SMALL,  # relative position attention
    "vit_base_patch16_rope_224": SMALL,  # rotary embeddings (EVA attention, fused qkv with q/v bias)
    "eva02_tiny_patch14_224": P14,  # rotary embeddings, SwiGLU, q/v bias read by F.linear
    "beit_base_patch16_224": SMALL,  # relative position bias, q/v bias read by F.linear
    "xcit_nano_12_p16_224": dict(img_size=32, depth=2, embed_dim=32, num_heads=2),  # cross-covariance attention
    "cait_xxs24_224": SMALL,  # talking heads, class-attention blocks after the adapted ones
    "hiera_tiny_224": dict(img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)),  # widths change per stage
}

REFUSED = {
    "vit_small_patch16_18x2_224": (SMALL, r"ParallelThingsBlock"),
    "convit_tiny": (dict(SMALL, local_up_to_layer=1), r"GPSA without a fused qkv"),
    "eva02_base_patch14_224": (P14, r"EvaAttention with separate q/k/v projections"),
    "twins_svt_small": (  # blocks are lists of blocks
        dict(img_size=32, embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), wss=(2, 2, 2, 2)),
        r"block 0 \(ModuleList\) has no attention",
    ),
    "swin_tiny_patch4_window7_224": (
        dict(img_size=32, window_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
        r"no list of transformer blocks",
    ),
}


def _input(name: str, kwargs: dict) -> torch.Tensor:
    size = kwargs.get("img_size", 32)
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _randomise_branches(model: InfLoRAViT, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, adapter in model.adapters():
        adapter.set_down(torch.randn(adapter.down.shape, generator=gen) / 3)
        with torch.no_grad():
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=gen))


@pytest.mark.parametrize("name", sorted(WORKS))
def test_backbone_works(name, tmp_path):
    kwargs = WORKS[name]
    torch.manual_seed(0)
    model = InfLoRAViT(name, rank=2, **kwargs).eval()
    with torch.no_grad():  # trained-like layer scales: random init scales branches (and blocks) by 1e-5
        for key, param in model.backbone.named_parameters():
            if "gamma" in key:
                param.fill_(1.0)
    x = _input(name, kwargs)
    model.start_task([0, 2])
    seen: set[str] = set()
    handles = [a.register_forward_pre_hook(lambda m, args, n=n: seen.add(n)) for n, a in model.adapters()]
    with torch.no_grad():
        before = model(x)
    for handle in handles:
        handle.remove()
    assert seen == {n for n, _ in model.adapters()}, "the input hooks (covariances) must see every adapted layer"

    _randomise_branches(model, seed=1)
    out = model(x)
    assert (out - before).abs().max() > 1e-5, "a non-zero up must change the output"
    out[:, [0, 2]].sum().backward()
    assert all(a.up.grad is not None and a.up.grad.abs().sum() > 0 for _, a in model.adapters())
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), out, rtol=0, atol=0)

    model.finish_task()
    model.start_task([1])
    _randomise_branches(model, seed=2)
    with torch.no_grad():
        merged = model(x)
        model.unmerge()
        unmerged = model(x)
        model.merge()
    assert (merged - unmerged).norm() <= 1e-5 * unmerged.norm()

    export_timm_checkpoint(model, tmp_path / "export")
    net, config = load_exported(tmp_path / "export")
    assert type(net).__module__.startswith("timm.") and config["architecture"] == name
    with torch.no_grad():
        torch.testing.assert_close(net(x), merged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_backbone_is_refused_with_a_reason(name):
    kwargs, reason = REFUSED[name]
    with pytest.raises(ValueError, match=reason) as info:
        InfLoRAViT(name, rank=2, **kwargs)
    message = str(info.value)
    assert "\n" not in message and name in message
    assert "is not supported" in message or "has no list of transformer blocks" in message


class _DirectWeightAttention(torch.nn.Module):
    """An attention that reads ``qkv.weight`` itself, as timm's Swin-V2 does: the branch would be skipped."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_attention_that_bypasses_qkv_is_refused_and_guarded_at_run_time():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL)
    for block in vit.blocks:
        block.attn = _DirectWeightAttention(32)
    with pytest.raises(ValueError, match=r"never calls attn.qkv\(x\)"):
        InfLoRAViT(vit, rank=2)
    # Without source to inspect, the adapter itself refuses to be read as a Linear, naming the layer.
    from inflora_avalanche import InfLoRALinear

    adapter = InfLoRALinear(torch.nn.Linear(8, 24))
    adapter.layer_name = "blocks.0.attn.qkv"
    with pytest.raises(AttributeError, match=r"blocks\.0\.attn\.qkv.*read \.weight of this layer directly"):
        adapter.weight  # noqa: B018


def test_beit_bias_path_is_restored_when_a_block_is_no_longer_adapted():
    model = InfLoRAViT("beit_base_patch16_224", rank=2, **SMALL)
    assert all(block.attn.qkv_bias_separate for block in model.backbone.blocks)
    model.configure(adapted_blocks=[1])
    assert model.backbone.blocks[0].attn.qkv_bias_separate is False
    assert isinstance(model.backbone.blocks[0].attn.qkv, torch.nn.Linear)
    assert model.backbone.blocks[1].attn.qkv_bias_separate is True
