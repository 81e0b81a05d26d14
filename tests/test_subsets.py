"""Label subsets (bfcl/subsets.py, probe.py --labels-per-class / --label-fraction / --train-list):
class-balanced with the documented counts, drawn from file names and the seed only (the same in
a fresh process with other random state, and in every mode), and written as a list that reads
back to the same images and the same SHA-256."""

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import probe
from bfcl.images import DataError, image_folder
from bfcl.subsets import balanced_subset, label_subset, per_class_count, read_train_list
from scripts import PROBE_TINY
from test_probe import colour_folder, error_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_CLASSES = ("n01440764", "n01443537", "n01484850")


def imagenet_like(root, per_class=(10, 7, 2)) -> str:
    """train/<wnid>/<wnid>_<number>.JPEG as in ImageNet, where SimCLR's lists name bare files."""
    for wnid, count in zip(IMAGENET_CLASSES, per_class):
        os.makedirs(os.path.join(root, "train", wnid))
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(os.path.join(root, "train", wnid, f"{wnid}_{1000 + i}.JPEG"))
    return root


def first_by_hash(paths, members, seed, count):
    """The reference draw: the `count` members whose sha256('seed/path') is smallest."""
    return sorted(sorted(members, key=lambda i: hashlib.sha256(f"{seed}/{paths[i]}".encode()).hexdigest())[:count])


def test_balanced_subset_counts_and_draw():
    targets = [0] * 10 + [1] * 7 + [2] * 2
    paths = [f"c{t}/{i}.jpg" for i, t in enumerate(targets)]
    classes = [range(0, 10), range(10, 17), range(17, 19)]

    picked = balanced_subset(targets, paths, seed=0, labels_per_class=3)
    assert [sum(targets[i] == c for i in picked) for c in range(3)] == [3, 3, 2]  # the small class gives all it has
    assert picked == sorted(i for c, m in enumerate(classes) for i in first_by_hash(paths, m, 0, min(3, len(m))))

    # 0.25 of 10, 7, 2 images: 2.5 -> 3 (half up), 1.75 -> 2, 0.5 -> 1 (half up, and at least one)
    assert [per_class_count(0.25, n) for n in (10, 7, 2)] == [3, 2, 1]
    assert per_class_count(0.01, 7) == 1 and per_class_count(0.01, 5000) == 50 and per_class_count(1.0, 7) == 7
    quarter = balanced_subset(targets, paths, seed=0, fraction=0.25)
    assert [sum(targets[i] == c for i in quarter) for c in range(3)] == [3, 2, 1]

    torch.manual_seed(123)
    random.seed(5)  # no process-local random state is used
    assert balanced_subset(targets, paths, seed=0, labels_per_class=3) == picked
    assert balanced_subset(targets, paths, seed=1, labels_per_class=3) != picked
    assert set(balanced_subset(targets, paths, seed=0, labels_per_class=2)) < set(picked)  # nested in the seed
    with pytest.raises(ValueError, match="exactly one"):
        balanced_subset(targets, paths, seed=0)


def test_subset_is_the_same_in_a_fresh_process_with_other_random_state(tmp_path):
    """What a second process computes (another interpreter, other RNG seeds): the same bytes."""
    root = imagenet_like(str(tmp_path))
    train = os.path.join(root, "train")
    here = label_subset(image_folder(train), train, seed=4, fraction=0.5)
    code = ("import random, sys, torch; torch.manual_seed(99); random.seed(7); torch.rand(5)\n"
            "from bfcl.images import image_folder; from bfcl.subsets import label_subset\n"
            f"s = label_subset(image_folder({train!r}), {train!r}, seed=4, fraction=0.5)\n"
            "sys.stdout.write(s.record['sha256'] + ' ' + ','.join(map(str, s.indices)))")
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr
    assert other.stdout == here.record["sha256"] + " " + ",".join(map(str, here.indices))
    assert here.record["per_class"] == {"n01440764": 5, "n01443537": 4, "n01484850": 1}  # 3.5 rounds up to 4
    assert here.record["size"] == 10 and here.record["rule"] == "--label-fraction 0.5"


@pytest.mark.parametrize("rank", ["1", "3"])
def test_subset_does_not_depend_on_the_process_rank(tmp_path, monkeypatch, rank):
    """Every process of a torchrun job draws the subset of a single process: with RANK, LOCAL_RANK and
    WORLD_SIZE set as torchrun sets them on another rank, the draw is still the reference one."""
    root = imagenet_like(str(tmp_path))
    train = os.path.join(root, "train")
    images = image_folder(train)
    paths = [os.path.relpath(images.path(i), train) for i in range(len(images))]
    members = [[i for i, t in enumerate(images.targets) if t == c] for c in range(3)]
    reference = sorted(i for m in members for i in first_by_hash(paths, m, 4, min(3, len(m))))
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", "4"), ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    drawn = label_subset(images, train, seed=4, labels_per_class=3)
    assert drawn.indices == reference
    assert balanced_subset(images.targets, paths, seed=4, fraction=0.5) == \
        sorted(i for m in members for i in first_by_hash(paths, m, 4, per_class_count(0.5, len(m))))


def test_train_list_reads_simclr_names_and_paths_and_round_trips(tmp_path):
    root = imagenet_like(str(tmp_path))
    train = os.path.join(root, "train")
    images = image_folder(train)
    paths = [os.path.relpath(images.path(i), train) for i in range(len(images))]
    listing = tmp_path / "1percent.txt"
    # SimCLR's layout (bare names), a class/file path, './', a blank line, and not in train/'s order
    listing.write_text("n01443537_1003.JPEG\n\nn01440764_1000.JPEG\n./n01484850/n01484850_1001.JPEG\n")
    picked = read_train_list(str(listing), paths, train)
    assert [paths[i] for i in picked] == ["n01440764/n01440764_1000.JPEG", "n01443537/n01443537_1003.JPEG",
                                          "n01484850/n01484850_1001.JPEG"]
    written = label_subset(images, train, seed=0, train_list=str(listing))
    assert written.indices == picked and written.text == "".join(paths[i] + "\n" for i in picked).encode()
    (tmp_path / "train_list.txt").write_bytes(written.text)
    again = label_subset(images, train, seed=0, train_list=str(tmp_path / "train_list.txt"))
    assert again.text == written.text and again.record["sha256"] == hashlib.sha256(written.text).hexdigest()
    drawn = label_subset(images, train, seed=2, labels_per_class=2)  # a drawn subset reads back the same too
    (tmp_path / "drawn.txt").write_bytes(drawn.text)
    assert label_subset(images, train, 0, train_list=str(tmp_path / "drawn.txt")).record["sha256"] == \
        drawn.record["sha256"]

    listing.write_text("n01440764_1000.JPEG\nn01440764_1999.JPEG\n")
    with pytest.raises(DataError, match=r"line 2: n01440764_1999.JPEG matches no image") as e:
        read_train_list(str(listing), paths, train)
    assert "\n" not in str(e.value)
    listing.write_text("n01440764_1000.JPEG\nn01440764/n01440764_1000.JPEG\n")
    with pytest.raises(DataError, match="line 2: .* is already on line 1"):
        read_train_list(str(listing), paths, train)


def test_every_mode_uses_the_same_subset_and_the_list_round_trips(tmp_path, capsys):
    """knn + fast-linear, linear and finetune runs with --label-fraction, another --seed (what
    differs between a pretrained and a random-init run), then --train-list of the written list."""
    data = colour_folder(str(tmp_path / "data"), train_per_class=8, val_per_class=2, size=8)
    subset = ["--label-fraction", "0.5", "--subset-seed", "3"]
    runs = {"quick": ["--mode", "quick", "--fast-epochs", "2", *subset],
            "linear": ["--mode", "linear", "--epochs", "1", "-b", "8", "--seed", "5", *subset],
            "finetune": ["--mode", "finetune", "--epochs", "1", "-b", "8", "--log-every", "1", *subset]}
    records = {}
    for name, argv in runs.items():
        out = str(tmp_path / name)
        assert probe.main([*PROBE_TINY, "--data", data, "--output-dir", out, *argv]) == 0
        records[name] = json.load(open(os.path.join(out, "results.json")))
        text = open(os.path.join(out, "train_list.txt"), "rb").read()
        assert records[name]["subset"]["sha256"] == hashlib.sha256(text).hexdigest()
        assert records[name]["subset"]["per_class"] == {"c0": 4, "c1": 4, "c2": 4, "c3": 4}
        assert records[name]["train_samples"] == 16
    assert len({r["subset"]["sha256"] for r in records.values()}) == 1
    assert records["finetune"]["results"]["finetune"]["steps"] == 2  # 16 images at batch 8: the subset trained

    out = str(tmp_path / "from-list")
    assert probe.main([*PROBE_TINY, "--data", data, "--output-dir", out, "--mode", "knn",
                       "--train-list", str(tmp_path / "quick" / "train_list.txt")]) == 0
    listed = json.load(open(os.path.join(out, "results.json")))["subset"]
    assert listed["sha256"] == records["quick"]["subset"]["sha256"] and listed["seed"] is None

    (tmp_path / "bad.txt").write_text("c0/0.png\nc1/missing.png\n")
    message = error_of([*PROBE_TINY, "--data", data, "--output-dir", str(tmp_path / "bad"), "--mode", "knn",
                        "--train-list", str(tmp_path / "bad.txt")])
    assert "line 2: c1/missing.png matches no image" in message
    with pytest.raises(SystemExit) as e:  # one way to choose the labels: argparse refuses two
        probe.parse_args([*PROBE_TINY, "--data", data, "--label-fraction", "0.5", "--labels-per-class", "2"])
    assert e.value.code == 2 and "--labels-per-class: not allowed with argument --label-fraction" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_draw_the_subset_of_one(tmp_path):
    """torchrun, 2 CPU processes: the same list, the same train features (every process embedded
    images of the one subset) and the same kNN result as one process."""
    data = colour_folder(str(tmp_path / "data"), train_per_class=9, val_per_class=2, size=8)
    common = [*PROBE_TINY, "--data", data, "--mode", "knn", "--labels-per-class", "5", "--save-features"]
    two = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                          "probe.py", *common, "-b", "4", "--output-dir", str(tmp_path / "two")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert probe.main([*common, "-b", "2", "--output-dir", str(tmp_path / "one")]) == 0
    one_r, two_r = (json.load(open(tmp_path / run / "results.json")) for run in ("one", "two"))
    assert two_r["processes"] == 2 and one_r["subset"] == two_r["subset"] and one_r["train_samples"] == 20
    assert one_r["results"]["knn"] == two_r["results"]["knn"]
    assert (tmp_path / "one" / "train_list.txt").read_bytes() == (tmp_path / "two" / "train_list.txt").read_bytes()
    one_f, two_f = (load_file(tmp_path / run / "features.safetensors") for run in ("one", "two"))
    assert torch.equal(one_f["train_labels"], two_f["train_labels"])
    torch.testing.assert_close(two_f["train_features"], one_f["train_features"], rtol=1e-4, atol=1e-5)
