"""Unreadable images in the scripts (docs/reliability.md): many in a row end in one line naming the
files, whether a DataLoader worker or the main process read them; a few are replaced and counted in
pretraining (stopping above --max-bad-image-share), the kNN monitor and the probe. The reader itself:
test_images.py."""

import json
import os

import pytest
from PIL import Image

import probe
from bfcl.folders import DataError, one_line
from bfcl.images import image_folder
from bfcl.synthetic import make_image_folder
from scripts import IMAGENET_STEM_ONE_EPOCH, IMAGENET_STEM_TINY, run, run_script, train_cmd

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
                        "last):\n  File \"x.py\", line 1, in f\nbfcl.errors.DataError: 11 unreadable images in a row")
    assert one_line(wrapped) == "11 unreadable images in a row"
    assert one_line(DataError("plain")) == "plain"


def run_train(data, out, *extra):
    return run(train_cmd(data, out, *extra, settings=IMAGENET_STEM_TINY))


@pytest.mark.slow
def test_training_counts_bad_images_and_stops_above_the_threshold(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), classes=2, train_per_class=8, val_per_class=1, size=16)
    for i in range(4):
        with open(os.path.join(root, "train", "class_0", f"{i:05d}.jpg"), "wb") as f:
            f.write(b"not a jpeg")
    ok = run_train(root, tmp_path / "ok", "--epochs", "1", "--warmup-epochs", "0", "--max-bad-image-share", "0.9")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    records = [json.loads(line) for line in open(tmp_path / "ok" / "metrics.jsonl")]
    assert records[-1]["bad_images"] > 0
    assert "unreadable images" in ok.stdout

    strict = run_train(root, tmp_path / "strict", "--epochs", "1", "--warmup-epochs", "0")
    assert strict.returncode == 1
    assert "image reads failed" in strict.stderr and "--max-bad-image-share" in strict.stderr


@pytest.mark.slow
def test_oversized_image_is_replaced_in_pretraining_and_in_the_probe(tmp_path):
    """An image over --max-image-pixels (the decompression-bomb guard) is unreadable: replaced
    and counted in pretraining, the online kNN monitor and the probe, never a traceback."""
    root = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=8, val_per_class=4, size=16)
    for split in ("train", "val"):
        Image.new("RGB", (64, 64), (200, 10, 10)).save(os.path.join(root, split, "class_0", "huge.png"))
    out = tmp_path / "run"
    result = run_script("train.py", "--data", root, "--output-dir", str(out), *IMAGENET_STEM_ONE_EPOCH,
                        "--max-image-pixels", "1000", "--max-bad-image-share", "0.5", "--knn-every", "2",
                        "--knn-samples", "16")
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[-1]["bad_images"] >= 1 and "knn_top1" in records[-1]

    probed = run_script("probe.py", "--pretrained", str(out), "--data", root, "--mode", "knn", "--workers", "0",
                        "--output-dir", str(tmp_path / "probe"), "--max-image-pixels", "1000",
                        "--max-bad-image-share", "0.2")
    assert probed.returncode == 0, probed.stdout + probed.stderr
    strict = run_script("probe.py", "--pretrained", str(out), "--data", root, "--mode", "knn", "--workers", "0",
                        "--output-dir", str(tmp_path / "probe2"), "--max-image-pixels", "1000")
    assert strict.returncode == 1 and "image reads failed" in strict.stderr and "Traceback" not in strict.stderr
