"""bench/harness.py and bench/cifar_pretraining.py without training: a calibration run's wall-clock
split into step time, start-up, last window and exit on worked times; the budget as a step count;
mean ± std cells; a Setup from --quality-args."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import cifar_pretraining  # noqa: E402
import harness  # noqa: E402


def test_short_run_split_on_worked_times(tmp_path, monkeypatch):
    """A run started at t=100 that logs every 5 steps, 1 s a step but 2 s for the epoch-end window
    (steps 11-15) and 3 s more in the last window (the monitor), and ends 4 s after its last log."""
    times = {5: 110.0, 10: 115.0, 15: 122.0, 20: 127.0, 25: 135.0}
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, t in times.items():
            f.write(json.dumps({"step": step, "time": t}) + "\n")
    monkeypatch.setattr(harness, "run", lambda cmd, log, env: {"start": 100.0, "wall_s": 39.0})
    split = harness.time_short_run(["x"], str(tmp_path), "log", {}, 25, steps_per_epoch=12)
    # windows 10 and 20 are plain (5 s); 15 holds the epoch end at step 12 and is left out
    assert split["step_s"] == pytest.approx(1.0)
    assert split["startup_s"] == pytest.approx(110 - 100 - 5)
    assert split["last_window_s"] == pytest.approx(8 - 5)
    assert split["exit_s"] == pytest.approx(139 - 135)
    # without the epoch lengths every window counts: median of 5, 7, 5 s
    assert harness.time_short_run(["x"], str(tmp_path), "log", {}, 25)["step_s"] == pytest.approx(1.0)


def test_steps_for_budget_counts_checkpoints_and_monitor_passes():
    cal = {"step_s": 2.0, "startup_s": 10.0, "checkpoint_exit_s": 5.0, "monitor_s": 4.0}
    # 600 s: 600 - 10 - 5 = 585 -> 292 steps -> 2 epoch ends of 100 steps: overhead 10 + 5 x 3 + 3 x 4 = 37
    # -> (600 - 37) / 2 = 281 steps, still 2 epoch ends
    assert cifar_pretraining.steps_for_budget(cal, 600, 100, 3) == 281
    assert cifar_pretraining.steps_for_budget(cal, 1, 100, 3) == 10  # at least 10 steps


def test_mean_std_cells():
    assert harness.mean_std([50.0, 52.0]) == "51.0 ± 1.4"
    assert harness.mean_std([48.94]) == "48.9"
    assert harness.mean_std([48.94], always_std=True) == "48.9 ± 0.0"
    assert harness.mean_std([1200.0, 1300.0], 0) == "1250 ± 71"
    assert harness.mean_std([]) == "–"
    assert harness.std([3.0]) == 0.0


def test_setup_takes_quality_args_on_top_of_the_script_defaults(tmp_path):
    setup = cifar_pretraining.setup_with_options("--batch-size 64 --knn-points 2 --train-args '--lr 1.2'",
                                                 "/data", str(tmp_path), procs=1, knn_points=3)
    assert (setup.procs, setup.knn_points, setup.batch_size, setup.knn_samples) == (1, 2, 64, 2000)
    assert setup.recipe_value("-b") == "64" and setup.recipe_value("--lr") == "1.2"
    assert setup.random_init_args() == ["--random-init", "-a", "resnet18", "--stem", "imagenet"]
    with pytest.raises(SystemExit):  # a flag of quality.py's own (not the recipe's) is refused
        cifar_pretraining.setup_with_options("--budget-min 3", "/data", str(tmp_path))
