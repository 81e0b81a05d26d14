"""ViT exports for timm (bfcl/timm_export.py): the file loads with strict=True into the timm model its
metadata names and gives bfcl's features (the cls token after the final norm, what probe.py uses)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bfcl.export import export_backbone
from bfcl.model import MoCo, build_backbone
from bfcl.timm_export import TIMM_FILE, timm_key, torchvision_to_timm
from bfcl.vit import timm_to_torchvision
from scripts import REPO, VIT_TWO_STEPS, run, train_cmd

timm = pytest.importorskip("timm")


def trained_like_vit(arch: str, image_size: int, patch_size: int) -> dict:
    """A bfcl ViT backbone state with every tensor moved off its init (position embedding included),
    so that a wrong key mapping cannot pass by two tensors sharing one init."""
    torch.manual_seed(0)
    backbone = build_backbone(arch, image_size=image_size, patch_size=patch_size)
    state = backbone.state_dict()
    with torch.no_grad():
        for t in state.values():
            t.add_(torch.randn_like(t) * 0.02)
    return state


def bfcl_features(arch, image_size, patch_size, state, images) -> torch.Tensor:
    model = build_backbone(arch, image_size=image_size, patch_size=patch_size).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(images)  # [N, width]: cls token after the final LayerNorm


def timm_from_file(path: str):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    model = timm.create_model(meta["timm_model"], num_classes=0, **json.loads(meta["timm_kwargs"])).eval()
    model.load_state_dict(load_file(path), strict=True)
    return model, meta


@pytest.mark.parametrize("arch, image_size, patch_size", [
    ("vit_tiny", 32, 4), ("vit_small", 224, 16), ("vit_small", 48, 8), ("vit_base", 32, 16)])
def test_cli_export_loads_strictly_into_timm_with_bfcls_features(tmp_path, arch, image_size, patch_size):
    state = trained_like_vit(arch, image_size, patch_size)
    source = str(tmp_path / "backbone.safetensors")
    export_backbone({"base_encoder.backbone." + k: v for k, v in state.items()}, source, arch=arch,
                    image_size=image_size, patch_size=patch_size, step=7)
    out = str(tmp_path / "timm.safetensors")
    result = subprocess.run([sys.executable, "-m", "bfcl.export", "--format", "timm", source, out], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    model, meta = timm_from_file(out)
    assert meta["timm_model"] == f"{arch}_patch16_224" and meta["step"] == "7"
    assert f"img_size={image_size}, patch_size={patch_size}" in result.stdout
    torch.manual_seed(1)
    images = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        got = model(images)
    expected = bfcl_features(arch, image_size, patch_size, state, images)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_vit_small_224_loads_strictly_into_timms_default_model(tmp_path):
    """The plain timm.create_model("vit_small_patch16_224", num_classes=0) takes the file strictly (its 6
    heads change no shape); its features are bfcl's only with num_heads=12, as the metadata says."""
    state = trained_like_vit("vit_small", 224, 16)
    model = timm.create_model("vit_small_patch16_224", num_classes=0)
    model.load_state_dict(torchvision_to_timm(state), strict=True)


def test_mapping_is_the_inverse_of_timm_to_torchvision():
    state = trained_like_vit("vit_tiny", 32, 4)
    back = timm_to_torchvision(torchvision_to_timm(state))
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)
    with pytest.raises(ValueError, match="heads.head.weight"):
        timm_key("heads.head.weight")


def test_resnet_export_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    moco = MoCo("resnet18", "small", dim=8, mlp_dim=16)
    source = str(tmp_path / "backbone.safetensors")
    export_backbone(moco.state_dict(), source, arch="resnet18", stem="small", image_size=16, step=0)
    result = subprocess.run([sys.executable, "-m", "bfcl.export", "--format", "timm", source,
                             str(tmp_path / "out.safetensors")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "ResNet exports load into timm" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_train_writes_the_timm_export_beside_the_usual_one(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run(train_cmd(tiny_data, out, "--export-format", "timm", settings=VIT_TWO_STEPS))
    assert result.returncode == 0, result.stdout + result.stderr
    model, meta = timm_from_file(str(out / TIMM_FILE))
    assert meta["step"] == "2"
    state = load_file(str(out / "backbone.safetensors"))  # the usual export, from the same state
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got, bfcl_features("vit_tiny", 16, 4, state, images), rtol=1e-4, atol=1e-4)
    refused = run(train_cmd(tiny_data, tmp_path / "r", "--export-format", "timm", "-a", "resnet18"))
    assert refused.returncode != 0 and "--export-format timm is for ViTs" in refused.stderr
    assert not os.path.exists(tmp_path / "r" / "checkpoints")
