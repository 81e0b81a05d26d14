"""The one reader of list files (--train-list), for train.py and probe.py alike.

A list file holds one image path a line, relative to a root: --data for train.py, --data/train for
probe.py. Each line is read the same way for both:
  - a UTF-8 byte order mark before the first line, the line end (LF or CR LF) and whitespace around
    the path are dropped; empty lines are skipped; "\\" separators become "/";
  - the path is normalised ("./a.jpg", "x/../a.jpg" and "a.jpg" are one entry) and must lie inside
    the root: "../" or an absolute path outside it is refused with its line number (an absolute
    path inside the root is taken relative to it);
  - an entry listed twice is refused, naming both lines: a list is a set of images in an order.
Paths in messages go through bfcl.paths.printable, so a stray BOM or a trailing space shows.

Memory stays bounded whatever the file holds: it must be a regular file (not a FIFO or /dev/zero),
a line may hold at most MAX_LINE_BYTES, and duplicates are found from one 8-byte digest per
line, not a set of strings.
"""

import hashlib
import os
from array import array

import torch

from bfcl.errors import DataError
from bfcl.paths import NotRegularFileError, open_regular, printable

MAX_LINE_BYTES = 4096  # Linux's PATH_MAX: no longer line can name a file
_BOM = b"\xef\xbb\xbf"


def _entries(f, list_file: str, root: str, what: str):
    """(line number, normalised relative path) of each non-empty line; DataError for a bad one."""
    root_abs = os.path.abspath(root)
    for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise DataError(f"{what} {printable(list_file)} line {number} is longer than {MAX_LINE_BYTES} bytes; "
                            "this is not a list of image paths, pass a file with one path a line")
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        entry = os.fsdecode(raw).strip().replace("\\", "/")
        if not entry:
            continue
        path = os.path.normpath(os.path.join(root_abs, entry))
        if path != root_abs and not path.startswith(os.path.join(root_abs, "")):
            raise DataError(f"{what} {printable(list_file)} line {number}: {printable(entry)} is outside "
                            f"{printable(root)}; list paths relative to {printable(root)}, inside it")
        if path == root_abs:
            raise DataError(f"{what} {printable(list_file)} line {number}: {printable(entry)} names "
                            f"{printable(root)} itself, not an image; fix or remove the line")
        yield number, os.path.relpath(path, root_abs)


def _digest(entry: str) -> int:
    return int.from_bytes(hashlib.blake2b(os.fsencode(entry), digest_size=8).digest(), "little", signed=True)


def read_list(list_file: str, root: str, what: str = "--train-list"):
    """Yield (line number, path relative to root) for each entry of `list_file`, in the file's
    order (see the module docstring for the rules). Raises DataError in one line for a file that
    is missing, not a regular file or unreadable, a bad line, an entry listed twice, or no entry;
    the duplicate and empty checks run when the last line has been read."""
    try:
        f = open_regular(list_file, what)
    except FileNotFoundError:
        raise DataError(f"{what} {printable(list_file)} does not exist; pass a file with one image path a line") \
            from None
    except NotRegularFileError as e:
        raise DataError(f"{e}; pass a file with one image path a line") from None
    except OSError as e:
        raise DataError(f"{what} {printable(list_file)} cannot be read ({e.strerror}); check its permissions") from None
    digests, numbers = array("q"), array("q")
    with f:
        try:
            for number, entry in _entries(f, list_file, root, what):
                digests.append(_digest(entry))
                numbers.append(number)
                yield number, entry
        except OSError as e:
            raise DataError(f"{what} {printable(list_file)} cannot be read ({e.strerror}); "
                            "check the file") from None
    if not digests:
        raise DataError(f"{what} {printable(list_file)} names no images; write one image path a line, "
                        f"relative to {printable(root)}")
    first, again = _first_duplicate(digests, numbers)
    if again is not None:
        with open_regular(list_file, what) as f:
            entry = next(e for n, e in _entries(f, list_file, root, what) if n == again)
        raise DataError(f"{what} {printable(list_file)} lines {first} and {again} both name {printable(entry)}; "
                        "list each image once")


def _first_duplicate(digests: array, numbers: array) -> tuple[int | None, int | None]:
    """(earlier line, later line) of the first repeated entry in file order, or (None, None)."""
    keys = torch.frombuffer(digests, dtype=torch.int64) if len(digests) else torch.zeros(0, dtype=torch.int64)
    order = torch.sort(keys, stable=True).indices  # equal digests stay in file order
    ordered = keys[order]
    repeats = (ordered[1:] == ordered[:-1]).nonzero().flatten()
    if not len(repeats):
        return None, None
    lines = torch.frombuffer(numbers, dtype=torch.int64)
    pairs = [(int(lines[order[i + 1]]), int(lines[order[i]])) for i in repeats.tolist()]
    later, earlier = min(pairs)
    return earlier, later
