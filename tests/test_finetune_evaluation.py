"""When fine-tuning evaluates on val/ (issue 33, case 13): by default at a bounded number of epoch
ends and at the end, so that evaluation costs at most about a tenth of the training; every epoch
end with --eval-epoch-ends, the end only with --no-eval-epoch-ends."""

import json
import os

import pytest

import probe
from bfcl.finetune import evaluation_steps
from scripts import PROBE_TINY as TINY
from test_probe import colour_folder


def test_the_issue_run_evaluates_once_at_the_end():
    """1 % of CIFAR-10-like labels: 97 images at batch 32 (3 steps an epoch), 60 epochs, 3,925 val
    images. 180 steps x 32 images x 3 passes / 10 = 1,728 < 3,925: the final evaluation only
    (every epoch end, as before, was 60 x 3,925 val images against 5,760 training images)."""
    assert evaluation_steps(180, 3, 32, 3925, None) == [180]
    assert evaluation_steps(180, 3, 32, 3925, True) == list(range(3, 181, 3))
    assert evaluation_steps(180, 3, 32, 3925, False) == [180]


def test_points_are_bounded_by_the_budget_and_spread_over_epoch_ends():
    # 3 x 100 x 64 / (10 x 500) = 3.84: 3 evaluations, the last at the end, the others at epochs 3 and 7 of 10
    assert evaluation_steps(100, 10, 64, 500, None) == [30, 70, 100]
    # a large budget: at most 10 points, at every tenth of 100 epochs
    assert evaluation_steps(1000, 10, 256, 100, None) == list(range(100, 1001, 100))
    # never more points than whole epochs (2 here), the end included, also after a fractional last epoch
    assert evaluation_steps(25, 10, 256, 10, None) == [10, 25]


@pytest.mark.slow
def test_finetune_by_default_evaluates_at_the_end_only_when_val_dominates(tmp_path):
    """16 train images, batch 8, 3 epochs = 6 steps against 16 val images: 3 x 6 x 8 / (10 x 16) < 2,
    one evaluation; with --eval-epoch-ends one per epoch. The schedule is in the summary."""
    data = colour_folder(str(tmp_path / "data"), train_per_class=4, val_per_class=4, size=8)
    common = [*TINY, "--data", data, "--mode", "finetune", "-b", "8", "--epochs", "3", "--warmup-epochs", "0",
              "--log-every", "1"]
    steps = {}
    for name, extra in (("default", []), ("every", ["--eval-epoch-ends"])):
        out = str(tmp_path / name)
        assert probe.main([*common, "--output-dir", out, *extra]) == 0
        history = json.load(open(os.path.join(out, "results.json")))["results"]["finetune"]["history"]
        steps[name] = [h["step"] for h in history]
    assert steps == {"default": [6], "every": [2, 4, 6]}
