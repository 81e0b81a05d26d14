"""The paths a user names: shown so that every byte is visible, and opened only as regular files.

printable(path) is for messages. A file name on Linux is any bytes but "/" and NUL; Python holds
the bytes that are not UTF-8 as lone surrogates, which cannot be printed (UnicodeEncodeError in the
middle of an error message). Those bytes are shown as \\xff, and invisible characters (a byte
order mark, a carriage return, a zero-width space) as their escapes, so a path that "looks right"
in an error shows what is wrong with it. A name with spaces at either end is quoted.

open_regular(path) refuses, in one line, anything but a regular file: a FIFO blocks the first read
forever, /dev/zero never ends, a folder fails with a message naming no cause.
"""

import contextlib
import os
import stat


class NotRegularFileError(OSError):
    """A path that names a folder, a FIFO, a device or a socket where bfcl reads a file."""


def printable(path: "str | bytes | os.PathLike") -> str:
    """`path` as text every terminal shows as it is: bytes that are not UTF-8 as \\xNN,
    characters that are not printable as their Python escapes; quoted if it starts or ends in
    whitespace."""
    raw = os.fsencode(path)
    text = "".join(c if c.isprintable() else ascii(c)[1:-1]
                   for c in raw.decode("utf-8", "backslashreplace"))
    return repr(text) if text != text.strip() else text


def printable_text(text: str) -> str:
    """A whole message that may hold paths, safe to print on any UTF-8 terminal: the bytes of a path
    that are not UTF-8 (held by Python as lone surrogates, which raise UnicodeEncodeError when printed)
    as \\xNN, like printable; the rest (newlines, spaces) as it is."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decoded to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def describe_kind(mode: int) -> str:
    """'a folder', 'a FIFO', ... for a stat mode that is not a regular file."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_regular(path: "str | bytes", what: str) -> None:
    """Raise NotRegularFileError (one line: `what`, the path and what it is; the caller adds the
    fix) unless `path` is a regular file, or a symlink to one. FileNotFoundError if it does not exist."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {printable(path)} does not exist") from None
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(f"{what} {printable(path)} is {describe_kind(mode)}, not a regular file")


def open_regular(path: "str | bytes", what: str, mode: str = "rb"):
    """open(path, mode) for reading a regular file, checked on the open descriptor itself (a FIFO
    is opened without blocking, so the check cannot hang): NotRegularFileError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise NotRegularFileError(f"{what} {printable(path)} is {describe_kind(kind)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """Open PATH.tmp-PID for writing; when the block ends, flush, fsync and rename it over `path`, so a
    reader or a kill sees the old file or the new one, never half of one. An error removes the
    temporary and is raised; `path` is left as it was. (docs/reliability.md: every file is written
    under NAME.tmp-PID and renamed into place.)"""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
