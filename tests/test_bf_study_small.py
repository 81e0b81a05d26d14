"""bench/bf_study.py end to end on a few hundred real CIFAR-10 images: interleaved calibration,
MoCo v3 and a BatchFormer variant at equal wall-clock and at equal steps, probes, table titled with the data set,
plot, and a rerun that reuses the calibration and the runs. Skips where the shared data folder is absent."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from test_quality_small import (CIFAR, REPO, TOY_BUDGET_MIN, TOY_TRAIN_ARGS, assert_ran_as_planned, copy_subset,
                                planned_steps, table_rows)


@pytest.mark.slow
@pytest.mark.e2e
def test_bf_study_small(tmp_path):
    if not (os.path.isdir(os.path.join(CIFAR, "train")) and os.path.isdir(os.path.join(CIFAR, "val"))):
        pytest.skip(f"CIFAR-10 ImageFolder not found at {CIFAR} (see ../shared/data/README.md)")
    data, out = str(tmp_path / "cifar-small"), str(tmp_path / "out")
    copy_subset(data, train_per_class=40, val_per_class=20)
    cmd = [sys.executable, "bench/bf_study.py", "--data", data, "--out", out, "--budget-min", TOY_BUDGET_MIN,
           "--seeds", "1", "--variants", "after-warmup", "--calibration-rounds", "2", "--calibration-steps", "15",
           "--equal-steps", "--procs", "1", "--threads", "2", "--quality-args",
           f"--batch-size 32 --train-args '{TOY_TRAIN_ARGS}' --knn-points 2 --knn-samples 100 "
           "--fast-epochs 20"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    assert f"# BatchFormer variants on cifar-small, {TOY_BUDGET_MIN} min per run" in r.stdout
    rows = table_rows(r.stdout)
    assert tuple(rows) == ("moco", "after-warmup")
    assert rows["moco"]["− MoCo v3 (paired)"] == "–" and "±" in rows["after-warmup"]["− MoCo v3 (paired)"]
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["ranking"] == ["after-warmup"]
    assert all(len(c["rounds_step_s"]) == 2 for c in results["calibration"].values())  # interleaved rounds
    runs = {run["name"]: run for run in results["runs"]}
    for name in ("moco", "after-warmup"):
        assert_ran_as_planned(runs[name])
    # Equal steps: the variant at MoCo v3's step count, trained only where the budgets gave different counts.
    same = runs.get("after-warmup@moco-steps", runs["after-warmup"])
    assert planned_steps(same) == planned_steps(runs["moco"])
    assert (same is runs["after-warmup"]) == (planned_steps(runs["after-warmup"]) == planned_steps(runs["moco"]))
    if same is not runs["after-warmup"]:  # no budget: all its steps
        assert same["steps"] == planned_steps(same) and not same["stopped_at_budget"], same
    diff = same["knn_top1"] - runs["moco"]["knn_top1"]
    assert rows["after-warmup"]["kNN − MoCo v3 at equal steps (paired)"] == f"{diff:.1f} ± 0.0"
    assert results["summary"]["after-warmup"]["knn_diff_equal_steps_mean"] == pytest.approx(diff)
    late = open(os.path.join(out, "runs", "seed0", "after-warmup", "train.log")).read()
    assert "on from step" in late
    plot = ET.parse(os.path.join(out, "knn_curve.svg")).getroot()
    assert len(plot.findall("{http://www.w3.org/2000/svg}polyline")) == 4  # two runs, two panels

    # A rerun into the same folder (how a study grows by seeds) trains and calibrates nothing again.
    calibration_log = os.path.join(out, "calibration", "moco-0", "train.log")
    before = os.stat(calibration_log).st_mtime_ns
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("seed 0: reusing") == len(runs) and "training" not in again.stdout
    assert os.stat(calibration_log).st_mtime_ns == before
    assert json.load(open(os.path.join(out, "results.json")))["runs"] == results["runs"]


def test_late_switch_is_timed_switched_on_and_blended(tmp_path, monkeypatch):
    """after-warmup is calibrated with BatchFormer on from step 0; its run's step time is MoCo v3's
    for the warm-up tenth and its own for the rest: 0.1 x 1.0 + 0.9 x 1.2 = 1.18 s."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import bf_study

    commands = {}

    def fake_calibrate(setup, env, steps_per_epoch, bf, earlier, name, extra):
        commands[name] = list(extra)
        step_s = 1.0 if name.startswith("moco") else 1.2
        return {"step_s": step_s, "monitor_s": 2.0, "startup_s": 3.0, "checkpoint_exit_s": 1.0}

    monkeypatch.setattr(bf_study.cifar_pretraining, "calibrate", fake_calibrate)
    setup = bf_study.setup_of(bf_study.parse_args(["--out", str(tmp_path)]))
    cal = bf_study.calibrate(setup, {}, 195, ["after-warmup", "released"], 2, str(tmp_path / "calibration.json"))
    assert commands["after-warmup-0"] == ["--bf-loss", "pairs-sum", "--bf-start-epoch", "0.0"]
    assert cal["after-warmup"]["step_s"] == pytest.approx(0.1 * 1.0 + 0.9 * 1.2)
    assert cal["after-warmup"]["rounds_step_s"] == [1.2, 1.2]
    assert cal["released"]["step_s"] == pytest.approx(1.2) and cal["moco"]["step_s"] == pytest.approx(1.0)
    assert sorted(json.load(open(tmp_path / "calibration.json"))) == sorted(commands)
