"""probe.py --mode finetune on a ViT trains every tensor: the patch projection and the position
embedding too, which MoCo v3's pretraining freezes (--stop-grad-conv1, fixed sin-cos) but its DeiT
fine-tuning trains (README "End-to-end fine-tuning")."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bfcl.export import export_backbone
from bfcl.model import MoCo
from bfcl.synthetic import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_vit_finetune_moves_patch_projection_and_position_embedding(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=8, val_per_class=2, size=16)
    torch.manual_seed(0)
    moco = MoCo("vit_tiny", "imagenet", 16, 32, image_size=16, patch_size=8)
    export = str(tmp_path / "backbone.safetensors")
    export_backbone(moco.state_dict(), export, arch="vit_tiny", image_size=16, patch_size=8, step=1)
    out = tmp_path / "ft"
    # 32 images, batch 16: 2 AdamW steps at the peak lr (no warm-up), 1e-3 x 16 / 512
    result = subprocess.run([sys.executable, "probe.py", "--pretrained", export, "--data", data, "--mode", "finetune",
                             "-b", "16", "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e-3", "--workers", "0",
                             "--no-eval-epoch-ends", "--output-dir", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr

    start, tuned = load_file(export), load_file(out / "finetuned.safetensors")
    assert set(tuned) == set(start) | {"heads.head.weight", "heads.head.bias"}
    lr = 1e-3 * 16 / 512
    for name in ("conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding", "class_token",
                 "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"):
        change = (tuned[name] - start[name]).abs()
        # AdamW moves almost every element by about lr a step (its first update is lr x sign(grad))
        assert (change > 0.1 * lr).float().mean() > 0.9, name
        assert change.max() < 3 * lr, name
