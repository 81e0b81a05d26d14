"""List files (--train-list): one reader with one set of rules for train.py and probe.py
(bfcl/lists.py; docs/reliability.md)."""

import os

import pytest

from bfcl.errors import DataError
from bfcl.index import index_list
from bfcl.lists import MAX_LINE_BYTES, read_list
from bfcl.subsets import read_train_list


def _files(root, names):
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    return str(root)


def _train(root, listing):
    """train.py's reading: the paths of the index it builds."""
    index = index_list(root, str(listing))
    return [os.path.relpath(index.path(i), root) for i in range(len(index))]


def _probe(root, listing):
    """probe.py's reading: the images picked, in train/'s order."""
    paths = ["a/1.jpg", "b/2.jpg", "b/3.jpg"]
    return [paths[i] for i in read_train_list(str(listing), paths, root)]


READERS = {"train": _train, "probe": _probe}


@pytest.fixture
def root(tmp_path):
    return _files(tmp_path / "data", ["a/1.jpg", "b/2.jpg", "b/3.jpg"])


@pytest.mark.parametrize("reader", READERS)
def test_bom_cr_whitespace_and_spellings_of_one_path_are_read_alike(root, tmp_path, reader):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbfb/2.jpg \r\n  ./a/1.jpg\t\r\n\r\nb\\3.jpg\n")
    expected = {"train": ["b/2.jpg", "a/1.jpg", "b/3.jpg"], "probe": ["a/1.jpg", "b/2.jpg", "b/3.jpg"]}[reader]
    assert READERS[reader](root, listing) == expected


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("entry", ["../outside.jpg", "a/../../outside.jpg", "/etc/passwd"])
def test_entries_outside_the_root_are_refused_with_their_line(root, tmp_path, reader, entry):
    listing = tmp_path / "list.txt"
    listing.write_text(f"a/1.jpg\n{entry}\n")
    with pytest.raises(DataError) as e:
        READERS[reader](root, listing)
    assert str(e.value) == (f"--train-list {listing} line 2: {entry} is outside {root}; list paths relative to "
                            f"{root}, inside it")


def test_an_absolute_path_inside_the_root_is_taken_relative(root, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root}/b/3.jpg\na/1.jpg\n")
    assert _train(root, listing) == ["b/3.jpg", "a/1.jpg"]


@pytest.mark.parametrize("reader", READERS)
def test_duplicates_are_refused_naming_both_lines(root, tmp_path, reader):
    listing = tmp_path / "list.txt"
    listing.write_text("a/1.jpg\nb/2.jpg\nb/3.jpg\n./b/2.jpg\nb/2.jpg\n")
    with pytest.raises(DataError) as e:
        READERS[reader](root, listing)
    message = str(e.value)
    assert ("lines 2 and 4 both name b/2.jpg; list each image once" in message if reader == "train"
            else "line 4: b/2.jpg is already on line 2; list each image once" in message), message


@pytest.mark.parametrize("reader", READERS)
def test_invisible_characters_in_a_missing_path_are_shown(root, tmp_path, reader):
    listing = tmp_path / "list.txt"
    listing.write_bytes("a/1.jpg\nb/\u200b2.jpg\n".encode())  # a zero-width space
    with pytest.raises(DataError) as e:
        READERS[reader](root, listing)
    assert "line 2: b/\\u200b2.jpg " in str(e.value)


def test_a_line_longer_than_any_path_is_refused(root, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a/1.jpg\n" + b"x" * (MAX_LINE_BYTES + 10))
    with pytest.raises(DataError, match=f"line 2 is longer than {MAX_LINE_BYTES} bytes"):
        list(read_list(str(listing), root))


@pytest.mark.parametrize("reader", READERS)
def test_an_empty_list_is_refused(root, tmp_path, reader):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf\r\n  \n")
    with pytest.raises(DataError, match="names no images"):
        READERS[reader](root, listing)


@pytest.mark.parametrize("reader", READERS)
def test_a_missing_list_file_is_named(root, tmp_path, reader):
    with pytest.raises(DataError) as e:
        READERS[reader](root, tmp_path / "nope.txt")
    missing = tmp_path / "nope.txt"
    assert str(e.value) == f"--train-list {missing} does not exist; pass a file with one image path a line"
