"""MoCo v3 ViT on torchvision (docs/method.md#vit-recipe): sin-cos position embedding worked by hand, init
bounds, frozen patch projection, shapes, and equivalence with timm's ViT after key renaming."""

import math
from functools import partial

import pytest
import torch
from torch import nn

from bfcl.vit import (
    build_vit,
    is_timm_vit_state,
    sincos_pos_embedding,
    timm_to_torchvision,
    vit_config_from_state,
)


@pytest.fixture(scope="module")
def vit_small():
    torch.manual_seed(0)
    return build_vit("vit_small", image_size=32, patch_size=8)


def layers(vit):
    return [vit.encoder.layers[i] for i in range(len(vit.encoder.layers))]


def test_sincos_grid2_dim8_by_hand():
    # pos_dim = 2, omega = [1, 1e4^-1/2 = 0.01]; meshgrid 'ij' flattened: (w, h) = 00, 01, 10, 11.
    # Each row: sin(w), sin(.01w), cos(w), cos(.01w), sin(h), sin(.01h), cos(h), cos(.01h).
    s1, c1, s01, c01 = 0.8414709848, 0.5403023059, 0.0099998333, 0.9999500004
    zero = [0.0, 0.0, 1.0, 1.0]  # sin 0, sin 0, cos 0, cos 0
    one = [s1, s01, c1, c01]
    expected = torch.tensor(
        [
            [0.0] * 8,  # cls
            zero + zero,  # w=0, h=0
            zero + one,  # w=0, h=1
            one + zero,  # w=1, h=0
            one + one,  # w=1, h=1
        ]
    )
    emb = sincos_pos_embedding(2, 8)
    assert emb.shape == (1, 5, 8)
    torch.testing.assert_close(emb[0], expected, atol=1e-6, rtol=0)


def test_sincos_shape_cls_row_and_width_check():
    emb = sincos_pos_embedding(4, 192)
    assert emb.shape == (1, 17, 192)
    assert torch.equal(emb[0, 0], torch.zeros(192))
    # last token (w=3, h=3), channel 0 is sin(3 * omega_0) = sin 3; channel D/2 + D/4 - 1 is
    # cos(3 * 1e4^-(47/48)).
    assert emb[0, 16, 0].item() == pytest.approx(math.sin(3.0), abs=1e-6)
    assert emb[0, 16, 96 + 48 + 47].item() == pytest.approx(math.cos(3 * 1e4 ** (-47 / 48)), abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embedding(4, 10)


def test_built_model_holds_frozen_sincos(vit_small):
    pos = vit_small.encoder.pos_embedding
    assert torch.equal(pos, sincos_pos_embedding(4, 384))
    assert not pos.requires_grad


def test_qkv_init_as_three_separate_xavier_matrices(vit_small):
    d = 384
    bound = math.sqrt(6 / (d + d))  # sqrt(6 / (out/3 + in)); torchvision's would be sqrt(6 / 4D)
    for layer in layers(vit_small):
        attn = layer.self_attention
        for w in attn.in_proj_weight.detach().chunk(3):  # q, k, v: [D, D] each
            assert w.abs().max() <= bound
            assert w.abs().max() >= 0.999 * bound
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
        assert torch.equal(attn.in_proj_bias, torch.zeros(3 * d))
        # out_proj xavier too (torchvision leaves it at PyTorch's Linear default, bound 1/sqrt(D))
        w = attn.out_proj.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() >= 0.999 * bound
        assert torch.equal(attn.out_proj.bias, torch.zeros(d))


def test_mlp_patch_cls_and_layernorm_init(vit_small):
    d, p = 384, 8
    mlp_bound = math.sqrt(6 / (d + 4 * d))
    for layer in layers(vit_small):
        for linear in (layer.mlp[0], layer.mlp[3]):  # fc1 [4D, D], fc2 [D, 4D]
            w = linear.weight.detach()
            assert w.abs().max() <= mlp_bound and w.abs().max() >= 0.999 * mlp_bound
            assert w.std().item() == pytest.approx(mlp_bound / math.sqrt(3), rel=0.02)
            assert torch.equal(linear.bias, torch.zeros_like(linear.bias))  # torchvision: N(0, 1e-6)
        for ln in (layer.ln_1, layer.ln_2):
            assert torch.equal(ln.weight, torch.ones(d)) and torch.equal(ln.bias, torch.zeros(d))
            assert ln.eps == 1e-6
    assert vit_small.encoder.ln.eps == 1e-6
    conv = vit_small.conv_proj.weight.detach()  # [D, 3, p, p]
    conv_bound = math.sqrt(6 / (3 * p * p + d))
    assert conv.abs().max() <= conv_bound and conv.abs().max() >= 0.999 * conv_bound
    assert conv.std().item() == pytest.approx(conv_bound / math.sqrt(3), rel=0.02)
    assert torch.equal(vit_small.conv_proj.bias, torch.zeros(d))
    cls_std = vit_small.class_token.std().item()  # N(0, 1e-6) over 384 values
    assert 0.8e-6 < cls_std < 1.2e-6


def test_stop_grad_conv1_freezes_patch_projection_only():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    frozen = build_vit("vit_tiny", image_size=32, patch_size=8)
    assert not frozen.conv_proj.weight.requires_grad and not frozen.conv_proj.bias.requires_grad
    frozen(x).square().sum().backward()
    assert frozen.conv_proj.weight.grad is None and frozen.encoder.pos_embedding.grad is None
    assert frozen.class_token.grad is not None and frozen.encoder.ln.weight.grad is not None

    trainable = build_vit("vit_tiny", image_size=32, patch_size=8, stop_grad_conv1=False)
    assert trainable.conv_proj.weight.requires_grad and trainable.conv_proj.bias.requires_grad
    trainable(x).square().sum().backward()
    assert trainable.conv_proj.weight.grad.abs().sum() > 0
    assert trainable.encoder.pos_embedding.grad is None  # still fixed


@pytest.mark.parametrize("patch_size", [4, 8])
def test_forward_shape_vit_tiny(patch_size):
    vit = build_vit("vit_tiny", image_size=32, patch_size=patch_size)
    assert vit.feature_dim == 192
    assert vit.encoder.pos_embedding.shape == (1, 1 + (32 // patch_size) ** 2, 192)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 192)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="not divisible by patch size 4.*such as 28"):
        build_vit("vit_tiny", image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="vit_tiny, vit_small, vit_base"):
        build_vit("vit_huge")


def test_attention_runs_through_sdpa(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    vit = build_vit("vit_tiny", image_size=32, patch_size=8).train()
    vit(torch.randn(2, 3, 32, 32))
    assert len(calls) == 12  # one per block


def moco_v3_timm_vit(timm, seed: int = 0):
    """timm's ViT with MoCo v3's config (vit_tiny, 32 px, patch 4), every tensor random."""
    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=192,
        depth=12,
        num_heads=3,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
        global_pool="token",
        class_token=True,
        fc_norm=False,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = ("norm" in name) and name.endswith("weight")
            p.copy_((1.0 if is_norm_weight else 0.0) + 0.05 * torch.randn_like(p))
    return model.eval()


def test_timm_weights_give_the_same_features():
    timm = pytest.importorskip("timm")
    reference = moco_v3_timm_vit(timm)
    state = reference.state_dict()
    assert is_timm_vit_state(state)
    vit = build_vit("vit_tiny", image_size=32, patch_size=4).eval()
    vit.load_state_dict(timm_to_torchvision(state), strict=True)
    assert not is_timm_vit_state(vit.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)  # [3, 192], cls token after the final norm
        torch.testing.assert_close(vit(x), expected, atol=1e-5, rtol=1e-5)
        assert expected.std() > 0.1  # not a trivially small output


def test_moco_v3_checkpoint_prefixes_are_stripped_and_heads_dropped():
    timm = pytest.importorskip("timm")
    state = moco_v3_timm_vit(timm).state_dict()
    checkpoint = {f"module.base_encoder.{k}": v for k, v in state.items()}
    checkpoint["module.base_encoder.head.0.weight"] = torch.zeros(8, 192)  # the projector
    checkpoint["module.momentum_encoder.x"] = torch.zeros(1)
    checkpoint["module.predictor.0.weight"] = torch.zeros(8, 8)
    assert is_timm_vit_state(checkpoint)
    mapped = timm_to_torchvision(checkpoint)
    plain = timm_to_torchvision(state)
    assert mapped.keys() == plain.keys() and len(mapped) == len(state)
    assert all(mapped[k] is plain[k] for k in plain)
    with pytest.raises(ValueError, match="blocks.0.attn.q_norm.weight"):
        timm_to_torchvision({**state, "blocks.0.attn.q_norm.weight": torch.ones(64)})


def test_vit_config_from_state_round_trip(vit_small):
    assert vit_config_from_state(vit_small.state_dict()) == dict(
        arch="vit_small", patch_size=8, image_size=32
    )
    tiny = build_vit("vit_tiny", image_size=32, patch_size=4).state_dict()
    assert vit_config_from_state(tiny) == dict(arch="vit_tiny", patch_size=4, image_size=32)
    truncated = {k: v for k, v in tiny.items() if "encoder_layer_11." not in k}
    with pytest.raises(ValueError, match="width 192 and depth 11"):
        vit_config_from_state(truncated)
    with pytest.raises(ValueError, match="timm_to_torchvision"):
        vit_config_from_state({"patch_embed.proj.weight": tiny["conv_proj.weight"]})
