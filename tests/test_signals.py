"""Stop signals (bfcl/loop.py StopCheck, train.py): the check interval follows the wall clock, fast
steps never check between sync points, and a signal during start-up checkpoints after the first step."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from bfcl import loop
from bfcl.checkpoint import list_checkpoints
from bfcl.synthetic import make_image_folder
from scripts import REPO


def test_stop_check_interval_tracks_wall_clock(monkeypatch):
    """Steps of 10 s on each of 2 processes: after the first check the next comes 3 steps later
    (30 s); a stop flag from either process is heard at the check."""
    clock = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    check = loop.StopCheck(start_step=5, seconds=30.0)
    two_processes = lambda t: t * 2  # both processes report the same values
    assert check.due(6)  # the first check follows the first step
    clock[0] += 10.0
    assert check.poll(6, False, two_processes, 2, torch.device("cpu")) is False
    assert check.every == 3
    assert not check.due(8) and check.due(9)
    clock[0] += 30.0
    assert check.poll(9, True, two_processes, 2, torch.device("cpu")) is True
    check.synced(12)  # a full sync point restarts the count
    assert not check.due(14) and check.due(15)


def test_fast_steps_never_check_between_sync_points(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    check = loop.StopCheck(start_step=0)
    clock[0] += 0.01
    check.poll(1, False, lambda t: t, 1, torch.device("cpu"))
    assert check.every == 3000


@pytest.mark.slow
def test_signal_during_start_up_checkpoints_after_the_first_step(tmp_path):
    """SIGTERM as soon as the run holds its lock (before data, model and loop exist): the run
    trains its first step, writes a checkpoint and exits 75 with a message, not 143."""
    data = tmp_path / "data"
    make_image_folder(str(data), classes=2, train_per_class=8, val_per_class=2, size=16)
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--data", str(data), "--output-dir", str(out), "-a", "resnet18",
           "--stem", "small", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "32", "--moco-dim", "16",
           "--workers", "0", "--epochs", "4", "--log-every", "100"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".lock").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == train.EXIT_PREEMPTED, stderr
    assert "stopped by a signal at step 1; checkpoint written" in stdout + stderr
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["step-00000001"]
