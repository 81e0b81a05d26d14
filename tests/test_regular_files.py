"""bfcl opens only regular files: a FIFO or a device named where a file is read ends in one line
instead of hanging or filling memory (bfcl/paths.py; docs/reliability.md)."""

import os
import signal

import pytest

import train
from bfcl.checkpoint import CheckpointError
from bfcl.errors import DataError
from bfcl.index import index_list
from bfcl.pretrained import load_backbone_state
from bfcl.subsets import read_train_list
from scripts import TINY


@pytest.fixture
def deadline():
    """Fail instead of hanging: a test that blocks for 60 s is interrupted by SIGALRM."""
    def expired(signum, frame):
        raise TimeoutError("blocked for 60 s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "backbone.safetensors"
    os.mkfifo(path)
    return str(path)


def test_pretrained_fifo_and_device_are_refused(fifo, deadline, tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_backbone_state(fifo)
    assert str(e.value) == (f"--pretrained {fifo} is a FIFO (named pipe), not a regular file; pass a checkpoint "
                            "folder, backbone.safetensors or .pth.tar file")
    zero = tmp_path / "zero.pth.tar"
    zero.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="is a character device, not a regular file"):
        load_backbone_state(str(zero))


def test_train_list_fifo_and_device_are_refused_by_both_readers(fifo, deadline, tmp_path):
    for listing in (fifo, "/dev/zero"):
        with pytest.raises(DataError, match=r"--train-list .* is a (FIFO|character device).*; pass a file with one"):
            index_list(str(tmp_path), listing)
        with pytest.raises(DataError, match=r"--train-list .* is a (FIFO|character device).*; pass a file with one"):
            read_train_list(listing, ["a/1.jpg"], str(tmp_path))


def test_train_py_with_a_fifo_list_ends_in_one_line(tiny_data, fifo, deadline, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", tiny_data, "--output-dir", str(tmp_path / "out"), "--train-list", fifo, *TINY])
    assert str(e.value.code) == (f"error: --train-list {fifo} is a FIFO (named pipe), not a regular file; pass a "
                                 "file with one image path a line")
