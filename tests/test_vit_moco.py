"""MoCo v3's ViT half inside bfcl: heads, frozen tensors across real steps, BatchFormer on the cls
feature, the export and original-checkpoint paths into probe models (docs/method.md#vit-recipe)."""

import re

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from bfcl.export import export_backbone
from bfcl.loss import moco_loss
from bfcl.model import MoCo, build_backbone
from bfcl.optim import build_optimizer, param_groups
from bfcl.pretrained import head_name, load_backbone_state, probe_model
from bfcl.vit import VIT_SIZES

SMALL = dict(arch="vit_tiny", stem="imagenet", dim=16, mlp_dim=32, image_size=32, patch_size=8)


def vit_moco(batchformer=False, seed=0) -> MoCo:
    torch.manual_seed(seed)
    return MoCo(**SMALL, batchformer=batchformer)


def layer_types(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ + ("(affine=False)" if isinstance(m, nn.BatchNorm1d) and not m.affine else "")
            for m in seq]


def test_projector_three_layers_predictor_two_with_last_bn():
    model = vit_moco()
    assert layer_types(model.base_encoder.projector) == [
        "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d(affine=False)"]
    assert layer_types(model.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d(affine=False)"]
    widths = [(m.in_features, m.out_features) for m in model.base_encoder.projector if isinstance(m, nn.Linear)]
    assert widths == [(192, 32), (32, 32), (32, 16)]  # input = embedding width
    assert all(m.bias is None for m in model.base_encoder.projector if isinstance(m, nn.Linear))
    # the ResNet predictor, unchanged, has no final BN
    resnet = MoCo("resnet18", "small", 16, 32)
    assert layer_types(resnet.predictor) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_frozen_patch_projection_and_position_embedding_stay_bit_identical():
    """Three AdamW steps with momentum updates: the patch projection and the position embedding of
    both encoders keep their init bit for bit, while every other tensor moves."""
    model = vit_moco(batchformer=True)
    frozen = ("backbone.conv_proj.weight", "backbone.conv_proj.bias", "backbone.encoder.pos_embedding")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups, names = param_groups(model)
    assert not any(n.endswith(frozen) for n in names)  # not even handed to the optimizer
    optimizer = build_optimizer("adamw", groups, weight_decay=0.1)
    x1, x2 = torch.randn(2, 4, 3, 32, 32)
    for step in range(3):
        for g in optimizer.param_groups:
            g["lr"] = 1e-3
        q1, q2, k1, k2 = model(x1, x2)
        loss = moco_loss(q1, q2, k1, k2, 0, 0.2, "pairs-sum")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_momentum_encoder(0.9)
    after = model.state_dict()
    for encoder in ("base_encoder.", "momentum_encoder."):
        for name in frozen:
            assert torch.equal(after[encoder + name], before[encoder + name]), encoder + name
    moved = [k for k in before if not torch.equal(after[k], before[k])]
    assert "base_encoder.backbone.class_token" in moved and "momentum_encoder.backbone.class_token" in moved
    assert "base_encoder.backbone.encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in moved
    assert not any(k.startswith("batchformer.") for k in moved)  # frozen at init, as released


def test_batchformer_on_the_cls_feature_shapes_and_mixing():
    model = vit_moco(batchformer=True).train()
    x1, x2 = torch.randn(2, 4, 3, 32, 32)
    q1, q2, k1, k2 = model(x1, x2)
    assert q1.shape == q2.shape == k1.shape == k2.shape == (8, 16)  # [plain ; BatchFormer] rows
    assert model.batchformer.encoder_layer.self_attn.embed_dim == VIT_SIZES["vit_tiny"][0]
    # attention mixes samples: changing image 3 changes BatchFormer row 0, not plain row 0
    features = model.base_encoder.backbone(x1)
    changed = features.clone()
    changed[3] += 1.0
    torch.manual_seed(0)
    out = model.batchformer(features)
    torch.manual_seed(0)
    out_changed = model.batchformer(changed)
    assert torch.equal(out[0], out_changed[0])
    assert not torch.allclose(out[4], out_changed[4])
    model.eval()
    assert model.batchformer(features).shape == (4, 192)  # identity in eval


def test_export_loads_into_torchvision_vit_with_exactly_the_head_missing(tmp_path):
    model = vit_moco()
    path = str(tmp_path / "backbone.safetensors")
    export_backbone(model.state_dict(), path, arch="vit_tiny", image_size=32, patch_size=8, step=7)
    width, depth, heads = VIT_SIZES["vit_tiny"]
    tv = VisionTransformer(image_size=32, patch_size=8, num_layers=depth, num_heads=heads, hidden_dim=width,
                           mlp_dim=4 * width, num_classes=10)
    from safetensors.torch import load_file
    missing, unexpected = tv.load_state_dict(load_file(path), strict=False)
    assert set(missing) == {"heads.head.weight", "heads.head.bias"} and not unexpected
    x = torch.randn(2, 3, 32, 32)
    tv.heads = nn.Identity()
    model.eval()
    torch.testing.assert_close(tv.eval()(x), model.base_encoder.backbone(x), rtol=0, atol=0)

    state, info = load_backbone_state(path)
    assert (info["arch"], info["patch_size"], info["image_size"], info["step"]) == ("vit_tiny", 8, 32, 7)
    probe = probe_model("vit_tiny", "imagenet", state, num_classes=5, image_size=32, patch_size=8)
    assert head_name(probe) == "heads"
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["heads.head.weight", "heads.head.bias"]


def to_timm(state: dict) -> dict:
    """Our torchvision-keyed ViT state under MoCo v3's timm names (the inverse of the loader's map)."""
    out = {}
    for k, v in state.items():
        k = k.replace("conv_proj.", "patch_embed.proj.").replace("class_token", "cls_token")
        k = k.replace("encoder.pos_embedding", "pos_embed").replace("encoder.ln.", "norm.")
        k = re.sub(r"encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1.", k)
        k = k.replace("ln_1.", "norm1.").replace("ln_2.", "norm2.") \
            .replace("self_attention.in_proj_weight", "attn.qkv.weight")
        k = k.replace("self_attention.in_proj_bias", "attn.qkv.bias").replace("self_attention.out_proj.", "attn.proj.")
        k = k.replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
        out[k] = v
    return out


def test_original_moco_v3_vit_checkpoint_gives_identical_features(tmp_path):
    """An original main_moco.py ViT file: module.base_encoder.* under timm names, its projector
    under head.*, plus the momentum encoder and predictor. The probe model computes the same
    features as the backbone it came from."""
    torch.manual_seed(1)
    reference = build_backbone("vit_tiny", image_size=32, patch_size=8).eval()
    original = {f"module.base_encoder.{k}": v for k, v in to_timm(reference.state_dict()).items()}
    original["module.base_encoder.head.0.weight"] = torch.randn(32, 192)
    original["module.momentum_encoder.cls_token"] = torch.randn(1, 1, 192)
    original["module.predictor.0.weight"] = torch.randn(32, 16)
    path = str(tmp_path / "vit-tiny.pth.tar")
    torch.save({"arch": "vit_tiny", "epoch": 300, "state_dict": original}, path)
    state, info = load_backbone_state(path)
    assert info["arch"] == "vit_tiny" and "timm" in info["source"]
    assert info["ignored"] == ["module.base_encoder.head", "module.momentum_encoder", "module.predictor"]
    probe = probe_model("vit_tiny", "imagenet", state, num_classes=3, image_size=32, patch_size=8).eval()
    probe.heads = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    # fp32 tolerance: a fully frozen MultiheadAttention may take another fused kernel in eval
    torch.testing.assert_close(probe(x), reference(x), rtol=0, atol=1e-5)


def test_wrong_vit_size_is_a_one_line_error():
    state = {k: v for k, v in build_backbone("vit_tiny", image_size=32, patch_size=8).state_dict().items()}
    with pytest.raises(Exception, match="does not fit vit_tiny, patch 4, 32 px.*looks like vit_tiny, patch 8, 32 px"):
        probe_model("vit_tiny", "imagenet", state, num_classes=3, image_size=32, patch_size=4)
