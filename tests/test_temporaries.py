"""Temporaries that an interrupted write leaves (NAME.tmp-PID) are removed on the next start, before
the free-disk check (docs/reliability.md)."""

import os

import pytest

import bfcl.runs

import train
from bfcl.runlock import RunLock
from scripts import TINY


def _leave_temporaries(out) -> list[str]:
    """What a run killed during an export, an index save and a checkpoint leaves behind."""
    os.makedirs(out / "checkpoints" / ".step-00000004.tmp-4242")
    (out / "checkpoints" / ".step-00000004.tmp-4242" / "model.safetensors").write_bytes(b"x" * 3000)
    (out / "backbone.safetensors.tmp-4242").write_bytes(b"x" * 5000)
    (out / "image-index.safetensors.tmp-77").write_bytes(b"x" * 100)
    (out / ".write-test-4242").write_bytes(b"")
    return ["checkpoints/.step-00000004.tmp-4242", "backbone.safetensors.tmp-4242", "image-index.safetensors.tmp-77",
            ".write-test-4242"]


def test_taking_the_lock_removes_temporaries_and_nothing_else(tmp_path):
    left = _leave_temporaries(tmp_path)
    kept = ["backbone.safetensors", "notes.tmp-old", "tmp-12", "checkpoints/step-00000002/meta.json"]
    os.makedirs(tmp_path / "checkpoints" / "step-00000002")
    for name in kept:
        (tmp_path / name).write_text("keep")
    with RunLock(str(tmp_path)) as lock:
        assert lock.message.startswith("removed 4 temporary file(s) an interrupted run left (")
        assert "MiB" in lock.message
    assert not any(os.path.lexists(tmp_path / name) for name in left)
    assert all((tmp_path / name).read_text() == "keep" for name in kept)


def test_nothing_to_remove_says_nothing(tmp_path):
    with RunLock(str(tmp_path)) as lock:
        assert lock.message is None


def test_the_free_disk_check_sees_the_space_of_removed_temporaries(tiny_data, tmp_path, monkeypatch):
    """train.py's free-disk check runs after the temporaries are gone, so their space counts as free."""
    out = tmp_path / "run"
    out.mkdir()
    left = _leave_temporaries(out)
    seen = []

    def disk_usage(path):
        seen.append([name for name in left if os.path.lexists(out / name)])
        raise RuntimeError("stop after the free-disk check")

    monkeypatch.setattr(bfcl.runs.shutil, "disk_usage", disk_usage)  # check_free_disk's
    with pytest.raises(RuntimeError, match="stop after the free-disk check"):
        train.main(["--data", tiny_data, "--output-dir", str(out), *TINY])
    assert seen == [[]]
