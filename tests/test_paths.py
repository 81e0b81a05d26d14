"""Every path in a message is printable whatever its bytes (bfcl/paths.py; docs/reliability.md)."""

import os

import pytest

from bfcl.errors import DataError
from bfcl.index import find_layout, index_folder
from bfcl.paths import printable


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
