"""train.py --augment batched end to end: the views made on the training device from the loader's
seeded parameters (bfcl/augment.py) train, and a run stopped mid-epoch and resumed equals an
uninterrupted one, loss for loss and weight for weight (the parameters are drawn per sample from
(seed, epoch, position), as the PIL views are)."""

import json

import pytest

from scripts import STEPS, assert_same_weights, checkpoint_steps, final_weights, metrics, run, train_cmd

pytestmark = pytest.mark.slow


def test_batched_views_train_and_resume_exactly(tiny_data, straight_run, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run(train_cmd(tiny_data, straight, "--augment", "batched"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.load(open(straight / "config.json"))["config"]["augment"] == "batched"
    first = run(train_cmd(tiny_data, resumed, "--augment", "batched", "--max-steps", "3"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert checkpoint_steps(resumed) == [3]
    second = run(train_cmd(tiny_data, resumed, "--augment", "batched"))
    assert second.returncode == 0 and "(step 3)" in second.stdout, second.stdout + second.stderr

    batched = metrics(straight)
    assert [r["step"] for r in metrics(resumed)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in batched]
    assert_same_weights(final_weights(resumed), final_weights(straight))
    # The same model, data and seed with the PIL views (the shared run): other pixels, so another
    # first loss, of the same size (both are MoCo v3's views of the same images).
    pil = metrics(straight_run)
    assert batched[0]["loss"] != pil[0]["loss"] and abs(batched[0]["loss"] - pil[0]["loss"]) < 0.2 * pil[0]["loss"]
    assert [r["lr"] for r in batched] == [r["lr"] for r in pil]
