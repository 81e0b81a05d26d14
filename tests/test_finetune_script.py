"""probe.py --mode finetune as a whole: the backbone moves (the linear probe's does not), the
fine-tuned classifier loads into torchvision, a run stopped by SIGTERM or killed by SIGKILL and
resumed equals an uninterrupted one bit for bit, and two CPU processes agree with one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torchvision.models.vision_transformer import VisionTransformer

from bfcl.runs import EXIT_PREEMPTED
from bfcl.export import export_backbone
from bfcl.model import MoCo
from bfcl.synthetic import make_image_folder

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
# 4 classes x 16 images, batch 16: 4 steps an epoch, 2 epochs = 8 steps, the first epoch warm-up.
COMMON = ["--mode", "finetune", "-b", "16", "--epochs", "2", "--warmup-epochs", "1", "--workers", "0",
          "--log-every", "1", "--save-every", "2"]
VIT = ["--random-init", "-a", "vit_tiny", "--patch-size", "8", "--image-size", "16"]
STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=16,
                             val_per_class=8, size=16)


def run(*args, env=None):
    return subprocess.run([sys.executable, "probe.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def vit_straight(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vit-straight")
    result = run(*VIT, "--data", data, "--output-dir", str(out), *COMMON)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_resnet_backbone_moves_and_the_classifier_loads_into_torchvision(data, tmp_path):
    torch.manual_seed(0)
    moco = MoCo("resnet18", "imagenet", dim=16, mlp_dim=32)
    export = str(tmp_path / "backbone.safetensors")
    export_backbone(moco.state_dict(), export, arch="resnet18", stem="imagenet", image_size=16, step=5)
    out = tmp_path / "ft"
    result = run("--pretrained", export, "--data", data, "--output-dir", str(out), *COMMON, "--eval-epoch-ends")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "simclr-semi-supervised" in result.stdout and "finetune, last step" in result.stdout  # a pretrained start

    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict(load_file(out / "finetuned.safetensors"))  # strict: no missing, no unexpected keys
    pretrained = load_file(export)
    moved = [k for k, v in pretrained.items() if not torch.equal(model.state_dict()[k], v)]
    assert "conv1.weight" in moved and "layer4.1.conv2.weight" in moved and "bn1.running_mean" in moved
    results = json.load(open(out / "results.json"))["results"]["finetune"]
    assert results["steps"] == STEPS and results["last"]["step"] == STEPS
    assert [h["step"] for h in results["history"]] == [4, 8]  # evaluated at each epoch end
    assert results["recipe"]["optimizer"] == "sgd" and results["recipe"]["nesterov"] is True
    assert results["recipe"]["label_smoothing"] == 0.0 and results["recipe"]["warmup_epochs"] == 1  # the flag's


def test_vit_classifier_loads_into_torchvision(vit_straight):
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768,
                              num_classes=4)
    model.load_state_dict(load_file(vit_straight / "finetuned.safetensors"))  # strict
    results = json.load(open(vit_straight / "results.json"))["results"]["finetune"]
    assert results["recipe"]["name"] == "deit" and results["recipe"]["mixup"] == 0.8


def test_sigterm_and_sigkill_then_resume_equal_the_straight_run(data, vit_straight, tmp_path):
    out = tmp_path / "ft"
    cmd = [sys.executable, "probe.py", *VIT, "--data", data, "--output-dir", str(out), *COMMON, "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start_and_signal(sig, after_step):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240
        while time.time() < deadline:
            if os.path.exists(out / "metrics.jsonl") and any(r["step"] >= after_step for r in records(out)):
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        return proc.communicate(timeout=240)[0], proc.returncode

    output, code = start_and_signal(signal.SIGTERM, 2)
    assert code == EXIT_PREEMPTED, output
    assert "stopped by a signal" in output
    assert (out / "STOPPED").read_text().startswith("stopped cleanly at step ")  # the marker, as train.py's
    output, code = start_and_signal(signal.SIGKILL, 5)
    assert code == -signal.SIGKILL, output
    final = run(*VIT, "--data", data, "--output-dir", str(out), *COMMON, "--save-every", "1")
    assert final.returncode == 0, final.stdout + final.stderr
    assert "resumed from" in final.stdout
    assert not (out / "STOPPED").exists()

    expected = load_file(vit_straight / "finetuned.safetensors")
    got = load_file(out / "finetuned.safetensors")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    losses = {r["step"]: r["loss"] for r in records(out)}  # the last record of each step (reruns append)
    assert losses == {r["step"]: r["loss"] for r in records(vit_straight)}


def test_two_processes_give_the_one_process_result(data, tmp_path):
    """Without batch-dependent randomness (Mixup/CutMix mix within the local batch, drop path draws
    per process), a ViT has no cross-sample state: two processes average to the one-process step."""
    plain = ["--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--no-randaugment", "--reprob", "0"]
    one = run(*VIT, "--data", data, "--output-dir", str(tmp_path / "one"), *COMMON, *plain)
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "probe.py", *VIT, "--data", data,
                          "--output-dir", str(tmp_path / "two"), *COMMON, *plain], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stdout + two.stderr
    assert "processes: 2" in two.stdout
    a, b = load_file(tmp_path / "one" / "finetuned.safetensors"), load_file(tmp_path / "two" / "finetuned.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    r1 = json.load(open(tmp_path / "one" / "results.json"))["results"]["finetune"]
    r2 = json.load(open(tmp_path / "two" / "results.json"))["results"]["finetune"]
    assert r1["last"]["top1"] == r2["last"]["top1"]
    assert [round(h["loss"], 4) for h in r1["history"]] == [round(h["loss"], 4) for h in r2["history"]]
