"""bench/finetune_bench.py end to end at toy size: calibration, the budget as a step count, the
pretrained and the random-init start fine-tuned for the same steps, table and results.json; the two
arms start from different weights (the export, and a random draw of the same backbone)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bfcl.export import export_backbone
from bfcl.model import MoCo
from bfcl.synthetic import make_image_folder
from scripts import correct_of
from test_quality_small import REPO, table_rows


@pytest.mark.slow
@pytest.mark.e2e
def test_finetune_bench_small(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=160, val_per_class=16, size=32)
    torch.manual_seed(1)
    export = str(tmp_path / "backbone.safetensors")
    export_backbone(MoCo("resnet18", "imagenet", 16, 32).state_dict(), export, arch="resnet18", stem="imagenet",
                    image_size=32, step=1)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "bench/finetune_bench.py", "--data", data, "--out", out, "--pretrained", export,
           "--budget-min", "0.3", "--seeds", "1", "--calibration-steps", "15"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "# Fine-tuning on data: bfcl-pretrained vs random init, 0.3 min each" in r.stdout
    rows = table_rows(r.stdout)
    assert tuple(rows) == ("pretrained", "random-init")
    results = json.load(open(os.path.join(out, "results.json")))
    records = {rec["start"]: rec for rec in results["records"]}
    assert records["pretrained"]["steps"] == records["random-init"]["steps"] == results["steps"] >= 10
    assert all(rec["wall_s"] > 0 for rec in records.values())
    for rec in records.values():  # 4 x 16 val images: each top-1 a count of 64
        correct_of(rec["top1"], 64)
    assert results["paired_top1_difference"] == [records["pretrained"]["top1"] - records["random-init"]["top1"]]

    # The arms load different weights: probe.py was told the export for one and a random init for the
    # other, and after the same few steps only the pretrained arm is still close to the export.
    arms = {start: os.path.join(out, "runs", "seed0", start) for start in ("pretrained", "random-init")}
    told = {start: json.load(open(os.path.join(arm, "results.json")))["pretrained"] for start, arm in arms.items()}
    assert told == {"pretrained": export, "random-init": "random-init"}
    start = load_file(export)
    tuned = {s: load_file(os.path.join(arm, "finetuned.safetensors")) for s, arm in arms.items()}
    assert tuned["pretrained"].keys() == tuned["random-init"].keys() == start.keys() | {"fc.weight", "fc.bias"}
    for name in ("conv1.weight", "layer3.0.conv1.weight", "layer4.1.conv2.weight"):
        cosine = {s: torch.cosine_similarity(t[name].flatten(), start[name].flatten(), dim=0).item()
                  for s, t in tuned.items()}
        assert cosine["pretrained"] > 0.5 and abs(cosine["random-init"]) < 0.1, (name, cosine)
