"""What a hostile tester broke, as tests: images, folders, checkpoint metadata and the run lock
are all input. Each test builds its own small files; none runs a script."""

import copy
import json
import math
import os
import pickle
import socket
import struct
import subprocess
import warnings
import zlib

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.datasets import ImageFolder

from bfcl.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, check_weights, latest_checkpoint, list_checkpoints,
                             load_checkpoint, load_model_state, load_optimizer_state, optimizer_state_tensors,
                             read_meta, save_checkpoint)
from bfcl.folders import DataWarning, check_image_folder
from bfcl.images import DEFAULT_MAX_PIXELS, DataError, LabelledImages, UnreadableImage, image_folder, read_image
from bfcl.views import PretrainDataset, pretrain_views
from bfcl.runlock import RunLock, RunLockError, _pid_namespace, _process_start

# ---------------------------------------------------------------- images


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


# ---------------------------------------------------------------- checkpoints


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def save_good(root, step: int) -> str:
    model = small_model(step)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 4)).sum().backward()
    optimizer.step()
    names = [n for n, _ in model.named_parameters()]
    meta = {"config": {"arch": "tiny"}, "epoch": step / 10, "steps_per_epoch": 10, "scaler": None}
    return save_checkpoint(str(root), step, model.state_dict(), optimizer_state_tensors(optimizer, names), meta, keep=0)


def edit_meta(path: str, change) -> None:
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    change(meta)
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def setter(key, value):
    return lambda meta: meta.__setitem__(key, value)


SHA = "0" * 64
BAD_META = {
    "no files": (lambda m: m.pop("files"), '"files" must be'),
    "files is a list": (setter("files", ["model.safetensors", "optimizer.safetensors"]), '"files" must be'),
    "files without the optimizer": (lambda m: m["files"].pop("optimizer.safetensors"), '"files" must be'),
    "files with another file": (lambda m: m["files"].__setitem__("../../etc/passwd", {"bytes": 1, "sha256": SHA}),
                                '"files" must be'),
    "no checksum": (lambda m: m["files"]["model.safetensors"].pop("sha256"), "files.model.safetensors.sha256"),
    "bad checksum string": (lambda m: m["files"]["model.safetensors"].__setitem__("sha256", "xyz"),
                            "files.model.safetensors.sha256"),
    "bytes a string": (lambda m: m["files"]["optimizer.safetensors"].__setitem__("bytes", "12"),
                       "files.optimizer.safetensors.bytes"),
    "negative bytes": (lambda m: m["files"]["optimizer.safetensors"].__setitem__("bytes", -1),
                       "files.optimizer.safetensors.bytes"),
    "negative step": (setter("step", -1), '"step" must be an integer >= 0, found -1'),
    "step a string": (setter("step", "12"), "\"step\" must be an integer >= 0, found '12'"),
    "step a bool": (setter("step", True), '"step" must be'),
    "step a float": (setter("step", 12.0), '"step" must be'),
    "no format": (lambda m: m.pop("format"), '"format" must be "bfcl-checkpoint-1", found None'),
    "wrong format": (setter("format", "bfcl-checkpoint-2"), '"format" must be'),
    "config a list": (setter("config", []), '"config" must be an object'),
    "epoch NaN": (setter("epoch", math.nan), '"epoch" must be a finite number'),
    "epoch negative": (setter("epoch", -1), '"epoch" must be'),
    "steps_per_epoch 0": (setter("steps_per_epoch", 0), '"steps_per_epoch" must be an integer >= 1'),
    "scaler a string": (setter("scaler", "big"), '"scaler" must be'),
}


@pytest.mark.parametrize("case", BAD_META)
def test_malformed_meta_is_refused_by_name_and_skipped_in_auto_mode(tmp_path, case):
    change, message = BAD_META[case]
    good = save_good(tmp_path, 1)
    bad = save_good(tmp_path, 2)
    edit_meta(bad, change)
    with pytest.raises(CheckpointError, match=message) as e:
        read_meta(bad)
    assert str(e.value).startswith(os.path.join(bad, "meta.json")) and "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert latest_checkpoint(str(tmp_path)) == good


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "top level must be a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "corrupt"),  # json.load: RecursionError
    ("\xff\xfe", "corrupt"),
    ('{"step": 1, "step": Infinity}', '"format" must be'),
])
def test_meta_that_is_not_an_object_or_not_json(tmp_path, content, message):
    path = save_good(tmp_path, 1)
    with open(os.path.join(path, "meta.json"), "w", encoding="latin-1") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=message):
        read_meta(path)


def test_renamed_checkpoint_folder_is_refused(tmp_path):
    path = save_good(tmp_path, 3)
    os.rename(path, path.replace("step-00000003", "step-00000009"))
    with pytest.warns(UserWarning, match="named for step 9 but its meta.json says step 3"):
        assert latest_checkpoint(str(tmp_path)) is None


def test_forged_checksums_of_a_garbage_file_fail_in_one_line(tmp_path):
    path = save_good(tmp_path, 1)
    garbage = os.path.join(path, "model.safetensors")
    with open(garbage, "wb") as f:
        f.write(b"\xff" * 100)
    from bfcl.checkpoint import _sha256
    edit_meta(path, lambda m: m["files"]["model.safetensors"].update(bytes=100, sha256=_sha256(garbage)))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_unexpected_errors_while_reading_are_a_skip(tmp_path, monkeypatch):
    good = save_good(tmp_path, 1)
    save_good(tmp_path, 2)
    import bfcl.checkpoint as checkpoint
    real = checkpoint.read_meta
    monkeypatch.setattr(checkpoint, "read_meta", lambda p: real(p) if p == good else {}["boom"])
    with pytest.warns(UserWarning, match="unexpected KeyError"):
        assert latest_checkpoint(str(tmp_path)) == good


def test_a_good_checkpoint_still_loads_and_records_the_format(tmp_path):
    path = save_good(tmp_path, 5)
    model_state, optimizer_state, meta = load_checkpoint(path)
    assert meta["format"] == CHECKPOINT_FORMAT and meta["step"] == 5 and meta["epoch"] == 0.5
    model = small_model(99)
    load_model_state(model, model_state, path)
    check_weights(model.state_dict(), "checkpoint")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    load_optimizer_state(optimizer, [n for n, _ in model.named_parameters()], optimizer_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in model_state.items())


def test_keep_never_deletes_the_new_checkpoint(tmp_path):
    for step in (100, 200, 300):  # a longer run that used this folder before
        save_good(tmp_path, step)
    tensors = {"w": torch.zeros(2)}
    new = save_checkpoint(str(tmp_path), 10, tensors, {"w.mu": torch.zeros(2)}, {"config": {}}, keep=2)
    assert os.path.isdir(new) and len(list_checkpoints(str(tmp_path))) == 4
    save_checkpoint(str(tmp_path), 20, tensors, {}, {"config": {}}, keep=1)
    assert not os.path.exists(new)


def test_load_model_state_names_what_differs_in_one_line():
    model = small_model()
    state = dict(model.state_dict())
    del state["0.bias"], state["1.running_mean"]
    state["3.weight"] = torch.zeros(1)
    state["2.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_model_state(model, state, "ckpt")
    assert str(e.value) == ("checkpoint ckpt does not fit the model: 2 missing (e.g. 0.bias), 1 unexpected (e.g. "
                            "3.weight), 1 shape differs (e.g. 2.bias: checkpoint [3], model [2]); resume with the "
                            "settings it was made with")
    state = dict(model.state_dict(), **{"0.weight": torch.zeros(3, 4, dtype=torch.long)})
    with pytest.raises(CheckpointError, match=r"1 dtype differs \(e.g. 0.weight: checkpoint torch.int64"):
        load_model_state(model, state, "ckpt")


def test_optimizer_state_of_another_shape_is_refused():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    names = [n for n, _ in model.named_parameters()]
    state = {f"{n}.momentum_buffer": torch.zeros_like(p) for n, p in model.named_parameters()}
    state["2.weight.momentum_buffer"] = torch.zeros(3, 2)
    message = r"2.weight.momentum_buffer has shape \[3, 2\] but the parameter has \[2, 3\]"
    with pytest.raises(CheckpointError, match=message):
        load_optimizer_state(optimizer, names, state)
    adam = torch.optim.AdamW(model.parameters())
    scalar_step = {f"{n}.{k}": torch.zeros_like(p) if k != "step" else torch.tensor(3.0)
                   for n, p in model.named_parameters() for k in ("step", "exp_avg", "exp_avg_sq")}
    load_optimizer_state(adam, names, scalar_step)  # scalar 'step' entries are fine


@pytest.mark.parametrize("key, value, message", [
    ("0.weight", torch.full((3, 4), math.nan), "non-finite values in 1 tensor"),
    ("1.running_mean", torch.tensor([0.0, math.inf, 0.0]), "non-finite values"),
    ("2.weight", torch.zeros(2, 3, dtype=torch.int32), "stores 2.weight as torch.int32, not floating point"),
    ("1.running_var", torch.tensor([1.0, -0.5, 1.0]), "negative BatchNorm variances in 1.running_var"),
])
def test_check_weights_refuses_states_no_run_could_save(key, value, message):
    state = dict(small_model().state_dict())
    assert state["1.num_batches_tracked"].dtype == torch.long
    check_weights(state, "backbone x")  # the real thing passes, int num_batches_tracked included
    state[key] = value
    with pytest.raises(CheckpointError, match=message) as e:
        check_weights(state, "backbone x")
    assert str(e.value).startswith("backbone x ")


# ---------------------------------------------------------------- run lock


def write_lock(output_dir, **fields) -> str:
    record = {"host": socket.gethostname(), "pid_namespace": _pid_namespace(), "started": "2025-01-01T00:00:00",
              "command": "train.py", **fields}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, ".lock"), "w") as f:
        json.dump(record, f)
    return os.path.join(output_dir, ".lock")


def test_lock_is_exclusive_and_removed_on_exit(tmp_path):
    out = str(tmp_path / "run")
    with RunLock(out) as lock:
        record = json.load(open(os.path.join(out, ".lock")))
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and lock.message is None
        with pytest.raises(RunLockError, match=f"in use by pid {os.getpid()}"):
            RunLock(out).acquire()  # a second lock in this process
        other = RunLock(out)
        with pytest.raises(RunLockError):
            other.acquire()
        other.release()  # did not get it: must not delete ours
        assert os.path.exists(os.path.join(out, ".lock"))
    assert os.listdir(out) == []
    lock.release()  # twice is fine


def test_lock_of_a_live_process_is_refused(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lock = write_lock(tmp_path, pid=sleeper.pid, pid_start=_process_start(sleeper.pid))
        with pytest.raises(RunLockError) as e:
            RunLock(str(tmp_path)).acquire()
        assert str(e.value) == (f"--output-dir {tmp_path} is in use by pid {sleeper.pid} on host "
                                f"{socket.gethostname()} since 2025-01-01T00:00:00; wait for it, choose another "
                                f"--output-dir, or delete {lock} if that run is gone")
        # the same pid but another start time: the pid was reused, the run is gone
        write_lock(tmp_path, pid=sleeper.pid, pid_start="1")
        with RunLock(str(tmp_path)) as taken:
            assert "no longer running" in taken.message
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_lock(tmp_path, pid=gone.pid, pid_start="123")
    with RunLock(str(tmp_path)) as lock:
        assert lock.message.startswith(f"took over {tmp_path}/.lock of pid {gone.pid} on host")
        assert json.load(open(os.path.join(tmp_path, ".lock")))["pid"] == os.getpid()
    assert not os.path.exists(os.path.join(tmp_path, ".lock"))


def test_lock_left_by_an_earlier_process_with_our_pid_is_stale(tmp_path):
    write_lock(tmp_path, pid=os.getpid(), pid_start="1")  # a restarted container: same pid, earlier run
    with RunLock(str(tmp_path)) as lock:
        assert lock.message is not None


@pytest.mark.parametrize("fields, message", [
    ({"host": "gpu-node-7", "pid": 1}, "in use by pid 1 on host gpu-node-7 since"),
    ({"pid": 1, "pid_namespace": "pid:[1]"}, "(another container or pid namespace)"),
    ({"pid": "12"}, "is not a lock this code wrote"),
    ({"pid": 0}, "is not a lock this code wrote"),
])
def test_locks_that_cannot_be_checked_are_refused(tmp_path, fields, message):
    lock = write_lock(tmp_path, **fields)
    with pytest.raises(RunLockError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        RunLock(str(tmp_path)).acquire()
    assert f"delete {lock}" in str(e.value)
    assert os.path.exists(lock)


def test_unreadable_lock_file_is_refused(tmp_path):
    with open(tmp_path / ".lock", "w") as f:
        f.write("{half")
    with pytest.raises(RunLockError, match="cannot be read .* delete"):
        RunLock(str(tmp_path)).acquire()


def test_taking_over_removes_only_the_stale_lock_it_judged(tmp_path):
    """Two runs see the same stale lock; one replaces it with its own before the other removes it:
    the other must put that new lock back, not delete it."""
    stale = json.load(open(write_lock(tmp_path, pid=999_999_999)))
    newer = json.load(open(write_lock(tmp_path, pid=os.getppid())))
    lock = RunLock(str(tmp_path))
    assert lock._remove_if(stale) is False
    assert json.load(open(tmp_path / ".lock")) == newer and os.listdir(tmp_path) == [".lock"]
