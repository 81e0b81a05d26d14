"""No number from nothing (issue 33, case 2): a statistic that is non-finite or undefined (a variance
of one sample, NaN class scores, an empty evaluation set) refuses in one line and no result is
written, instead of an accuracy computed from NaNs."""

import os

import pytest
import torch

from bfcl.errors import DataError, TrainingError
from bfcl.knn import topk_accuracy
from bfcl.linear import fast_linear
from scripts import PROBE_TINY as TINY
from test_probe import colour_folder, error_of


def test_fast_linear_refuses_a_variance_of_one_sample():
    """One train image: its variance is NaN, and the head used to score NaNs as 'top-1 25.00'."""
    train_x, val_x = torch.randn(1, 8), torch.randn(6, 8)
    with pytest.raises(DataError, match="at least 2 train images"):
        fast_linear(train_x, torch.tensor([0]), val_x, torch.arange(6) % 4, num_classes=4, epochs=2, seed=0)


def test_fast_linear_refuses_non_finite_features():
    train_x = torch.randn(12, 8)
    train_x[3, 2] = float("inf")
    with pytest.raises(TrainingError, match="not finite"):
        fast_linear(train_x, torch.arange(12) % 4, torch.randn(6, 8), torch.arange(6) % 4, 4, epochs=2, seed=0)


def test_accuracy_of_non_finite_or_no_scores_is_refused():
    scores = torch.randn(5, 4)
    assert topk_accuracy(scores, scores.argmax(1))["top1"] == 100.0  # the reference: finite scores count
    scores[2, 1] = float("nan")
    with pytest.raises(TrainingError, match="1 of 5 rows .* not finite"):
        topk_accuracy(scores, torch.zeros(5, dtype=torch.long))
    with pytest.raises(DataError, match="no samples"):
        topk_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))


@pytest.mark.slow
def test_probe_on_one_labelled_image_writes_no_result(tmp_path):
    """The issue's run: a subset of one image, fast-linear: one line, no results.json."""
    data = colour_folder(str(tmp_path / "data"), train_per_class=3, val_per_class=2, size=8)
    (tmp_path / "one.txt").write_text("c0/0.png\n")
    out = tmp_path / "out"
    message = error_of([*TINY, "--data", data, "--output-dir", str(out), "--mode", "fast-linear",
                        "--fast-epochs", "2", "--train-list", str(tmp_path / "one.txt")])
    assert "at least 2 train images" in message and "labels" in message
    assert not os.path.exists(out / "results.json")
