"""bench/multicrop.py end to end on a few hundred real CIFAR-10 images: two arms (local crops; 4 views of
half the batch, whose schedule flags are rewritten for its batch) against MoCo v3 at equal wall-clock, probes
and the table. Skips where the shared data folder is absent."""

import json
import os
import subprocess
import sys

import pytest

from test_quality_small import CIFAR, REPO, TOY_TRAIN_ARGS, assert_ran_as_planned, copy_subset, table_rows

# 1.5 min, not test_quality_small's 0.5: on a 2-core machine busy with another benchmark, a run's start-up
# alone took more than the 45 s after which a 0.5 min run is stopped (2026-12-08).
TOY_BUDGET_MIN = "1.5"


@pytest.mark.slow
@pytest.mark.e2e
def test_multicrop_bench_small(tmp_path):
    if not (os.path.isdir(os.path.join(CIFAR, "train")) and os.path.isdir(os.path.join(CIFAR, "val"))):
        pytest.skip(f"CIFAR-10 ImageFolder not found at {CIFAR} (see ../shared/data/README.md)")
    data, out = str(tmp_path / "cifar-small"), str(tmp_path / "out")
    copy_subset(data, train_per_class=40, val_per_class=20)
    cmd = [sys.executable, "bench/multicrop.py", "--data", data, "--out", out, "--budget-min", TOY_BUDGET_MIN,
           "--seeds", "1", "--variants", "local-2,views-4-half-batch", "--calibration-rounds", "1",
           "--calibration-steps", "15", "--procs", "1", "--threads", "1", "--quality-args",
           f"--batch-size 32 --train-args '{TOY_TRAIN_ARGS}' --knn-points 2 --knn-samples 100 --fast-epochs 20"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    assert f"# Multi-crop arms on cifar-small, {TOY_BUDGET_MIN} min per run" in r.stdout
    rows = table_rows(r.stdout)
    assert tuple(rows) == ("moco", "local-2", "views-4-half-batch")
    results = json.load(open(os.path.join(out, "results.json")))
    runs = {run["name"]: run for run in results["runs"]}
    for name in ("moco", "local-2"):
        assert_ran_as_planned(runs[name])
    assert "--local-crops 2 --local-crop-size 17" in runs["local-2"]["command"]
    # Half the toy recipe's batch of 32, and the planned steps (the first --epochs, at batch 32: 12 steps an
    # epoch) in the arm's own --epochs at batch 16 (25 steps an epoch), which train.py takes (the last one).
    half = runs["views-4-half-batch"]
    words = half["command"].split()
    assert words[len(words) - 1 - words[::-1].index("-b") + 1] == "16"
    planned = round(float(words[words.index("--epochs") + 1]) * (400 // 32))
    log = open(os.path.join(out, "runs", "seed0", "views-4-half-batch", "train.log")).read()
    assert f"total steps: {planned}" in " ".join(log.split()) and "4 global at 24 px" in log
    assert half["steps"] == planned or half["stopped_at_budget"], half
    local = open(os.path.join(out, "runs", "seed0", "local-2", "train.log")).read()
    assert "2 global at 24 px + 2 local at 17 px" in local
