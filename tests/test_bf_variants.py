"""The BatchFormer variants beyond the released one (issue "when does BatchFormer help"):
global context, a late switch-on, a trainable BatchFormer. Mechanics only; bench/ measures them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bfcl.batchformer import BatchFormer
from bfcl.checkpoint import list_checkpoints
from bfcl.synthetic import make_image_folder
from test_batchformer import deterministic_batchformer, reference_layer
from test_train import PARAM_HASHES

N, C = 5, 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TINY = ["-a", "resnet18", "--stem", "small", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "64",
        "--moco-dim", "32", "--workers", "0", "--log-every", "1", "--epochs", "2", "--warmup-epochs", "1",
        "--add_bf", "1"]


def test_global_context_on_one_process_is_the_local_batch():
    bf = deterministic_batchformer()
    x = torch.randn(N, C, dtype=torch.float64)
    torch.testing.assert_close(bf(x, context=lambda rows: (rows, 0)), bf(x), rtol=0, atol=0)


def test_global_context_attends_to_every_process_and_sends_gradients_back():
    """Two processes simulated in one: this one (rank 1) holds `mine`, rank 0 holds `other`. Its
    BatchFormer rows are rows N..2N of the layer over all 2N samples (checked against the
    hand-written layer), each depends on every sample of rank 0, and the gradient of this
    process's loss reaches rank 0's features (what the all_gather's backward sends there)."""
    bf = deterministic_batchformer()
    other = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    mine = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    gather = lambda rows: (torch.cat([other, rows]), N)  # rank 1's view of the gathered batch
    out = bf(mine, context=gather)
    assert out.shape == (2 * N, C)
    torch.testing.assert_close(out[:N], mine)  # plain rows first, untouched
    expected = reference_layer(bf.encoder_layer, torch.cat([other, mine]).detach(), heads=4)[N:]
    torch.testing.assert_close(out[N:], expected)
    out[N:].sum().backward()
    assert other.grad is not None and (other.grad.abs().sum(dim=1) > 0).all()  # every sample of rank 0 matters
    for j in range(N):  # changing any one sample of rank 0 changes every BatchFormer row here
        moved = other.detach().clone()
        moved[j] += 1.0
        changed = bf(mine.detach(), context=lambda rows: (torch.cat([moved, rows]), N))
        assert (changed[N:] - out[N:].detach()).abs().sum(dim=1).min() > 0


def run(cmd, **env):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=8,
                             val_per_class=2, size=16)


def train(data, out, *extra):
    return [sys.executable, "train.py", "--data", data, "--output-dir", str(out), *TINY, *extra]


@pytest.mark.slow
def test_late_switch_on_is_plain_moco_before_and_batchformer_after(data, tmp_path):
    """--bf-start-epoch 1 (step 4 of 8): steps 1-4 are the --add_bf 0 run's, loss for loss; from
    step 5 the pairs-sum loss (8 terms, about 4x) takes over."""
    late = run(train(data, tmp_path / "late", "--bf-start-epoch", "1"))
    assert late.returncode == 0, late.stdout + late.stderr
    assert "on from step 4" in late.stdout
    plain = run(train(data, tmp_path / "plain", "--add_bf", "0"))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    a, b = metrics(tmp_path / "late"), metrics(tmp_path / "plain")
    assert [r["loss"] for r in a[:4]] == [r["loss"] for r in b[:4]]
    assert min(r["loss"] for r in a[4:]) > 2.5 * max(r["loss"] for r in b[4:])


@pytest.mark.slow
def test_trainable_batchformer_moves_is_saved_and_resumes_exactly(data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--bf-trainable", "--bf-lr-scale", "1")
    assert run(train(data, straight, *args)).returncode == 0
    first = run(train(data, resumed, *args, "--max-steps", "3"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert run(train(data, resumed, *args)).returncode == 0
    final = load_file(os.path.join(list_checkpoints(str(resumed))[-1], "model.safetensors"))
    expected = load_file(os.path.join(list_checkpoints(str(straight))[-1], "model.safetensors"))
    bf_keys = [k for k in expected if k.startswith("batchformer.")]
    assert bf_keys and all(torch.equal(final[k], expected[k]) for k in expected)
    torch.manual_seed(0)
    init = BatchFormer(512).state_dict()  # a resnet18's feature width; only the shapes are compared
    assert {k[len("batchformer."):] for k in bf_keys} == set(init)
    at_step_3 = load_file(os.path.join(list_checkpoints(str(resumed))[0], "model.safetensors"))
    moved = [k for k in bf_keys if not torch.equal(at_step_3[k], expected[k])]
    assert "batchformer.encoder_layer.self_attn.in_proj_weight" in moved  # it trains between steps 3 and 8


@pytest.mark.slow
def test_global_context_on_two_processes_keeps_replicas_identical(data, tmp_path):
    """--bf-context global under torchrun: every process sees the 8-sample global batch, the
    gradients through the gather keep both replicas identical step after step, and the losses
    differ from the local context's (4 samples per process)."""
    wrapper = tmp_path / "train_with_hashes.py"
    wrapper.write_text(PARAM_HASHES)
    runs = {}
    for context in ("global", "local"):
        out, hashes = tmp_path / context, tmp_path / f"hashes-{context}"
        hashes.mkdir()
        cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(wrapper), "--data", data, "--output-dir",
               str(out), *TINY, "--bf-context", context, "--max-steps", "3"]
        result = run(cmd, HASH_DIR=str(hashes))
        assert result.returncode == 0, result.stdout + result.stderr
        runs[context] = (result.stdout, out, hashes)
    stdout, out, hashes = runs["global"]
    assert "context the global batch of 8" in stdout
    rank0 = [json.loads(line)["sha256"] for line in open(hashes / "rank0.jsonl")]
    rank1 = [json.loads(line)["sha256"] for line in open(hashes / "rank1.jsonl")]
    assert len(rank0) == 3 and rank0 == rank1 and len(set(rank0)) == 3
    global_losses = [r["loss"] for r in metrics(out)]
    local_losses = [r["loss"] for r in metrics(runs["local"][1])]
    assert all(g == g for g in global_losses) and global_losses != local_losses
