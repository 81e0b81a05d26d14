"""The smoke test itself: `make smoke-test` end to end (generate data, pretrain a ResNet and a ViT
with BatchFormer on the CPU, kNN-probe each exported backbone), as a user would run it from a
fresh clone. It is also the suite's train -> probe pipeline test (the probe reads what train.py
exported: its arch, stem and step)."""

import json
import os
import shutil
import subprocess

import pytest
import torchvision
from safetensors.torch import load_file

from bfcl.model import build_backbone
from scripts import correct_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_smoke_test(tmp_path):
    out = tmp_path / "smoke"
    run = subprocess.run(["make", "smoke-test", f"SMOKE={out}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    records = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    assert records[-1]["step"] == 48 and all(r["bad_images"] == 0 for r in records if "bad_images" in r)
    assert [r["step"] for r in records if "knn_top1" in r] == [0, 12, 24, 36, 48]

    results = json.load(open(out / "probe" / "results.json"))
    assert (results["arch"], results["stem"], results["step"]) == ("resnet18", "imagenet", 48)
    assert (results["num_classes"], results["train_samples"], results["val_samples"]) == (4, 384, 128)
    knn = results["results"]["knn"]["k200"]
    assert knn["top5"] == 100.0  # 4 classes: top-5 covers them all
    correct_of(knn["top1"], 128)
    assert "kNN 200-NN" in run.stdout

    # the export is a torchvision state dict of the configured backbone, minus fc
    state = load_file(out / "run" / "backbone.safetensors")
    missing, unexpected = build_backbone("resnet18", "imagenet").load_state_dict(state, strict=False)
    assert not missing and not unexpected
    missing, unexpected = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected

    # the ViT with BatchFormer: 24 steps, MoCo v3's ViT defaults switched, the export a torchvision ViT's
    assert "--optimizer adamw" in run.stdout and "--moco-t 0.2" in run.stdout
    vit = [json.loads(line) for line in open(out / "run-vit" / "metrics.jsonl")]
    assert vit[-1]["step"] == 24 and all(r["loss"] == r["loss"] for r in vit)
    results = json.load(open(out / "probe-vit" / "results.json"))
    assert (results["arch"], results["patch_size"], results["image_size"], results["step"]) == ("vit_tiny", 8, 32, 24)
    vit_model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=3,
                                                    hidden_dim=192, mlp_dim=768, num_classes=4)
    missing, unexpected = vit_model.load_state_dict(load_file(out / "run-vit" / "backbone.safetensors"), strict=False)
    assert set(missing) == {"heads.head.weight", "heads.head.bias"} and not unexpected
