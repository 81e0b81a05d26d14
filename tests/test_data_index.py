"""The image index (bfcl/index.py, bfcl/folders.py): the three layouts of --data in a worked,
deterministic order; hidden files and non-images left out; the saved index reused, rebuilt or
refused when the data changed; forked workers that touch every sample share the index instead
of copying it (measured against a list of tuples, which they do copy)."""

import os
import shutil
import time

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from torchvision.datasets import ImageFolder

from bfcl.folders import DataError, check_train_val
from bfcl.images import LabelledImages
from bfcl.index import ImageIndex, Packer, find_layout, index_folder, index_image_folder, index_list, saved_or_built
from scripts import BATCH4_TINY, REPO


def image(path, value: int = 100) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path, format="PNG")
    return str(path)


def relative(index: ImageIndex) -> list[str]:
    return [os.path.relpath(index.path(i), index.root) for i in range(len(index))]


def test_imagefolder_order_is_torchvision_s_and_survives_a_save(tmp_path):
    root = tmp_path / "data" / "train"
    for rel in ("b/2.png", "b/10.png", "a/x/1.png", "a/0.JPEG", "a/x y/3.png", "a/x-y/4.png", "c/.5.png"):
        image(root / rel)
    ours, theirs = index_image_folder(str(root)), ImageFolder(str(root))
    assert [(ours.path(i), ours.label(i)) for i in range(len(ours))] == theirs.samples
    assert ours.classes == theirs.classes and ours.layout == "imagefolder"
    ours.save(str(tmp_path / "index"))
    again = ImageIndex.load(str(tmp_path / "index"))
    assert [(again.path(i), again.label(i)) for i in range(len(again))] == theirs.samples
    assert again.classes == ours.classes and again.stale("imagefolder", str(root), None) is None


def test_any_folder_is_searched_recursively_in_path_order_without_hidden_files_or_non_images(tmp_path):
    root = tmp_path / "photos"
    for rel in ("2024/05-02/b.jpg", "2024/05-02/A.JPEG", "2024/05-01/c.Png", "top.jpg", "2023/z.jpeg",
                ".thumbs/t.jpg", "2024/.hidden.jpg", "2024/05-01/.cache/x.png", "2024/notes.txt", "raw.cr2"):
        image(root / rel) if rel.lower().endswith((".jpg", ".jpeg", ".png")) else (root / rel).write_text("x")
    os.mkfifo(root / "2024" / "pipe.jpg")  # would block a reader
    os.symlink(str(root / "2024"), str(root / "again"))  # a folder read at its own place: left out
    with pytest.warns(UserWarning, match=r"left out 1 folder"):
        index = index_folder(str(root))
    # folders sorted as paths ('' < '2023' < '2024/05-01' < '2024/05-02'), files sorted in each
    assert relative(index) == ["top.jpg", "2023/z.jpeg", "2024/05-01/c.Png", "2024/05-02/A.JPEG", "2024/05-02/b.jpg"]
    assert index.labels.tolist() == [-1] * 5 and index.classes == [] and index.layout == "folder"
    assert relative(index_folder(str(root), leave_out=(str(root / "2024"),))) == ["top.jpg", "2023/z.jpeg"]


def test_layouts_are_recognised_and_the_folder_layout_leaves_val_to_the_knn_monitor(tmp_path):
    data = tmp_path / "data"
    image(data / "a" / "0.png")
    image(data / "val" / "cat" / "1.png")
    assert find_layout(str(data)) == ("folder", str(data))
    assert find_layout(str(data), "list.txt") == ("list", str(data))
    index, note = saved_or_built(str(data), None, str(tmp_path / "out" / "index"), rebuild_ok=True)
    assert relative(index) == ["a/0.png"] and note.startswith("built")
    image(data / "train" / "cat" / "2.png")
    assert find_layout(str(data)) == ("imagefolder", str(data / "train"))
    with pytest.raises(DataError, match=r"does not exist; pass a folder of images"):
        find_layout(str(tmp_path / "missing"))


def test_a_folder_without_images_is_a_one_line_error_naming_it(tmp_path):
    root = tmp_path / "empty"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "notes.txt").write_text("x")
    image(root / ".hidden" / "a.png")
    with pytest.raises(DataError) as e:
        index_folder(str(root))
    assert str(root) in str(e.value) and "holds no images" in str(e.value) and "\n" not in str(e.value)


def test_list_file_keeps_its_order_and_a_missing_file_is_a_one_line_error(tmp_path):
    data = tmp_path / "data"
    for rel in ("b/1.png", "a/2.png", "c.png"):
        image(data / rel)
    listing = tmp_path / "train.txt"
    listing.write_text("c.png\nb/1.png\n\na/2.png\r\n")  # order kept, blank line skipped
    index = index_list(str(data), str(listing))
    assert relative(index) == ["c.png", "b/1.png", "a/2.png"] and index.layout == "list"
    listing.write_text("c.png\nb/missing.png\n")
    with pytest.raises(DataError) as e:
        index_list(str(data), str(listing))
    assert "line 2: b/missing.png is not a file in" in str(e.value) and "\n" not in str(e.value)


def test_saved_index_is_reused_and_rebuilt_or_refused_when_the_data_changed(tmp_path):
    data, file = tmp_path / "photos", str(tmp_path / "out" / "image-index.safetensors")
    for rel in ("2024/01/a.png", "2024/02/b.png"):
        image(data / rel)
    first, note = saved_or_built(str(data), None, file, rebuild_ok=False)
    assert note == f"built, saved to {file}"
    again, note = saved_or_built(str(data), None, file, rebuild_ok=False)
    assert note == f"read from {file}" and relative(again) == relative(first) == ["2024/01/a.png", "2024/02/b.png"]
    alias = os.path.relpath(data)  # the same folder, named another way: paths follow this run's name
    aliased, note = saved_or_built(alias, None, file, rebuild_ok=False)
    assert note.startswith("read from") and aliased.path(0) == os.path.join(alias, "2024", "01", "a.png")

    time.sleep(0.05)  # a later mtime than the index's, on file systems with coarse timestamps
    image(data / "2024" / "02" / "c.png")  # two levels down: only that folder's mtime changes
    with pytest.raises(DataError, match=r"out of date: .*2024/02 changed since it was built.*--force-resume"):
        saved_or_built(str(data), None, file, rebuild_ok=False)
    rebuilt, note = saved_or_built(str(data), None, file, rebuild_ok=True)
    assert note.startswith("rebuilt (") and "2024/02 changed" in note
    assert relative(rebuilt) == ["2024/01/a.png", "2024/02/b.png", "2024/02/c.png"]

    shutil.rmtree(data / "2024" / "01")  # the parent's mtime changes: folders are checked in path order
    assert f"{data}/2024 changed" in saved_or_built(str(data), None, file, rebuild_ok=True)[1]
    other = tmp_path / "other"
    image(other / "d.png")
    assert "root real" in saved_or_built(str(other), None, file, rebuild_ok=True)[1]

    listing = tmp_path / "list.txt"
    listing.write_text("d.png\n")
    assert saved_or_built(str(other), str(listing), file, rebuild_ok=True)[1].startswith("rebuilt (it was built")
    assert saved_or_built(str(other), str(listing), file, rebuild_ok=True)[1].startswith("read from")
    listing.write_text("./d.png\n")
    index, note = saved_or_built(str(other), str(listing), file, rebuild_ok=True)
    assert "list.txt changed" in note and len(index) == 1

    with open(file, "r+b") as f:
        f.truncate(100)
    assert "cannot be read" in saved_or_built(str(other), str(listing), file, rebuild_ok=True)[1]


@pytest.mark.parametrize("layout", ["folder", "imagefolder"])
def test_resume_reads_the_saved_order_where_path_sort_and_name_sort_differ(tmp_path, monkeypatch, layout):
    """Folders a/, a-b/ and a/x/: as folder paths a < a-b < a/x ('-' sorts before '/'), as file names
    'a-b/1.png' < 'a/1.png'. The fresh index, the one a resume reads back (data named by its absolute
    path or a relative one) and one rebuilt with --force-resume all keep torchvision's order."""
    data = tmp_path / "data"
    top = data / "train" / "c" if layout == "imagefolder" else data
    for rel in ("a/1.png", "a/0.png", "a-b/1.png", "a/x/2.png", "a-b/c/3.png"):
        image(top / rel)
    reference = ["a/0.png", "a/1.png", "a-b/1.png", "a-b/c/3.png", "a/x/2.png"]
    if layout == "imagefolder":
        theirs = ImageFolder(str(data / "train")).samples
        assert [os.path.relpath(p, top) for p, _ in theirs] == reference
    assert reference != sorted(reference)  # the data tells the two sorts apart
    file = str(tmp_path / "run" / "image-index.safetensors")
    fresh, note = saved_or_built(str(data), None, file, rebuild_ok=True)
    assert note.startswith("built") and fresh.layout == layout
    prefix = "c/" if layout == "imagefolder" else ""
    assert relative(fresh) == [prefix + f for f in reference]
    monkeypatch.chdir(tmp_path)
    for name in (str(data), "data", "./data/"):
        resumed, note = saved_or_built(name, None, file, rebuild_ok=False)
        assert note.startswith("read from") and relative(resumed) == relative(fresh)
        assert resumed.identity() == fresh.identity()
    assert relative(ImageIndex.load(file)) == relative(fresh)
    os.remove(file)
    rebuilt, _ = saved_or_built("data", None, file, rebuild_ok=True)
    assert relative(rebuilt) == relative(fresh) and rebuilt.identity() == fresh.identity()


def test_labelled_images_subset_and_packed_paths(tmp_path):
    root = tmp_path / "train"
    for rel in ("a/0.png", "a/1.png", "b/ü 2.png"):
        image(root / rel, value=40)
    images = LabelledImages(str(root))
    assert images.path(2) == str(root / "b" / "ü 2.png") and images.path(-1) == images.path(2)
    part = images.subset([2, 0])
    assert [part.path(0), part.path(1)] == [images.path(2), images.path(0)] and part.targets.tolist() == [1, 0]
    assert len(images) == 3 and part[0][1:] == (1, 0)
    with pytest.raises(IndexError):
        images.path(3)


# ---------------------------------------------------------------- memory of forked workers

def private_kib() -> int:
    """This process's pages that no other process shares (Private_Clean + Private_Dirty), KiB."""
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith("Private_"))
    return sum(int(v.split()[0]) for v in fields.values())


class TouchEverySample(IterableDataset):
    """In a worker: read every sample's path and label, and report how much private memory grew."""

    def __init__(self, samples):
        self.samples = samples

    def __iter__(self):
        before, total = private_kib(), 0
        if isinstance(self.samples, ImageIndex):
            for i in range(len(self.samples)):
                total += len(self.samples.path(i)) + self.samples.label(i)
        else:
            for path, label in self.samples:
                total += len(path) + label
        yield private_kib() - before, total


def worker_growth_kib(samples) -> int:
    loader = DataLoader(TouchEverySample(samples), batch_size=None, num_workers=1,
                        multiprocessing_context="fork")
    (grown, total), = list(loader)
    return int(grown)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc/self/smaps_rollup")
def test_a_worker_touching_every_sample_does_not_copy_the_index(tmp_path):
    n = 300_000
    packer = Packer()
    for i in range(n):
        packer.add(f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG")
    labels = [i % 1000 for i in range(n)]
    from array import array
    index = ImageIndex("/data/train", "imagefolder", packer.strings(), array("q", labels), [], [], {},
                       Packer().strings(), torch.zeros(0, dtype=torch.int64))
    index_kib = (index.paths.data.numel() + 8 * index.paths.ends.numel() + 8 * n) // 1024  # ~13 MB
    tuples = [(index.path(i), labels[i]) for i in range(n)]  # the reference: one Python object per file
    index.save(str(tmp_path / "index"))  # as train.py's other processes and resumes get it
    packed, listed = worker_growth_kib(ImageIndex.load(str(tmp_path / "index"))), worker_growth_kib(tuples)
    # the list's pages are copied as the worker updates reference counts (~60 bytes a sample);
    # the packed index's pages are only read
    assert listed > 0.5 * index_kib, (listed, index_kib)
    assert packed < 0.1 * index_kib, (packed, index_kib)


# ---------------------------------------------------------------- train.py on each layout



def train(data, out, *extra):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "train.py", "--data", str(data), "--output-dir", str(out), *BATCH4_TINY,
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """16 unlabelled images nested by date (photos/2024/<month>/<day>/), and photos/val/<class>/."""
    from bfcl.synthetic import make_image_folder
    tmp = tmp_path_factory.mktemp("layouts")
    source = make_image_folder(str(tmp / "source"), classes=2, train_per_class=8, val_per_class=4, size=16)
    photos = tmp / "photos"
    for i, name in enumerate(sorted(f"{c}/{f}" for c in os.listdir(f"{source}/train")
                                    for f in os.listdir(f"{source}/train/{c}"))):
        day = photos / "2024" / f"{1 + i % 3:02d}" / f"{1 + i % 2:02d}"
        day.mkdir(parents=True, exist_ok=True)
        shutil.copy(f"{source}/train/{name}", day / f"IMG_{i:04d}.JPG")
    shutil.copytree(f"{source}/val", photos / "val")
    return photos


@pytest.mark.slow
def test_unlabelled_nested_folder_pretrains_resumes_bit_exactly_and_exports(photos, tmp_path):
    from safetensors.torch import load_file
    straight = train(photos, tmp_path / "straight", "--knn-every", "2", "--knn-samples", "4")
    assert straight.returncode == 0, straight.stderr
    assert f"folder searched recursively {photos}: 16 images; index built" in straight.stdout
    assert f"{photos}/val left out" in straight.stdout and "kNN monitor: two halves of" in straight.stdout
    assert "knn_top1" in open(tmp_path / "straight" / "metrics.jsonl").read()
    first = train(photos, tmp_path / "resumed", "--max-steps", "2")
    assert first.returncode == 0, first.stderr
    resumed = train(photos, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert "index read from" in resumed.stdout and "(step 2)" in resumed.stdout
    a = load_file(tmp_path / "straight" / "backbone.safetensors")
    b = load_file(tmp_path / "resumed" / "backbone.safetensors")
    assert a.keys() == b.keys() and "conv1.weight" in a and all(torch.equal(a[k], b[k]) for k in a)

    time.sleep(0.05)
    image(photos / "2024" / "01" / "01" / "new.png")
    try:
        changed = train(photos, tmp_path / "resumed")
    finally:
        os.remove(photos / "2024" / "01" / "01" / "new.png")
    error = changed.stderr.strip().splitlines()[-1]
    assert changed.returncode == 1 and error.startswith("error: the saved image index")
    assert "2024/01/01 changed" in error and "--force-resume" in error


@pytest.mark.slow
def test_list_file_and_flat_folder_train(photos, tmp_path):
    listing = tmp_path / "train.txt"
    names = sorted(os.path.relpath(os.path.join(d, f), photos) for d, _, fs in os.walk(photos / "2024") for f in fs)
    listing.write_text("\n".join(reversed(names[:8])) + "\n")
    listed = train(photos, tmp_path / "list", "--train-list", str(listing), "--max-steps", "1")
    assert listed.returncode == 0, listed.stderr
    assert f"list file {listing}: 8 images" in listed.stdout
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in names[:8]:
        shutil.copy(photos / name, flat / os.path.basename(name))
    run = train(flat, tmp_path / "flat-run", "--max-steps", "1", "--knn-every", "1")
    assert run.returncode == 0, run.stderr
    assert f"folder searched recursively {flat}: 8 images" in run.stdout and "kNN monitor: off: --knn-every needs" \
        in run.stdout
    listing.write_text("2024/01/01/IMG_0000.JPG\nnot/there.jpg\n")
    missing = train(photos, tmp_path / "list-missing", "--train-list", str(listing))
    error = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 1 and error.startswith("error: --train-list") and "line 2: not/there.jpg" in error


def test_a_monitor_without_labels_adds_no_sync_points(tmp_path):
    """--knn-every syncs the processes only where the monitor has labelled images: unlabelled photos
    without val/ plan no kNN steps; the same photos beside DIR/val/<class>/ plan one every 5 steps."""
    import train
    from bfcl.knn import knn_source
    from bfcl.synthetic import make_image_folder

    labelled = make_image_folder(str(tmp_path / "labelled"), classes=2, train_per_class=4, val_per_class=2, size=16)
    photos = str(tmp_path / "photos")
    shutil.copytree(os.path.join(labelled, "train"), os.path.join(photos, "2026-11"))  # nested by date, no classes
    config, _ = train.with_recipe(train.parse_args(["--data", photos, "--output-dir", str(tmp_path / "run"),
                                                    "--knn-every", "5"]))
    source = knn_source(config.data, config.train_list, config.knn_every, config.knn_data)[0]
    assert source == "off" and train.make_plan(config, 8192, 1, None, source).knn_every == 0
    shutil.copytree(os.path.join(labelled, "val"), os.path.join(photos, "val"))
    source = knn_source(config.data, config.train_list, config.knn_every, config.knn_data)[0]
    assert source == "val-halves" and train.make_plan(config, 8192, 1, None, source).knn_every == 5


@pytest.mark.parametrize("check", [lambda p: find_layout(p), lambda p: check_train_val(p),
                                   lambda p: find_layout(p, "list.txt")])
def test_data_naming_a_file_says_it_is_a_file(tmp_path, check):
    file = tmp_path / "images.tar"
    file.write_bytes(b"not a folder")
    with pytest.raises(DataError) as e:
        check(str(file))
    assert str(e.value).startswith(f"data folder {file} is a file, not a folder; pass a folder ")
    assert "does not exist" not in str(e.value)
