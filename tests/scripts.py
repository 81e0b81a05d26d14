"""What the whole-script tests share: the tiny pretraining setting, how a script is run, and how its
outputs are read. The reference runs themselves are session fixtures in conftest.py."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bfcl.checkpoint import list_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
# 32 images / batch 8 = 4 steps per epoch; 2 epochs = 8 steps, the first 4 warm-up.
TINY = ["-a", "resnet18", "--stem", "small", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "64",
        "--moco-dim", "32", "--workers", "0", "--log-every", "1", "--epochs", "2", "--warmup-epochs", "1",
        "--add_bf", "1"]
STEPS = 8
# Variants, each for tests that need it so:
# TINY with a trainable BatchFormer (the lr scaling of its parameter group)
BF_TRAINABLE_TINY = [*TINY, "--bf-trainable"]
# the ImageNet stem (torchvision's own ResNet), the epochs left to the test; IMAGENET_STEM_TINY adds
# BatchFormer and a fixed lr, IMAGENET_STEM_ONE_EPOCH one epoch without warm-up on top
IMAGENET_STEM = ["-a", "resnet18", "--stem", "imagenet", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "64",
                 "--moco-dim", "32", "--workers", "0", "--log-every", "1"]
IMAGENET_STEM_TINY = [*IMAGENET_STEM, "--add_bf", "1", "--lr", "0.3"]
IMAGENET_STEM_ONE_EPOCH = [*IMAGENET_STEM_TINY, "--epochs", "1", "--warmup-epochs", "0"]
# batch 4, one epoch, no BatchFormer: the data-layout runs of 8-16 images
BATCH4_TINY = ["-a", "resnet18", "--stem", "small", "--image-size", "16", "-b", "4", "--moco-mlp-dim", "64",
               "--moco-dim", "32", "--workers", "0", "--log-every", "1", "--epochs", "1", "--warmup-epochs", "0.5"]
# a ViT-Tiny with 8-pixel patches in place of the ResNet
VIT_TINY = ["-a", "vit_tiny", "--patch-size", "8", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "64",
            "--moco-dim", "32", "--workers", "0", "--log-every", "1", "--epochs", "2", "--warmup-epochs", "1",
            "--add_bf", "1"]
# two steps of a ViT-Tiny with 4-pixel patches (timm export)
VIT_TWO_STEPS = ["-a", "vit_tiny", "--patch-size", "4", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "32",
                 "--moco-dim", "16", "--workers", "0", "--epochs", "1", "--warmup-epochs", "0", "--max-steps", "2"]
# probe.py on a random init of the small-stem ResNet-18
PROBE_TINY = ["--random-init", "-a", "resnet18", "--stem", "small", "--workers", "0"]
# One thread per process: the same arithmetic in every run, and two torchrun processes fit 2 cores.
ENV = {"OMP_NUM_THREADS": "1"}

# Runs train.main() after wrapping MoCo.update_momentum_encoder (the last statement of a step)
# so that every process records a hash of all its parameters after each step.
PARAM_HASHES = r"""
import hashlib, json, os, sys
sys.path.insert(0, os.getcwd())
import train
from bfcl.model import MoCo

update = MoCo.update_momentum_encoder
record = open(os.path.join(os.environ["HASH_DIR"], f"rank{os.environ.get('RANK', '0')}.jsonl"), "a")

def update_and_record(self, m):
    update(self, m)
    h = hashlib.sha256()
    for name, p in sorted(self.named_parameters()):
        h.update(p.detach().cpu().numpy().tobytes())
    record.write(json.dumps({"sha256": h.hexdigest()}) + "\n")
    record.flush()

MoCo.update_momentum_encoder = update_and_record
sys.exit(train.main(sys.argv[1:]))
"""


def run(cmd, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, **env})


def run_script(script, *args) -> subprocess.CompletedProcess:
    """A script as a user types it: this Python, the caller's environment."""
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def error_of(main, argv) -> str:
    """The one-line message a script's main() exits with (SystemExit) for argv."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    return message


def correct_of(percent: float, images: int) -> int:
    """The count of correct images behind a top-k % of `images`: an accuracy that is not
    100 x count / images for an integer count in [0, images] fails (a wrong denominator, a sample
    counted twice or lost)."""
    count = round(percent * images / 100)
    assert 0 <= count <= images and abs(percent - 100 * count / images) < 1e-4, (percent, images)
    return count


def start(cmd) -> subprocess.Popen:
    """A script in the background, stdout and stderr together (for signal tests)."""
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ENV})


def train_cmd(data, out, *extra, settings=TINY) -> list[str]:
    return [sys.executable, "train.py", "--data", str(data), "--output-dir", str(out), *settings, *extra]


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(out) -> list[int]:
    return [int(os.path.basename(p)[len("step-"):]) for p in list_checkpoints(str(out))]


def final_weights(out) -> dict:
    return load_file(os.path.join(list_checkpoints(str(out))[-1], "model.safetensors"))


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def parameter_hash(model_file: str, names: list[str]) -> str:
    tensors = load_file(model_file)
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()
