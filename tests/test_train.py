"""train.py as a whole (docs/reliability.md#how-it-is-tested): a run stopped with --max-steps and resumed equals
an uninterrupted one; two CPU processes under torchrun keep identical weights and resume; bf16
autocast computes the fp32 loss. Tiny: resnet18, small stem, 16 px, 32 images (scripts.TINY). The
uninterrupted references are the session's shared runs (conftest.py)."""

import pytest
import torch
from safetensors.torch import load_file

from scripts import (STEPS, VIT_TINY, assert_same_weights, checkpoint_steps, final_weights, metrics, parameter_hash,
                     run, train_cmd)

pytestmark = pytest.mark.slow


def test_max_steps_then_resume_equals_straight_run(tiny_data, straight_run, tmp_path):
    first = run(train_cmd(tiny_data, tmp_path, "--max-steps", "3"))  # stops mid-epoch
    assert first.returncode == 0, first.stdout + first.stderr
    assert checkpoint_steps(tmp_path) == [3]
    second = run(train_cmd(tiny_data, tmp_path))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "(step 3)" in second.stdout

    resumed, reference = metrics(tmp_path), metrics(straight_run)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "m"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], key
    final = final_weights(tmp_path)
    assert_same_weights(final, final_weights(straight_run))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in final)


def test_two_processes_agree_and_resume(two_process_run):
    first, second, out = two_process_run["first"], two_process_run["second"], two_process_run["out"]
    assert "processes: 2" in first.stdout and "context 4 samples per process" in first.stdout
    assert two_process_run["steps_after_first"] == [2]
    assert "(step 2)" in second.stdout
    assert checkpoint_steps(out)[-1] == STEPS

    rank0, rank1 = two_process_run["hashes"]
    assert len(rank0) == STEPS and rank0 == rank1  # gradient averaging keeps the replicas identical
    assert len(set(rank0)) == STEPS  # and the weights do move every step
    # the checkpoints only rank 0 writes hold rank 1's weights too (BN buffers are per process
    # on CPU, where gloo has no SyncBatchNorm, so parameters only)
    for step in (4, STEPS):
        model_file = str(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors")
        names = [n for n in load_file(model_file)
                 if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert parameter_hash(model_file, names) == rank1[step - 1], step
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in metrics(out))


def test_bf16_on_cpu_matches_fp32_and_resume_refuses_another_precision(tiny_data, straight_run, tmp_path):
    """--mixed-precision bf16 (autocast; NHWC on CPU too): the first loss is the fp32 run's up to
    bf16 rounding, master weights stay fp32, and resuming in fp32 is refused as a changed precision,
    with one line on stderr and no traceback."""
    result = run(train_cmd(tiny_data, tmp_path, "--mixed-precision", "bf16", "--max-steps", "1"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "precision: bf16" in result.stdout
    bf16, fp32 = metrics(tmp_path), metrics(straight_run)
    assert [r["step"] for r in bf16] == [1]
    assert bf16[0]["loss"] != fp32[0]["loss"]  # autocast really ran in bf16 ...
    assert abs(bf16[0]["loss"] - fp32[0]["loss"]) < 0.02 * fp32[0]["loss"]  # ... and computed the same loss
    weights = final_weights(tmp_path)
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}

    refused = run(train_cmd(tiny_data, tmp_path, "--mixed-precision", "no"))
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("error: ") and len(refused.stderr.strip().splitlines()) == 1, \
        refused.stderr
    assert "settings differ (precision: trained in 'bf16', this run's 'no')" in refused.stderr


def test_vit_resume_equals_straight_run(tiny_data, tmp_path):
    """A ViT-Tiny run with BatchFormer (AdamW, MoCo v3's ViT defaults) stopped at step 3 and resumed
    ends with the same losses and the same weights as an uninterrupted run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cmd = lambda out, *extra: train_cmd(tiny_data, out, *extra, settings=VIT_TINY)
    assert run(cmd(straight)).returncode == 0
    first = run(cmd(resumed, "--max-steps", "3"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "ViT recipe defaults: --optimizer adamw, --lr 0.00015, --wd 0.1, --moco-t 0.2, --crop-min 0.08" \
        in first.stdout
    second = run(cmd(resumed))
    assert second.returncode == 0 and "(step 3)" in second.stdout, second.stdout + second.stderr
    assert [(r["step"], r["loss"]) for r in metrics(resumed)] == [(r["step"], r["loss"]) for r in metrics(straight)]
    assert_same_weights(final_weights(resumed), final_weights(straight))
