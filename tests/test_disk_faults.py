"""A full disk or a file-size limit during a write: one line, the previous checkpoint and export
intact, no temporary left; too little free disk refused at start (docs/reliability.md)."""

import errno
import os
import resource
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import bfcl.checkpoint
import bfcl.runs
import train
from bfcl.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, save_file_atomic
from bfcl.synthetic import make_image_folder
from scripts import IMAGENET_STEM_TINY, REPO, error_of

STATE = {"w": torch.arange(1000.0)}


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    previous = save_checkpoint(str(tmp_path), 4, STATE, {}, {"config": {}}, keep=2)
    monkeypatch.setattr(bfcl.checkpoint, "save_file", _disk_full)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(str(tmp_path), 8, STATE, {}, {"config": {}}, keep=2)
    assert str(e.value) == (f"cannot write checkpoint step 8 in {tmp_path}/checkpoints (No space left on device); "
                            f"the previous checkpoint {previous} is intact; free some space or make the folder "
                            "writable, then run the same command again")
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000004"]  # no temporary folder
    assert latest_checkpoint(str(tmp_path)) == previous and torch.equal(load_checkpoint(previous)[0]["w"], STATE["w"])


def test_a_full_disk_during_an_export_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "backbone.safetensors")
    save_file_atomic(STATE, path)
    before = open(path, "rb").read()
    monkeypatch.setattr(bfcl.checkpoint, "save_file", _disk_full)
    with pytest.raises(CheckpointError, match=r"cannot write .*backbone.safetensors \(No space left on device\); "
                                              r".*backbone.safetensors is unchanged"):
        save_file_atomic(STATE, path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["backbone.safetensors"]


WRITER = r"""
import sys, torch
from bfcl.checkpoint import CheckpointError, save_checkpoint
try:
    save_checkpoint(sys.argv[1], 8, {"w": torch.zeros(1_000_000)}, {}, {"config": {}}, keep=2)
except CheckpointError as e:
    sys.exit(f"error: {e}")
"""


@pytest.mark.e2e
def test_a_real_file_size_limit_during_a_checkpoint(tmp_path):
    previous = save_checkpoint(str(tmp_path), 4, {"w": torch.zeros(10)}, {}, {"config": {}}, keep=2)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB; the model is 4 MB
    result = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            preexec_fn=limit, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().startswith("error: cannot write checkpoint step 8") and \
        f"the previous checkpoint {previous} is intact" in result.stderr, result.stderr
    assert "\n" not in result.stderr.strip() and os.listdir(tmp_path / "checkpoints") == ["step-00000004"]
    load_checkpoint(previous)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=12,
                             val_per_class=4, size=16)


def test_too_little_disk(data, tmp_path, monkeypatch):
    monkeypatch.setattr(bfcl.runs.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=0, free=1000))
    message = error_of(train.main, ["--data", data, "--output-dir", str(tmp_path), *IMAGENET_STEM_TINY])
    assert "GiB free" in message and "choose another --output-dir" in message
