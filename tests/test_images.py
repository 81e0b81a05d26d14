"""Images and class folders are input (bfcl/images.py, bfcl/folders.py): decompression bombs refused
from their header, broken files and FIFOs unreadable, unreadable images replaced and counted, the
sample order torchvision's, symlink loops and aliased class folders found. Each test builds its own
small files; none runs a script. The scripts' side: test_unreadable_images.py."""

import copy
import os
import pickle
import struct
import warnings
import zlib

import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from bfcl.folders import DataWarning, check_image_folder
from bfcl.images import DEFAULT_MAX_PIXELS, DataError, LabelledImages, UnreadableImage, image_folder, read_image
from bfcl.synthetic import make_image_folder
from bfcl.views import PretrainDataset, pretrain_views


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb_png(path: str, side: int) -> None:
    """A valid all-black 1-bit PNG of side x side pixels: 50 KB on disk for 20000 x 20000, which
    decodes to 400 MB ('1') and 1.2 GB as RGB."""
    z, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row * 500) for _ in range(side // 500)) + z.compress(row * (side % 500)) + z.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def save_image(path: str, size: int = 8, value: int = 100) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)
    return path


def folder_of(root, names: dict) -> str:
    """root/<class>/<file> images from {class: [file names]}; returns root."""
    for c, files in names.items():
        for i, name in enumerate(files):
            save_image(os.path.join(root, c, name), value=10 * i)
    return str(root)


BROKEN = {
    "zero bytes": lambda path: open(path, "wb").close(),
    "text named .jpg": lambda path: open(path, "w").write("hello, I am not a JPEG\n"),
    "truncated JPEG": lambda path: (save_image(path, size=64), os.truncate(path, 200)),
    "header only PNG": lambda path: open(path, "wb").write(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))),
    "bad PNG size 0": lambda path: open(path, "wb").write(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))),
}


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = str(tmp_path / "bomb.png")
    write_bomb_png(bomb, 20000)
    assert os.path.getsize(bomb) < 1 << 20
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither PIL's DecompressionBombWarning nor anything else
        with pytest.raises(UnreadableImage) as e:
            read_image(bomb)
    assert str(e.value) == (f"cannot read {bomb}: 20000x20000 pixels, over the {DEFAULT_MAX_PIXELS}-pixel cap; "
                            "raise --max-image-pixels to allow it")
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global setting is left as it was
    restored = pickle.loads(pickle.dumps(e.value))  # DataLoader workers send exceptions pickled
    assert (restored.path, restored.reason) == (e.value.path, e.value.reason) and isinstance(restored, DataError)


def test_pixel_cap_can_be_raised(tmp_path):
    path = save_image(str(tmp_path / "a.png"), size=20)
    with pytest.raises(UnreadableImage, match="20x20 pixels, over the 100-pixel cap"):
        read_image(path, max_pixels=100)
    assert read_image(path, max_pixels=400).size == (20, 20)
    assert read_image(path, max_pixels=None).mode == "RGB"


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_files_are_unreadable_images(tmp_path, kind):
    path = str(tmp_path / ("x.png" if "PNG" in kind else "x.jpg"))
    BROKEN[kind](path)
    with pytest.raises(UnreadableImage) as e:
        read_image(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"cannot read {path}: ")


def test_fifo_named_jpg_is_not_opened(tmp_path):
    fifo = str(tmp_path / "c" / "pipe.jpg")
    save_image(str(tmp_path / "c" / "a.jpg"))
    os.mkfifo(fifo)
    with pytest.raises(UnreadableImage, match="not a regular file"):
        read_image(fifo)  # open() would block forever
    ds = image_folder(str(tmp_path))
    assert [os.path.basename(ds.path(i)) for i in range(len(ds))] == ["a.jpg"]


def broken_folder(tmp_path) -> tuple[str, list[str]]:
    """class a: 0 good, 1 bomb, 2 zero bytes, 3 good; class b: 0 text as .jpg, 1 truncated, 2 good."""
    root = folder_of(tmp_path / "data", {"a": ["0.png", "1.png", "2.jpg", "3.png"], "b": ["0.jpg", "1.jpg", "2.png"]})
    write_bomb_png(os.path.join(root, "a", "1.png"), 20000)
    BROKEN["zero bytes"](os.path.join(root, "a", "2.jpg"))
    BROKEN["text named .jpg"](os.path.join(root, "b", "0.jpg"))
    BROKEN["truncated JPEG"](os.path.join(root, "b", "1.jpg"))
    return root


def test_labelled_images_replace_and_count_unreadable_ones(tmp_path):
    root = broken_folder(tmp_path)
    ds = LabelledImages(root, transform=lambda img: torch.tensor(img.getpixel((0, 0))))
    assert len(ds) == 7 and ds.classes == ["a", "b"] and ds.targets.tolist() == [0, 0, 0, 0, 1, 1, 1]
    # index: (first readable at or after it, its label, unreadable files passed over)
    expected = {0: (0, 0, 0), 1: (3, 0, 2), 2: (3, 0, 1), 3: (3, 0, 0), 4: (6, 1, 2), 5: (6, 1, 1), 6: (6, 1, 0)}
    for index, (source, label, failed) in expected.items():
        x, y, n = ds[index]
        assert (y, n) == (label, failed), index
        assert torch.equal(x, ds[source][0])
    ds.max_retries = 1
    with pytest.raises(DataError, match="2 unreadable images in a row"):
        ds[1]


def test_pretrain_dataset_replaces_the_bomb_and_counts(tmp_path):
    root = broken_folder(tmp_path)
    ds = PretrainDataset(root, pretrain_views(8, blur=False))
    v1, v2, label, failed = ds[(1, 7)]
    assert failed == 2 and label == 0 and v1.shape == (3, 8, 8)
    with pytest.raises(DataError, match="11 unreadable images in a row, .* over the 10-pixel cap"):
        PretrainDataset(root, pretrain_views(8, blur=False), max_pixels=10)[(0, 7)]  # every 8x8 image is over


def test_image_folder_copy_keeps_the_file_list_and_takes_a_new_transform(tmp_path):
    root = folder_of(tmp_path, {"a": ["0.png"], "b": ["0.png", "1.png"]})
    train = image_folder(root, transform=lambda img: "eval")
    aug = copy.copy(train)
    aug.transform = lambda img: "aug"
    assert train[0] == ("eval", 0, 0) and aug[2] == ("aug", 1, 0) and aug.index is train.index
    assert check_image_folder(root) == ["a", "b"]


def test_sample_order_equals_torchvision_imagefolder(tmp_path):
    names = {"B": ["z.PNG", "a.jpg", "M.jpeg"], "a": ["2.png", "10.png", "1.png"],
             "a b": ["x.jpg"], "a-b": ["y.jpg"], "c.d": ["0.bmp"]}
    root = folder_of(tmp_path / "data", names)
    for sub in ("sub", "sub-2", "sub/deeper", "Sub", "sub 3"):  # nested folders sort as paths do
        save_image(os.path.join(root, "a", sub, "p.png"))
        save_image(os.path.join(root, "a", sub, "o.png"))
    open(os.path.join(root, "a", "notes.txt"), "w").close()  # not an image extension
    os.makedirs(os.path.join(root, "a", "folder.jpg"))  # a folder named like an image
    save_image(os.path.join(root, "a", "folder.jpg", "q.png"))
    ours, theirs = image_folder(root), ImageFolder(root)
    assert ours.classes == theirs.classes and ours.class_to_idx == theirs.class_to_idx
    assert [(ours.path(i), int(ours.targets[i])) for i in range(len(ours))] == theirs.samples
    assert ours.targets.tolist() == theirs.targets


def test_symlink_loops_do_not_multiply_images_and_are_reported(tmp_path):
    root = folder_of(tmp_path / "data", {"cat": ["0.png", "1.png"], "dog": ["0.png"]})
    outside = folder_of(tmp_path / "elsewhere", {"more": ["0.png"]})
    os.symlink("..", os.path.join(root, "cat", "loop"))  # the data folder
    os.symlink(".", os.path.join(root, "cat", "self"))  # its own folder
    os.symlink(str(tmp_path), os.path.join(root, "dog", "up"))  # above the data folder
    os.symlink(os.path.join(root, "cat"), os.path.join(root, "dog", "cats"))  # another class: two labels
    os.symlink(os.path.join(outside, "more"), os.path.join(root, "dog", "more"))  # a linked-in data set: kept
    os.symlink(os.path.join(outside, "more"), os.path.join(root, "dog", "more-again"))  # the same, again
    os.symlink(os.path.join(outside, "more", "0.png"), os.path.join(root, "cat", "linked.png"))  # a file link: kept
    with pytest.warns(DataWarning, match=r"left out 5 folder\(s\)") as record:
        ds = image_folder(root)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert [(os.path.relpath(ds.path(i), root), int(ds.targets[i])) for i in range(len(ds))] == [
        ("cat/0.png", 0), ("cat/1.png", 0), ("cat/linked.png", 0), ("dog/0.png", 1), ("dog/more/0.png", 1)]
    assert len(ds.skipped) == 5 and all(" -> " in s for s in ds.skipped)
    assert check_image_folder(root) == ["cat", "dog"]


def test_class_folders_that_are_one_folder_are_refused(tmp_path):
    root = folder_of(tmp_path / "data", {"cat": ["0.png"]})
    os.symlink(os.path.join(root, "cat"), os.path.join(root, "kitten"))
    with pytest.raises(DataError, match="cat and kitten .* are the same folder"):
        image_folder(root)
    os.unlink(os.path.join(root, "kitten"))
    os.symlink(str(tmp_path), os.path.join(root, "all"))
    with pytest.raises(DataError, match="holds the data folder"):
        check_image_folder(root)


def test_a_class_whose_images_are_all_unusable_files_is_refused(tmp_path):
    root = folder_of(tmp_path / "data", {"cat": ["0.png"]})
    os.makedirs(os.path.join(root, "dog"))
    os.symlink(os.path.join(root, "cat"), os.path.join(root, "dog", "cats"))  # only another class's images
    os.symlink("/nonexistent/x.jpg", os.path.join(root, "dog", "broken.jpg"))
    with pytest.raises(DataError, match=r"class folders without images \(dog\) \(folders left out, e.g. .*dog/cats"):
        check_image_folder(root)
    with pytest.raises(DataError, match=r"without images \(dog\) \(folders left out"):
        image_folder(root)


def test_corrupt_jpeg_is_replaced_and_counted(tmp_path):
    root = make_image_folder(str(tmp_path), classes=2, train_per_class=3, val_per_class=1, size=16)
    broken = os.path.join(root, "train", "class_0", "00001.jpg")
    with open(broken, "r+b") as f:
        f.truncate(60)  # a truncated JPEG: opens, fails to decode
    dataset = PretrainDataset(os.path.join(root, "train"), pretrain_views(16, blur=False))
    assert dataset.folder.path(1) == broken
    v1, v2, label, failed = dataset[(1, 123)]
    assert failed == 1 and v1.shape == (3, 16, 16) and label == 0  # replaced by 00002.jpg, same class
    reference = dataset[(2, 123)]
    assert torch.equal(v1, reference[0]) and torch.equal(v2, reference[1]) and reference[3] == 0
