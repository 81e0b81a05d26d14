"""--report-to (bfcl/tracking.py): the tracker gets exactly metrics.jsonl's scalars at the same steps, once
each across a resume; a missing package stops the run before any work; a failing tracker does not."""

import importlib.util
import json
import os
import shutil
import sys

import pytest

from bfcl.tracking import TrackerLog, TrackingError, hyperparameters, last_logged_step, start_trackers, trackers_for
from scripts import STEPS, checkpoint_steps, metrics, run, train_cmd

SCALARS = ("epoch", "loss", "lr", "m", "img_per_s", "data_wait", "bad_images")
MISSING = next((t for t in ("mlflow", "wandb", "trackio") if importlib.util.find_spec(t) is None), None)


def tensorboard_scalars(out) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file in <out>/tensorboard, in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def first_record_per_step(out) -> dict[int, dict]:
    """metrics.jsonl by step; a step a resumed run logged again keeps its first record (what the tracker has)."""
    records = {}
    for r in metrics(out):
        records.setdefault(r["step"], r)
    return records


TIMING = ("img_per_s", "data_wait")


def assert_tracker_equals_metrics(out, tags=SCALARS, extra=(), retrained=()) -> None:
    """TensorBoard holds metrics.jsonl's scalars, each step once. A step in `retrained` was logged by a run
    killed before its checkpoint and trained again on resume: metrics.jsonl keeps the second record, the
    tracker the first (it cannot take a step back), so only their timings may differ."""
    scalars, records = tensorboard_scalars(out), first_record_per_step(out)
    assert set(scalars) == set(tags) | set(extra)
    for tag in tags:
        expected = [(step, r[tag]) for step, r in sorted(records.items()) if tag in r]
        assert [s for s, _ in scalars[tag]] == [s for s, _ in expected], tag  # same steps, each once
        for (step, got), (_, want) in zip(scalars[tag], expected):
            if not (tag in TIMING and step in retrained):
                assert got == pytest.approx(want, rel=1e-6, abs=1e-9), tag  # TensorBoard stores float32


class FlakyAccelerator:
    """accelerator.log that raises from the second call on, recording the calls."""
    log_with = ["fake"]

    def __init__(self):
        self.calls = []

    def log(self, values, step):
        self.calls.append((step, values))
        if len(self.calls) > 1:
            raise OSError("No space left on device")


def test_a_failing_tracker_is_warned_about_once(tmp_path):
    warnings = []
    tracker = TrackerLog(FlakyAccelerator(), str(tmp_path / "none.jsonl"), warnings.append)
    for step in range(1, 5):
        tracker.log(step, {"loss": 1.0 / step, "lr": 0.1, "flag": True, "note": "text"})
    assert [s for s, _ in tracker.accelerator.calls] == [1, 2, 3, 4]  # it keeps trying: the disk may come back
    assert tracker.accelerator.calls[0][1] == {"loss": 1.0, "lr": 0.1}  # numbers only
    assert len(warnings) == 1 and "step 2" in warnings[0] and "No space left" in warnings[0]
    assert tracker.failures == 3


def test_steps_already_logged_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "knn_top1": 10}\n{"step": 4, "loss": 1}\n{"step": 3, "loss": 1}\n{"step": 5, "lo')
    assert last_logged_step(str(path)) == 4
    accelerator = FlakyAccelerator()
    tracker = TrackerLog(accelerator, str(path), lambda text: None)
    tracker.log(3, {"loss": 2.0})
    tracker.log(4, {"loss": 2.0})
    tracker.log(5, {"loss": 2.0})
    tracker.log(5, {"loss": 3.0})
    assert accelerator.calls == [(5, {"loss": 2.0})]


def test_hyperparameters_are_flat_scalars():
    got = hyperparameters({"lr": 0.1, "arch": "resnet18", "blur": True, "lr_none": None, "steps": [1, 2]})
    assert got == {"lr": 0.1, "arch": "resnet18", "blur": True, "lr_none": "None", "steps": "[1, 2]"}


def test_a_tracker_that_cannot_start_is_named_in_one_line(tmp_path):
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class Unreachable(GeneralTracker):  # as MLflow without a usable tracking URI
        name, requires_logging_directory, main_process_only = "mlflow", False, True

        def __init__(self):
            super().__init__(_blank=True)

        def start(self):
            raise RuntimeError("got unsupported URI 'sqlite:///mlflow.db'\nsecond line")

    with pytest.raises(TrackingError) as raised:
        start_trackers(Accelerator(cpu=True, log_with=[Unreachable()]), str(tmp_path), {"lr": 0.1})
    assert str(raised.value) == ("--report-to: starting mlflow failed (got unsupported URI 'sqlite:///mlflow.db'); "
                                 "fix the tracker's set-up or pass --report-to none")
    assert not (tmp_path / "tracker.json").exists()


@pytest.mark.skipif(MISSING is None, reason="every tracker package is installed")
def test_missing_package_is_one_line_naming_it():
    with pytest.raises(TrackingError, match=f"needs the {MISSING} package"):
        trackers_for(MISSING)
    assert trackers_for("none") == []


@pytest.mark.slow
@pytest.mark.skipif(MISSING is None, reason="every tracker package is installed")
def test_missing_package_fails_before_training(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run(train_cmd(tiny_data, out, "--report-to", MISSING))
    assert result.returncode != 0
    assert f"pip install {MISSING}" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.exists(out / "metrics.jsonl") and checkpoint_steps(out) == []


@pytest.mark.slow
def test_tensorboard_equals_metrics_also_across_a_resume(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    straight = tmp_path / "straight"
    result = run(train_cmd(tiny_data, straight, "--report-to", "tensorboard"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_tracker_equals_metrics(straight)
    assert max(s for s, _ in tensorboard_scalars(straight)["loss"]) == STEPS

    # killed after logging step 3 but before its checkpoint: the resume from step 2 trains step 3 again;
    # metrics.jsonl drops the first step 3 (bfcl/progress.py), the tracker skips the second
    out = tmp_path / "resumed"
    first = run(train_cmd(tiny_data, out, "--report-to", "tensorboard", "--max-steps", "3", "--save-every", "2"))
    assert first.returncode == 0, first.stdout + first.stderr
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    second = run(train_cmd(tiny_data, out, "--report-to", "tensorboard", "--save-every", "2"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert_tracker_equals_metrics(out, retrained=(3,))  # steps 1..8 once each, in the same folder
    run_file = json.load(open(out / "tracker.json"))
    assert run_file["name"] == "resumed"
    # and the losses of the resumed run are those of the straight one (the tracker changed nothing)
    assert [v for _, v in tensorboard_scalars(out)["loss"]] == [v for _, v in tensorboard_scalars(straight)["loss"]]


FAILING_TRACKER = r"""
import os, sys
sys.path.insert(0, os.getcwd())
from accelerate.tracking import TensorBoardTracker
log = TensorBoardTracker.log
def failing_log(self, values, step=None, **kwargs):
    if step >= 3:
        raise OSError("disk quota exceeded")
    log(self, values, step=step, **kwargs)
TensorBoardTracker.log = failing_log
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_tracker_failing_mid_run_does_not_stop_training(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    wrapper, out = tmp_path / "train_failing_tracker.py", tmp_path / "run"
    wrapper.write_text(FAILING_TRACKER)
    result = run([sys.executable, str(wrapper), "--data", tiny_data, "--output-dir", str(out),
                  *train_cmd(tiny_data, out, "--report-to", "tensorboard")[6:]])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("the tracker failed") == 1 and "disk quota exceeded" in result.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1)) and checkpoint_steps(out) == [4, STEPS]
    assert [s for s, _ in tensorboard_scalars(out)["loss"]] == [1, 2]


@pytest.mark.slow
def test_probe_finetune_reports_metrics_and_results_to_tensorboard(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "probe"
    result = run([sys.executable, "probe.py", "--random-init", "-a", "vit_tiny", "--patch-size", "8", "--image-size",
                  "16", "--data", tiny_data, "--output-dir", str(out), "--mode", "finetune", "-b", "8", "--epochs", "1",
                  "--warmup-epochs", "0", "--workers", "0", "--log-every", "1", "--report-to", "tensorboard"])
    assert result.returncode == 0, result.stdout + result.stderr
    records = metrics(out)
    tags = {k for r in records for k, v in r.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"loss", "lr"} <= tags
    results = json.load(open(out / "results.json"))["results"]
    from bfcl.tracking import flat_scalars
    final = flat_scalars(results)
    assert final and all("/" in k for k in final)
    assert_tracker_equals_metrics(out, tags=sorted(tags), extra=final)
    scalars = tensorboard_scalars(out)
    for tag, value in final.items():
        assert scalars[tag] == [(0, pytest.approx(value, rel=1e-6))], tag
