"""The errors bfcl raises. str(e) is always one line that names the problem and the fix, so a
script prints `error: <message>` and exits, and a notebook shows the same line.

Only the scripts (train.py, probe.py, bench/) turn them into exit codes; the library never exits.
"""


class BfclError(Exception):
    """Every error bfcl raises on purpose: str(e) is one line that names the problem and the fix."""


class ConfigError(BfclError, ValueError):
    """Settings that cannot work together, or a value outside its range."""


class DataError(BfclError, ValueError):
    """Images, data folders or list files that cannot be used."""


class CheckpointError(BfclError, ValueError):
    """A checkpoint that is missing, truncated, corrupt, of the wrong kind or of other settings."""


class RunLockError(BfclError):
    """The output folder is in use by another run (or its lock cannot be read)."""


class TrainingError(BfclError):
    """A run that cannot go on: a non-finite loss, or too many unreadable images."""


def one_line(error: Exception) -> str:
    """The message of an error, also after a DataLoader worker raised it: the loader raises it again
    in the main process with the worker's traceback as its message ("Caught DataError in DataLoader
    worker process 0. Original Traceback ... bfcl.errors.DataError: <message>")."""
    from bfcl.paths import printable_text  # a path in the message may hold bytes that are not UTF-8
    lines = printable_text(str(error)).strip().splitlines()
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    return lines[-1].removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")
