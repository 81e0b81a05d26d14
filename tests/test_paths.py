"""Every path in a message is printable whatever its bytes (bfcl/paths.py; docs/reliability.md)."""

import os

import pytest

from bfcl.errors import DataError
from bfcl.index import find_layout, index_folder
from bfcl.paths import atomic_open, printable


@pytest.mark.parametrize("raw, shown", [
    (b"data/caf\xe9", "data/caf\\xe9"),  # Latin-1, not UTF-8
    ("data/café".encode(), "data/café"),
    ("a/\ufeffb.jpg".encode(), "a/\\ufeffb.jpg"),  # a byte order mark
    (b"a/b.jpg\r", "a/b.jpg\\r"),  # a carriage return (a list file from Windows)
    (b"a/b.jpg ", "'a/b.jpg '"),  # a trailing space: quoted
    ("a/\u200bb.jpg".encode(), "a/\\u200bb.jpg"),  # a zero-width space
])
def test_printable_shows_every_byte(raw, shown):
    assert printable(raw) == shown
    assert printable(os.fsdecode(raw)) == shown
    printable(raw).encode("utf-8")  # never a lone surrogate


def test_an_undecodable_data_folder_is_named_in_printable_messages(tmp_path):
    root = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    with pytest.raises(DataError) as e:
        find_layout(os.fsdecode(root))
    assert str(e.value) == f"data folder {tmp_path}/caf\\xe9 does not exist; pass a folder of images"
    str(e.value).encode("utf-8")
    os.makedirs(os.path.join(root, b"x"))
    with open(os.path.join(root, b"x", b"\xff.jpg"), "wb"):
        pass
    index = index_folder(os.fsdecode(root))
    assert index.describe() == f"folder searched recursively {tmp_path}/caf\\xe9: 1 images"
    index.describe().encode("utf-8")


def test_messages_and_the_summary_print_paths_that_are_not_utf8():
    """Issue 33 case 8, the rest: the start-up summary, the log's lines and every error's one line go
    through printable_text, so an --output-dir or a checkpoint path of Latin-1 bytes prints as \\xe9."""
    from bfcl.errors import CheckpointError, one_line
    from bfcl.paths import printable_text
    from bfcl.runs import format_summary
    path = os.fsdecode(b"/runs/caf\xe9/checkpoints/step-00000004")
    with pytest.raises(UnicodeEncodeError):
        path.encode("utf-8")  # what print() met before
    assert printable_text(f"done: in {path}\nnext") == "done: in /runs/caf\\xe9/checkpoints/step-00000004\nnext"
    assert printable_text("caf\ud800") == "caf\\ud800"  # a surrogate no file name decodes to
    assert one_line(CheckpointError(f"cannot resume {path}: settings differ")) == \
        "cannot resume /runs/caf\\xe9/checkpoints/step-00000004: settings differ"
    summary = format_summary({"resumed from": f"{path} (step 4)", "processes": 1})
    assert "resumed from: /runs/caf\\xe9/checkpoints/step-00000004 (step 4)" in summary
    summary.encode("utf-8")


@pytest.mark.slow
def test_train_py_in_an_output_folder_that_is_not_utf8(tiny_data, tmp_path):
    import subprocess
    import sys
    from scripts import ENV, REPO, TINY
    out = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    result = subprocess.run([sys.executable, "train.py", "--data", tiny_data, "--output-dir", out, *TINY,
                             "--max-steps", "1"], cwd=REPO, capture_output=True, timeout=300,
                            env={**os.environ, **ENV, "PYTHONIOENCODING": "utf-8"})
    stdout = result.stdout.decode("utf-8")  # strict: no raw byte of the path got through
    assert result.returncode == 0, stdout + result.stderr.decode("utf-8", "replace")
    assert f"done: 1 steps; backbone (step 1) in {tmp_path}/caf\\xe9/backbone.safetensors" in stdout
    assert f"{tmp_path}/caf\\xe9/image-index.safetensors" in stdout


def test_atomic_open_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "STOPPED"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_open(str(path)) as f:
            f.write("half")
            raise RuntimeError("disk gone")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["STOPPED"]
    with atomic_open(str(path), "wb") as f:
        f.write(b"new\n")
    assert path.read_bytes() == b"new\n" and os.listdir(tmp_path) == ["STOPPED"]
