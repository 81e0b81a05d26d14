"""The BatchFormer variants beyond the released one (issue "when does BatchFormer help"):
global context, a late switch-on, a trainable BatchFormer. Mechanics only; bench/ measures them."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from bfcl.batchformer import BatchFormer
from bfcl.checkpoint import list_checkpoints
from scripts import PARAM_HASHES, TORCHRUN, TINY, final_weights, metrics, run, train_cmd
from test_batchformer import deterministic_batchformer, reference_layer

N, C = 5, 8


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


@pytest.mark.slow
def test_late_switch_on_is_plain_moco_before_and_batchformer_after(tiny_data, tmp_path):
    """--bf-start-epoch 1 (step 4 of 8): steps 1-4 are the --add_bf 0 run's, loss for loss; from
    step 5 the pairs-sum loss (8 terms, about 4x) takes over."""
    late = run(train_cmd(tiny_data, tmp_path / "late", "--bf-start-epoch", "1"))
    assert late.returncode == 0, late.stdout + late.stderr
    assert "on from step 4" in late.stdout
    plain = run(train_cmd(tiny_data, tmp_path / "plain", "--add_bf", "0"))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    a, b = metrics(tmp_path / "late"), metrics(tmp_path / "plain")
    assert [r["loss"] for r in a[:4]] == [r["loss"] for r in b[:4]]
    assert min(r["loss"] for r in a[4:]) > 2.5 * max(r["loss"] for r in b[4:])


@pytest.mark.slow
def test_trainable_batchformer_moves_is_saved_and_resumes_exactly(tiny_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--bf-trainable", "--bf-lr-scale", "1")
    assert run(train_cmd(tiny_data, straight, *args)).returncode == 0
    first = run(train_cmd(tiny_data, resumed, *args, "--max-steps", "3"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert run(train_cmd(tiny_data, resumed, *args)).returncode == 0
    final, expected = final_weights(resumed), final_weights(straight)
    bf_keys = [k for k in expected if k.startswith("batchformer.")]
    assert bf_keys and all(torch.equal(final[k], expected[k]) for k in expected)
    torch.manual_seed(0)
    init = BatchFormer(512).state_dict()  # a resnet18's feature width; only the shapes are compared
    assert {k[len("batchformer."):] for k in bf_keys} == set(init)
    at_step_3 = load_file(os.path.join(list_checkpoints(str(resumed))[0], "model.safetensors"))
    moved = [k for k in bf_keys if not torch.equal(at_step_3[k], expected[k])]
    assert "batchformer.encoder_layer.self_attn.in_proj_weight" in moved  # it trains between steps 3 and 8


@pytest.mark.slow
def test_global_context_on_two_processes_keeps_replicas_identical(tiny_data, two_process_run, tmp_path):
    """--bf-context global under torchrun: every process sees the 8-sample global batch, the
    gradients through the gather keep both replicas identical step after step, and the losses
    differ from the local context's (4 samples per process; the shared two-process run)."""
    wrapper, out, hashes = tmp_path / "train_with_hashes.py", tmp_path / "global", tmp_path / "hashes"
    wrapper.write_text(PARAM_HASHES)
    hashes.mkdir()
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(wrapper), "--data", tiny_data, "--output-dir",
           str(out), *TINY, "--bf-context", "global", "--max-steps", "3"]
    result = run(cmd, HASH_DIR=str(hashes))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "context the global batch of 8" in result.stdout
    rank0 = [json.loads(line)["sha256"] for line in open(hashes / "rank0.jsonl")]
    rank1 = [json.loads(line)["sha256"] for line in open(hashes / "rank1.jsonl")]
    assert len(rank0) == 3 and rank0 == rank1 and len(set(rank0)) == 3
    global_losses = [r["loss"] for r in metrics(out)]
    local_losses = [r["loss"] for r in metrics(two_process_run["out"])][:3]
    assert all(g == g for g in global_losses) and global_losses != local_losses
    assert rank0 != two_process_run["hashes"][0][:3]  # other weights than the local context's after each step
