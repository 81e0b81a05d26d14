"""Resuming train.py: stopped by SIGTERM and killed by SIGKILL, a run resumes to the uninterrupted
run's losses and weights; a finished run resumed rewrites a stale export; changed settings are refused
unless forced; --resume none refuses a folder with checkpoints. Which checkpoints a resume accepts:
test_checkpoint.py."""

import os
import shutil
import signal
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train
from bfcl.checkpoint import list_checkpoints
from scripts import (STEPS, TINY, assert_same_weights, checkpoint_steps, error_of, final_weights, metrics, run,
                     run_script, start, train_cmd)


def logged_steps(out) -> int:
    """Complete lines in metrics.jsonl so far (a run may be writing the next one)."""
    path = os.path.join(out, "metrics.jsonl")
    return open(path).read().count("\n") if os.path.exists(path) else 0


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_then_sigkill_mid_run_then_resume_match_the_uninterrupted_run(tiny_data, straight_run, tmp_path):
    """SIGTERM mid-epoch: a checkpoint, exit 75, and the losses so far are the uninterrupted run's.
    The resumed run is then killed (SIGKILL) after its next checkpoint; the last resume ends with the
    uninterrupted run's losses and weights (scripts.IMAGENET_STEM_TINY: 8 steps)."""
    cmd = train_cmd(tiny_data, tmp_path, "--save-every", "2")
    reference = {r["step"]: r["loss"] for r in metrics(straight_run)}

    proc = start(cmd)
    wait_for(lambda: logged_steps(tmp_path) >= 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == train.EXIT_PREEMPTED, out
    assert "stopped by a signal" in out
    stopped_at = metrics(tmp_path)[-1]["step"]
    assert 0 < stopped_at < STEPS - 2, "the signal should land mid-run"
    assert checkpoint_steps(tmp_path)[-1] == stopped_at
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == [(s, reference[s]) for s in range(1, stopped_at + 1)]

    proc = start(cmd)
    wait_for(lambda: checkpoint_steps(tmp_path)[-1] > stopped_at)
    proc.kill()
    out, _ = proc.communicate(timeout=120)
    assert f"(step {stopped_at})" in out
    assert proc.returncode == -signal.SIGKILL, "the kill should land before the end of the run"

    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "scratch" not in resumed.stdout
    # each step once: the resume dropped what the killed run logged after its last checkpoint
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == sorted(reference.items())
    assert_same_weights(final_weights(tmp_path), final_weights(straight_run))


@pytest.mark.slow
def test_resume_refuses_changed_settings_unless_forced(tiny_data, straight_run, tmp_path):
    shutil.copytree(straight_run / "checkpoints" / "step-00000004", tmp_path / "checkpoints" / "step-00000004")
    changed = error_of(train.main, ["--data", tiny_data, "--output-dir", str(tmp_path), *TINY, "--max-steps", "5",
                                    "--lr", "0.5", "-a", "resnet34"])
    assert "--lr 0.6 -> 0.5" in changed and "--arch 'resnet18' -> 'resnet34'" in changed
    assert checkpoint_steps(tmp_path) == [4]
    forced = run(train_cmd(tiny_data, tmp_path, "--max-steps", "5", "--lr", "0.5", "--force-resume"))
    assert forced.returncode == 0, forced.stderr
    assert "(step 4)" in forced.stdout and checkpoint_steps(tmp_path)[-1] == 5


@pytest.mark.slow
def test_resumed_finished_run_rewrites_a_stale_export(tiny_data, straight_run, tmp_path):
    """Killed after the last checkpoint was renamed into place but before the export: the resume
    has nothing to train, and still leaves the export of the newest checkpoint, naming its step."""
    finished = tmp_path / "run"
    shutil.copytree(straight_run, finished)
    export = finished / "backbone.safetensors"
    newest = load_file(os.path.join(list_checkpoints(str(finished))[-1], "model.safetensors"))
    stale = {k: torch.zeros_like(v) for k, v in load_file(export).items()}
    save_file(stale, str(export), {"format": "bfcl-backbone-1", "arch": "resnet18", "stem": "small",
                                   "image_size": "16", "step": "2"})
    again = run_script("train.py", "--data", tiny_data, "--output-dir", str(finished), *TINY)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"done: 8 steps; backbone (step 8) in {export}" in again.stdout
    with safe_open(str(export), "pt") as f:
        assert f.metadata()["step"] == "8"
    for key, value in load_file(export).items():
        assert torch.equal(value, newest["base_encoder.backbone." + key]), key


@pytest.mark.slow
def test_resume_none_in_a_folder_with_checkpoints_is_refused(tiny_data, straight_run):
    message = error_of(train.main, ["--data", tiny_data, "--output-dir", str(straight_run), *TINY, "--resume",
                                    "none"])
    assert "already holds checkpoints" in message and "--resume auto" in message
