"""A run's identity (which images, in which order) is recorded in every checkpoint and checked on
resume against the checkpoint itself, not only against the saved image index, which a user may
delete (docs/reliability.md)."""

import os
import shutil

import pytest
import torch

from bfcl.checkpoint import CheckpointError, read_meta, resume_checkpoint, save_checkpoint
from bfcl.errors import DataError
from bfcl.index import index_folder, saved_or_built
from scripts import run, train_cmd


def _images(root, names):
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"")  # the index reads names only
    return str(root)


def test_identity_is_the_ordered_list_not_the_folder(tmp_path):
    first = index_folder(_images(tmp_path / "a", ["x/1.jpg", "x/2.jpg", "y/3.jpg"])).identity()
    moved = index_folder(_images(tmp_path / "b", ["x/1.jpg", "x/2.jpg", "y/3.jpg"])).identity()
    renamed = index_folder(_images(tmp_path / "c", ["x/1.jpg", "x/2.jpg", "y/4.jpg"])).identity()
    added = index_folder(_images(tmp_path / "d", ["x/1.jpg", "x/2.jpg", "y/3.jpg", "y/5.jpg"])).identity()
    assert first == moved and first["count"] == 3 and len(first["sha256"]) == 64
    assert renamed["count"] == 3 and renamed["sha256"] != first["sha256"]
    assert added["count"] == 4
    index = index_folder(str(tmp_path / "a"))
    assert index.subset([1, 0, 2]).identity() != first  # another order


def _checkpoint(out, images) -> None:
    save_checkpoint(str(out), 3, {"w": torch.zeros(2)}, {}, {"config": {"lr": 1.0}, "images": images}, keep=0)


def test_resume_refuses_other_images_unless_forced(tmp_path):
    trained = {"count": 3, "sha256": "a" * 64}
    _checkpoint(tmp_path, trained)
    assert read_meta(str(tmp_path / "checkpoints" / "step-00000003"))["images"] == trained
    args = (str(tmp_path), "auto", {"lr": 1.0}, set())
    assert resume_checkpoint(*args, False, 10, images=trained)[1]["meta"]["step"] == 3
    with pytest.raises(CheckpointError) as e:
        resume_checkpoint(*args, False, 10, images={"count": 4, "sha256": "b" * 64})
    assert str(e.value).startswith(f"cannot resume {tmp_path}/checkpoints/step-00000003: it was trained on 3 images "
                                   "(list SHA-256 aaaaaaaaaaaa), the data now gives 4 (SHA-256 bbbbbbbbbbbb)")
    assert str(e.value).endswith("Restore the data as it was, or pass --force-resume to continue on these images")
    assert resume_checkpoint(*args, True, 10, images={"count": 4, "sha256": "b" * 64})[0] == \
        str(tmp_path / "checkpoints" / "step-00000003")


def test_a_checkpoint_without_a_record_resumes_and_a_malformed_one_is_refused(tmp_path):
    _checkpoint(tmp_path / "old", None)  # written before checkpoints recorded their images
    assert resume_checkpoint(str(tmp_path / "old"), "auto", {"lr": 1.0}, set(), False, 10,
                             images={"count": 1, "sha256": "c" * 64})[0] == \
        str(tmp_path / "old" / "checkpoints" / "step-00000003")
    _checkpoint(tmp_path / "bad", {"count": -1, "sha256": "x"})
    with pytest.raises(CheckpointError, match='"images" must be null or'):
        read_meta(str(tmp_path / "bad" / "checkpoints" / "step-00000003"))


def test_an_unreadable_saved_index_is_rebuilt_even_on_resume(tmp_path):
    data = _images(tmp_path / "photos", ["a/1.jpg", "a/2.jpg"])
    file = str(tmp_path / "out" / "image-index.safetensors")
    saved_or_built(data, None, file, rebuild_ok=False)
    with open(file, "r+b") as f:
        f.truncate(100)
    index, note = saved_or_built(data, None, file, rebuild_ok=False)
    assert note.startswith("rebuilt (image index") and "cannot be read" in note and len(index) == 2
    _images(tmp_path / "photos", ["a/3.jpg"])
    with pytest.raises(DataError, match="out of date"):  # a readable but stale index is still refused
        saved_or_built(data, None, file, rebuild_ok=False)


@pytest.mark.slow
def test_deleting_the_index_does_not_let_a_resume_train_on_other_images(tiny_data, tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data, data)
    cmd = train_cmd(str(data), out, "--max-steps", "4")
    first = run(cmd)
    assert first.returncode == 0, first.stdout + first.stderr
    some = sorted(os.listdir(data / "train" / "class_0"))[0]
    shutil.copy(data / "train" / "class_0" / some, data / "train" / "class_0" / ("zz-" + some))
    with open(out / "image-index.safetensors", "r+b") as f:
        f.truncate(100)  # corrupt: the fix is not "delete it"
    corrupt = run(cmd[:-2] + ["--max-steps", "6"])
    assert corrupt.returncode == 1 and "delete" not in corrupt.stderr, corrupt.stdout + corrupt.stderr
    assert "cannot resume" in corrupt.stderr and "trained on 32 images" in corrupt.stderr
    assert "gives 33" in corrupt.stderr
    os.remove(out / "image-index.safetensors")
    deleted = run(cmd[:-2] + ["--max-steps", "6"])
    assert deleted.returncode == 1 and "trained on 32 images" in deleted.stderr, deleted.stdout + deleted.stderr
    forced = run(cmd[:-2] + ["--max-steps", "6", "--force-resume"])
    assert forced.returncode == 0 and "(step 4)" in forced.stdout, forced.stdout + forced.stderr
