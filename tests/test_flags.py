"""Every flag and setting is checked before any work: train.py's and probe.py's value ranges, settings
that contradict each other or the data, an unknown architecture, an output folder that is not writable
or lies inside --data, and data folders that hold no usable images; each a one-line error."""

import os

import pytest

import probe
import train
from bfcl.errors import ConfigError
from bfcl.synthetic import make_image_folder
from scripts import IMAGENET_STEM, IMAGENET_STEM_ONE_EPOCH, IMAGENET_STEM_TINY, error_of


@pytest.fixture(scope="module")
def data_12(tmp_path_factory):
    """4 classes x 12 train and 4 val images, 16 px (the settings checks' folder)."""
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=12,
                             val_per_class=4, size=16)


@pytest.mark.parametrize("flag, value, expected", [
    ("--save-every", "0", "--save-every 0 is outside its range [1, inf)"),
    ("--log-every", "0", "--log-every 0 is outside its range [1, inf)"),
    ("-b", "0", "--batch-size 0 is outside its range [1, inf)"),
    ("-b", "-8", "--batch-size -8 is outside its range [1, inf)"),
    ("--epochs", "nan", "--epochs nan is outside its range (0, 1e+06]"),
    ("--image-size", "0", "--image-size 0 is outside its range [8, 4096]"),
    ("--crop-min", "1.5", "--crop-min 1.5 is outside its range (0, 1]"),
    ("--workers", "-1", "--workers -1 is outside its range [0, 256]"),
    ("--lr", "-1", "--lr -1.0 is outside its range (0, inf)"),
    ("--moco-t", "0", "--moco-t 0.0 is outside its range (0, inf)"),
    ("--moco-m", "1.5", "--moco-m 1.5 is outside its range [0, 1]"),
    ("--keep", "-1", "--keep -1 is outside its range [0, inf)"),
    ("--max-bad-image-share", "2", "--max-bad-image-share 2.0 is outside its range [0, 1]"),
    ("--patch-size", "0", "--patch-size 0 is outside its range [1, 4096]"),
])
def test_train_flag_domains(data, tmp_path, flag, value, expected):
    out = tmp_path / "run"
    message = error_of(train.main, ["--data", data, "--output-dir", str(out), *IMAGENET_STEM_ONE_EPOCH, flag, value])
    assert expected in message
    assert not os.path.exists(out)  # refused before anything was written


@pytest.mark.parametrize("flag, value, expected", [
    ("--epochs", "0", "--epochs 0.0 is outside its range (0, 1e+06]"),
    ("--knn-t", "0", "--knn-t 0.0 is outside its range (0, inf)"),
    ("-b", "0", "--batch-size 0 is outside its range [1, inf)"),
    ("--knn-k", "0", "--knn-k 0 is outside its range [1, inf)"),
    ("--lr", "-1", "--lr -1.0 is outside its range (0, inf)"),
])
def test_probe_flag_domains(data, export, tmp_path, flag, value, expected):
    out = tmp_path / "out"
    message = error_of(probe.main, ["--pretrained", export, "--data", data, "--output-dir", str(out),
                                    "--mode", "knn", flag, value])
    assert expected in message
    assert not os.path.exists(out)


def test_output_dir_inside_the_data_is_refused_and_leaves_nothing(data):
    inside = os.path.join(data, "train", "runs")
    message = error_of(train.main, ["--data", data, "--output-dir", inside, *IMAGENET_STEM_ONE_EPOCH])
    assert "is inside --data" in message
    assert not os.path.exists(inside)


def test_knn_monitor_needs_the_same_classes_in_val(data, tmp_path):
    root = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=8, val_per_class=2, size=16)
    os.rename(os.path.join(root, "val", "class_3"), os.path.join(root, "val", "other"))
    message = error_of(train.main, ["--data", root, "--output-dir", str(tmp_path / "run"), *IMAGENET_STEM_ONE_EPOCH,
                                    "--knn-every", "2"])
    assert "needs the same class folders in train/ and val/" in message


@pytest.mark.parametrize("extra, expected", [
    (["--warmup-epochs", "3", "--epochs", "3"], "--warmup-epochs 3 must be shorter than --epochs 3"),
    (["-b", "1", "--add_bf", "1"], "BatchFormer needs at least 2 samples per process"),
    (["-b", "10000"], "do not fill one global batch"),
])
def test_settings_refused_before_any_work(data_12, tmp_path, extra, expected):
    argv = ["--data", data_12, "--output-dir", str(tmp_path), *IMAGENET_STEM, *extra]
    assert expected in error_of(train.main, argv)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_batch_not_divisible_by_processes(tmp_path):
    args = train.parse_args(["--data", "x", "-b", "10", "--output-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        train.validate(args, num_processes=3, bf_loss=None, knn=("off", None))


def test_unknown_arch_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "x", "-a", "resnet5"])
    assert "invalid choice: 'resnet5'" in capsys.readouterr().err


def test_unwritable_output_dir(data_12, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "is not writable" in error_of(train.main, ["--data", data_12, "--output-dir", str(blocker / "run"),
                                                      *IMAGENET_STEM_TINY])


@pytest.mark.parametrize("layout, expected", [
    ({}, "holds no images"),  # no train/: any folder of images, searched recursively
    ({"train/readme.txt": b""}, "has no class subfolders"),
    ({"train/cat/a.jpg": None, "train/dog/notes.txt": b""}, "class folders without images (dog)"),
])
def test_bad_data_folders(tmp_path, layout, expected):
    root = tmp_path / "data"
    root.mkdir()
    for rel, content in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            make_image_folder(str(tmp_path / "one"), classes=1, train_per_class=1, val_per_class=0, size=8)
            os.replace(tmp_path / "one" / "train" / "class_0" / "00000.jpg", path)
        else:
            path.write_bytes(content)
    assert expected in error_of(train.main, ["--data", str(root), "--output-dir", str(tmp_path / "out"),
                                             *IMAGENET_STEM_TINY])
