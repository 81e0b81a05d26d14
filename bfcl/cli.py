"""What the scripts (train.py, probe.py, bench/) share about talking to a person: one-line
errors, the --help layout, flag ranges, the output folder, the start-up summary, stop signals.

Nothing here knows about processes or ranks: the scripts decide who prints.
"""

import argparse
import math
import os
import signal
import subprocess
import sys

import bfcl


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and every flag's default after its help."""


def fail(message: str) -> None:
    """Stop with a one-line error that names the problem and the fix."""
    sys.exit(f"error: {message}")


# A flag's allowed range: (low, high, low inclusive, high inclusive); None for an open end.
# Listed once per script (train.FLAG_RANGES, probe.FLAG_RANGES) and checked before any work.
Range = tuple


def check_ranges(args: argparse.Namespace, ranges: dict[str, Range]) -> None:
    """Fail in one line on the first flag outside its range, naming the flag and the range.

    NaN and infinities are never in range. Flags set to None (not given, no default) are skipped.
    """
    for dest, (low, high, low_in, high_in) in ranges.items():
        value = getattr(args, dest)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None:
                continue
            ok = math.isfinite(v)
            if ok and low is not None:
                ok = v >= low if low_in else v > low
            if ok and high is not None:
                ok = v <= high if high_in else v < high
            if not ok:
                fail(f"--{dest.replace('_', '-')} {v!r} is outside its range "
                     f"{describe_range(low, high, low_in, high_in)}; "
                     "pass a value inside it")


def describe_range(low, high, low_in: bool, high_in: bool) -> str:
    """'[1, inf)', '(0, 1]', ...: the mathematical interval notation."""
    left = ("[" if low_in else "(") + ("-inf" if low is None else f"{low:g}")
    right = "inf)" if high is None else f"{high:g}" + ("]" if high_in else ")")
    return f"{left}, {right}"


def check_output_dir(output_dir: str, data_dir: str | None = None) -> None:
    """Create --output-dir and prove it writable, or fail. Refuses a folder inside the data
    folder BEFORE creating anything: an output folder inside train/ would become a class."""
    if data_dir is not None:
        data, out = os.path.realpath(data_dir), os.path.realpath(output_dir)
        if out == data or out.startswith(data + os.sep):
            fail(f"--output-dir {output_dir} is inside --data {data_dir}; it would be read as images. "
                 "Choose a folder outside the data")
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"--output-dir {output_dir} is not writable ({e.strerror}); choose another folder")


def format_summary(summary: dict, width: int = 20) -> str:
    """The derived quantities a script prints once at start, one 'name: value' a line."""
    return "\n".join(f"{k:>{width}}: {v}" for k, v in summary.items())


def code_version() -> str:
    """bfcl's version and, in a git checkout, the commit: '0.1.0+abc1234'."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{bfcl.__version__}+{commit}" if commit else bfcl.__version__


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers leave SIGINT/SIGTERM to the main process, which
    finishes its step first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignal:
    """First SIGTERM/SIGINT: `requested` becomes True and the loop checkpoints and exits at its
    next sync point. Second: exit at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = True


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after a checkpoint; run again to resume
