"""Schedules against their closed forms (docs/method.md#schedules), and train.py's warm-up of a
shortened schedule."""

import math

import pytest

import train
from bfcl.schedules import learning_rate, momentum

TOTAL, WARMUP, PEAK = 1000, 100, 0.6


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),  # warmup starts from 0
    (25, PEAK / 4),
    (50, PEAK / 2),
    (WARMUP, PEAK),  # end of warmup: the peak
    (WARMUP + 225, PEAK * 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter into the cosine
    (WARMUP + 450, PEAK / 2),  # middle of the cosine
    (TOTAL, 0.0),  # end
])
def test_learning_rate(step, expected):
    assert learning_rate(step, TOTAL, WARMUP, PEAK) == pytest.approx(expected, abs=1e-12)


def test_learning_rate_without_warmup_starts_at_the_peak():
    assert learning_rate(0, TOTAL, 0, PEAK) == pytest.approx(PEAK)
    assert learning_rate(TOTAL // 2, TOTAL, 0, PEAK) == pytest.approx(PEAK / 2)


def test_learning_rate_is_monotone_in_each_phase():
    lrs = [learning_rate(s, TOTAL, WARMUP, PEAK) for s in range(TOTAL + 1)]
    assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP + 1]))
    assert all(a > b for a, b in zip(lrs[WARMUP:TOTAL], lrs[WARMUP + 1:]))


@pytest.mark.parametrize("step, expected", [
    (0, 0.99),
    (TOTAL // 4, 1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.01),
    (TOTAL // 2, 0.995),
    (TOTAL, 1.0),
])
def test_momentum_cosine(step, expected):
    assert momentum(step, TOTAL, 0.99, cosine=True) == pytest.approx(expected, abs=1e-12)


def test_momentum_without_cosine_is_constant():
    assert {momentum(s, TOTAL, 0.996, cosine=False) for s in (0, 1, WARMUP, TOTAL // 2, TOTAL)} == {0.996}


@pytest.mark.parametrize("argv, warmup, scaled", [
    (["--epochs", "3"], 0.3, True),  # ResNet recipe: 10 of 100 epochs -> 10 % of 3
    (["--epochs", "30"], 3.0, True),
    (["--epochs", "300"], 10.0, False),  # a longer schedule keeps the recipe's 10 epochs, as MoCo v3's scripts
    (["--epochs", "3", "--warmup-epochs", "1"], 1.0, False),  # the user's own value is never touched
    (["--epochs", "3", "--warmup-epochs", "0.3"], 0.3, False),  # the user's, even where it equals the share
    (["-a", "vit_small", "--epochs", "30"], 4.0, True),  # ViT recipe: 40 of 300 epochs
    ([], 10.0, False),
])
def test_warmup_follows_a_shortened_schedule(argv, warmup, scaled):
    config, notes = train.with_recipe(train.parse_args(["--data", "D", *argv]))
    assert config.warmup_epochs == pytest.approx(warmup)
    assert (notes["warm-up"] is not None) is scaled
    assert not scaled or "--warmup-epochs" not in (notes["ViT recipe defaults"] or "")
