"""train.py as a whole (style.md principle 10): a run stopped with --max-steps and resumed equals
an uninterrupted one; two CPU processes under torchrun keep identical weights and resume; the
pretrained backbone goes through probe.py. Tiny: resnet18, small stem, 16 px, 32 images."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bfcl.checkpoint import list_checkpoints
from bfcl.synthetic import make_image_folder

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
# 32 images / batch 8 = 4 steps per epoch; 2 epochs = 8 steps, the first 4 warmup.
TINY = ["-a", "resnet18", "--stem", "small", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "64",
        "--moco-dim", "32", "--workers", "0", "--log-every", "1", "--epochs", "2", "--warmup-epochs", "1",
        "--add_bf", "1"]
STEPS = 8

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


def run(cmd, **env):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def train_cmd(data, out, *extra):
    return [sys.executable, "train.py", "--data", data, "--output-dir", str(out), *TINY, *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(out):
    return [int(os.path.basename(p)[len("step-"):]) for p in list_checkpoints(str(out))]


def parameter_hash(model_file: str, names: list[str]) -> str:
    tensors = load_file(model_file)
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=8,
                             val_per_class=8, size=16)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """One uninterrupted run: the reference for resume, and the backbone for the probe."""
    out = tmp_path_factory.mktemp("straight")
    result = run(train_cmd(data, out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_max_steps_then_resume_equals_straight_run(data, straight, tmp_path):
    first = run(train_cmd(data, tmp_path, "--max-steps", "3"))  # stops mid-epoch
    assert first.returncode == 0, first.stdout + first.stderr
    assert checkpoint_steps(tmp_path) == [3]
    second = run(train_cmd(data, tmp_path))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "(step 3)" in second.stdout

    resumed, reference = metrics(tmp_path), metrics(straight)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "m"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key
    final = load_file(os.path.join(list_checkpoints(str(tmp_path))[-1], "model.safetensors"))
    expected = load_file(os.path.join(list_checkpoints(str(straight))[-1], "model.safetensors"))
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in final)


def test_two_processes_agree_and_resume(data, tmp_path):
    wrapper = tmp_path / "train_with_hashes.py"
    wrapper.write_text(PARAM_HASHES)
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    hashes.mkdir()
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(wrapper), "--data", data, "--output-dir", str(out),
           *TINY]

    first = run(cmd + ["--max-steps", "2"], HASH_DIR=str(hashes))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "processes: 2" in first.stdout and "context 4 samples per process" in first.stdout
    assert checkpoint_steps(out) == [2]
    second = run(cmd, HASH_DIR=str(hashes))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "(step 2)" in second.stdout
    assert checkpoint_steps(out)[-1] == STEPS

    rank0 = [json.loads(line)["sha256"] for line in open(hashes / "rank0.jsonl")]
    rank1 = [json.loads(line)["sha256"] for line in open(hashes / "rank1.jsonl")]
    assert len(rank0) == STEPS and rank0 == rank1  # gradient averaging keeps the replicas identical
    assert len(set(rank0)) == STEPS  # and the weights do move every step
    # the checkpoints only rank 0 writes hold rank 1's weights too (BN buffers are per process
    # on CPU, where gloo has no SyncBatchNorm, so parameters only)
    for step in (2, STEPS):
        model_file = str(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors")
        names = [n for n in load_file(model_file)
                 if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert parameter_hash(model_file, names) == rank1[step - 1], step
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in metrics(out))


def test_bf16_on_cpu_matches_fp32_and_resume_refuses_another_precision(data, straight, tmp_path):
    """--mixed-precision bf16 (autocast; NHWC on CPU too): the first loss is the fp32 run's up to
    bf16 rounding, master weights stay fp32, and resuming in fp32 is refused as a changed setting."""
    result = run(train_cmd(data, tmp_path, "--mixed-precision", "bf16", "--max-steps", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "precision: bf16" in result.stdout
    bf16, fp32 = metrics(tmp_path), metrics(straight)
    assert [r["step"] for r in bf16] == [1, 2]
    assert bf16[0]["loss"] != fp32[0]["loss"]  # autocast really ran in bf16 ...
    assert abs(bf16[0]["loss"] - fp32[0]["loss"]) < 0.02 * fp32[0]["loss"]  # ... and computed the same loss
    weights = load_file(os.path.join(list_checkpoints(str(tmp_path))[-1], "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}

    refused = run(train_cmd(data, tmp_path, "--mixed-precision", "no"))
    assert refused.returncode == 1
    assert "settings differ (--mixed-precision 'bf16' -> 'no')" in refused.stderr


def test_validation_error_is_one_line_without_traceback(data, tmp_path):
    result = run(train_cmd(data, tmp_path, "--warmup-epochs", "2"))
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --warmup-epochs 2 must be shorter than --epochs 2"
    assert not os.path.exists(tmp_path / "checkpoints")


def test_probe_knn_on_the_pretrained_backbone(data, straight, tmp_path):
    if not os.path.exists(os.path.join(REPO, "probe.py")):
        pytest.skip("probe.py is not in this tree yet")
    result = run([sys.executable, "probe.py", "--pretrained", str(straight / "backbone.safetensors"), "--data", data,
                  "--mode", "knn", "--workers", "0", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert (results["arch"], results["stem"], results["step"]) == ("resnet18", "small", STEPS)
    assert (results["train_samples"], results["val_samples"]) == (32, 32)
    for k in ("k20", "k200"):
        assert 0 <= results["results"]["knn"][k]["top1"] <= 100


VIT_TINY = ["-a", "vit_tiny", "--patch-size", "8", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "64",
            "--moco-dim", "32", "--workers", "0", "--log-every", "1", "--epochs", "2", "--warmup-epochs", "1",
            "--add_bf", "1"]


def test_vit_resume_equals_straight_run(data, tmp_path):
    """A ViT-Tiny run with BatchFormer (AdamW, MoCo v3's ViT defaults) stopped at step 3 and resumed
    ends with the same losses and the same weights as an uninterrupted run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cmd = lambda out, *extra: [sys.executable, "train.py", "--data", data, "--output-dir", str(out), *VIT_TINY, *extra]
    assert run(cmd(straight)).returncode == 0
    first = run(cmd(resumed, "--max-steps", "3"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "ViT recipe defaults: --optimizer adamw, --lr 0.00015, --wd 0.1, --moco-t 0.2, --crop-min 0.08" \
        in first.stdout
    second = run(cmd(resumed))
    assert second.returncode == 0 and "(step 3)" in second.stdout, second.stdout + second.stderr
    assert [(r["step"], r["loss"]) for r in metrics(resumed)] == [(r["step"], r["loss"]) for r in metrics(straight)]
    final = load_file(os.path.join(list_checkpoints(str(resumed))[-1], "model.safetensors"))
    expected = load_file(os.path.join(list_checkpoints(str(straight))[-1], "model.safetensors"))
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
