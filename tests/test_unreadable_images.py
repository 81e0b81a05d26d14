"""Many unreadable images in a row end in one line naming the files, whether a DataLoader worker or
the main process read them (docs/reliability.md)."""

import os

import pytest

import probe
from bfcl.folders import DataError, one_line
from bfcl.images import image_folder
from bfcl.synthetic import make_image_folder

TINY = ["--random-init", "-a", "resnet18", "--stem", "small", "--mode", "knn"]


def _break(root, names):
    for name in names:
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"not an image")


@pytest.fixture(scope="module")
def eleven_broken(tmp_path_factory):
    """class_0 of train/ holds 12 images, all but the first unreadable (the first sets the image size)."""
    root = make_image_folder(str(tmp_path_factory.mktemp("data")), classes=2, train_per_class=12, val_per_class=2,
                             size=16)
    _break(os.path.join(root, "train", "class_0"), [f"{i:05d}.jpg" for i in range(1, 12)])
    return root


def test_the_reader_names_the_first_and_last_file(eleven_broken):
    images = image_folder(os.path.join(eleven_broken, "train"))
    assert images.read(0)[2] == 0 and images.read(6)[2] == 6  # fewer than 11 in a row: replaced
    with pytest.raises(DataError) as e:
        images.read(1)
    first, last = (os.path.join(eleven_broken, "train", "class_0", f"{i:05d}.jpg") for i in (1, 11))
    assert str(e.value).startswith(f"11 unreadable images in a row, {first} to {last} (the last: ")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_probe_ends_in_one_line(eleven_broken, tmp_path, workers):
    with pytest.raises(SystemExit) as e:
        probe.main([*TINY, "--data", eleven_broken, "--output-dir", str(tmp_path), "--workers", workers])
    message = str(e.value.code)
    assert message.startswith("error: 11 unreadable images in a row, ") and "\n" not in message, message
    assert "class_0/00001.jpg to " in message and "replace or remove them" in message


def test_one_line_undoes_a_loader_worker_s_traceback():
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\nbfcl.folders.DataError: 11 unreadable images in a row")
    assert one_line(wrapped) == "11 unreadable images in a row"
    assert one_line(DataError("plain")) == "plain"

