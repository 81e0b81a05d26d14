"""Edges a user meets: a shortened schedule without --warmup-epochs, a file of random bytes
passed as a checkpoint, and stop signals that arrive during start-up or between slow sync points."""

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
from bfcl.pretrained import CheckpointError, load_backbone_state
from bfcl.synthetic import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pth.tar"
    path.write_bytes(bytes(range(7, 256)) * 16)
    with pytest.raises(CheckpointError, match="is not a checkpoint .*neither"):
        load_backbone_state(str(path))


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
