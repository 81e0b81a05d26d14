"""One output folder, one run: a lock file naming the run that owns --output-dir.

    with RunLock(output_dir) as lock:   # or lock.acquire() ... lock.release()
        if lock.message:                # a stale lock was taken over
            print(lock.message)

<output-dir>/.lock is JSON {"host", "pid_namespace", "pid", "pid_start", "started", "command"}. It appears
atomically with its content (written under a temporary name, then hard-linked into place; the
link fails if a lock exists, which also holds on NFS), so no reader sees it half written.

A lock left by a run that died (SIGKILL, out of memory, a reboot) is stale when it names
this host and pid namespace and a process that no longer runs; it is taken over, and
`message` says so. A process counts as the same one only if its start time matches too, so a
pid reused after a reboot or a wrap-around is not mistaken for the old run. A lock of another
host, or of another pid namespace on this host (another container; a restarted container also
gets a new one), is refused: its process cannot be checked from here, and the message says
how to remove the lock if that run is gone. Two runs taking over one stale lock at once cannot
both win: the stale file is first renamed to a name of our own and checked to be the one that
was judged stale; a lock another run created meanwhile is put back.

Once the lock is taken, what an interrupted run left half-written in the folder is removed
(remove_temporaries): files are written under NAME.tmp-PID and renamed into place, so such a
name is never a finished output. This runs before the free-disk check, which so counts their space.
"""

import json
import os
import re
import shlex
import shutil
import socket
import sys
from datetime import datetime

from bfcl.errors import RunLockError
from bfcl.paths import printable

LOCK_NAME = ".lock"
_HELD = set()  # lock paths held by this process, so that a second RunLock here is refused
# NAME.tmp-PID: bfcl.checkpoint's atomic writes (.step-N.tmp-PID folders in checkpoints/ too);
# .write-test-PID: bfcl.runs.check_output_dir's probe file
_TEMPORARY = re.compile(r".\.tmp-\d+$|^\.write-test-\d+$")
_TEMPORARY_PLACES = (".", "checkpoints")


def _size(path: str) -> int:
    if os.path.isdir(path) and not os.path.islink(path):
        return sum(os.lstat(os.path.join(folder, name)).st_size
                   for folder, _, names in os.walk(path) for name in names)
    return os.lstat(path).st_size


def remove_temporaries(output_dir: str) -> tuple[list[str], int]:
    """Delete the temporaries that an interrupted run left in output_dir and its checkpoints/ (see
    the module docstring); (their paths, the bytes freed). Call only while holding the lock."""
    removed, freed = [], 0
    for place in _TEMPORARY_PLACES:
        folder = os.path.join(output_dir, place)
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in filter(_TEMPORARY.search, names):
            path = os.path.normpath(os.path.join(folder, name))
            try:
                size = _size(path)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError:
                continue  # gone meanwhile, or not ours to delete: the free-disk check still sees it
            removed.append(path)
            freed += size
    return removed, freed


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return None


def _alive(record: dict) -> bool:
    """Whether the process a lock of this host names is still the run that wrote it."""
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    start = _process_start(record["pid"])
    return record.get("pid_start") is None or start is None or start == record["pid_start"]


class RunLock:
    """Exclusive use of `output_dir` by this process; see the module docstring."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.message: str | None = None  # set when a stale lock was taken over; the caller prints it
        self._record: dict | None = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        """Take the lock, or raise RunLockError in one line. Creates output_dir if needed."""
        if self._record is not None:
            return self
        try:
            os.makedirs(self.output_dir, exist_ok=True)
        except OSError as e:
            raise RunLockError(f"cannot create --output-dir {self.output_dir} ({e.strerror}); choose another") from None
        record = {"host": socket.gethostname(), "pid_namespace": _pid_namespace(), "pid": os.getpid(),
                  "pid_start": _process_start(os.getpid()),
                  "started": datetime.now().astimezone().isoformat(timespec="seconds"), "command": shlex.join(sys.argv)}
        for _ in range(3):  # each retry follows a stale lock that was removed
            try:
                created = self._create(record)
            except OSError as e:
                raise RunLockError(f"cannot write {self.path} ({e.strerror}); choose a writable --output-dir") from None
            if created:
                self._record = record
                _HELD.add(os.path.realpath(self.path))
                self._remove_temporaries()
                return self
            holder = self._read(self.path)
            if holder is None:
                continue  # released between our attempt and our read
            if not self._is_stale(holder):
                raise RunLockError(self._in_use(holder))
            if self._remove_if(holder):
                self.message = (f"took over {self.path} of pid {holder['pid']} on host {holder['host']} "
                                f"(started {holder.get('started')}), which is no longer running")
        raise RunLockError(f"--output-dir {self.output_dir}: another run is taking its lock at the same time; "
                           "start one run per --output-dir")

    def _remove_temporaries(self) -> None:
        removed, freed = remove_temporaries(self.output_dir)
        if removed:
            note = (f"removed {len(removed)} temporary file(s) an interrupted run left ({printable(removed[0])}"
                    f"{', ...' if len(removed) > 1 else ''}; {freed / 2**20:.1f} MiB)")
            self.message = f"{self.message}; {note}" if self.message else note

    def release(self) -> None:
        """Delete the lock file if it is still ours. Safe to call twice, or without the lock."""
        if self._record is None:
            return
        _HELD.discard(os.path.realpath(self.path))
        try:
            if self._read(self.path) == self._record:
                os.unlink(self.path)
        except (OSError, RunLockError):
            pass  # gone, or no longer ours: nothing to release
        self._record = None

    def _create(self, record: dict) -> bool:
        """Put `record` at self.path if no lock is there; False if one is."""
        tmp = f"{self.path}.new-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: O_EXCL, content written just after
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            return True
        finally:
            os.unlink(tmp)

    def _read(self, path: str) -> dict | None:
        """The lock record at `path`; None if there is no file; RunLockError if it is not a lock."""
        try:
            with open(path) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise RunLockError(f"{self.path} cannot be read ({type(e).__name__}); if no run uses --output-dir "
                               f"{self.output_dir}, delete {self.path}") from None
        pid = record.get("pid") if isinstance(record, dict) else None
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(record.get("host"), str):
            raise RunLockError(f"{self.path} is not a lock this code wrote; if no run uses --output-dir "
                               f"{self.output_dir}, delete {self.path}")
        return record

    def _is_stale(self, holder: dict) -> bool:
        if holder["host"] != socket.gethostname() or holder.get("pid_namespace") != _pid_namespace():
            return False  # cannot check a process on another host or in another container
        if holder["pid"] == os.getpid():  # ours if this process holds it, else an earlier process with our pid
            return os.path.realpath(self.path) not in _HELD
        return not _alive(holder)

    def _remove_if(self, stale: dict) -> bool:
        """Remove the lock file if it still holds `stale`. Renaming it away first makes the check
        and the removal one step: a lock that another run created meanwhile is put back."""
        grave = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return False
        try:
            same = self._read(grave) == stale
        except RunLockError:
            same = False
        if not same:  # another run's new lock: give it back (fails only if a third run took the place)
            try:
                os.link(grave, self.path)
            except OSError:
                pass
        os.unlink(grave)
        return same

    def _in_use(self, holder: dict) -> str:
        where = f"host {holder['host']}"
        if holder["host"] == socket.gethostname() and holder.get("pid_namespace") != _pid_namespace():
            where += " (another container or pid namespace)"
        return (f"--output-dir {self.output_dir} is in use by pid {holder['pid']} on {where} since "
                f"{holder.get('started')}; wait for it, choose another --output-dir, or delete {self.path} "
                "if that run is gone")


def take_lock(output_dir: str, is_main: bool, share) -> RunLock | None:
    """The main process takes output_dir's lock; `share(message) -> message` hands its refusal
    (or None) from the main process to every process (the scripts pass accelerate's
    broadcast), so that all of them stop alike instead of the others running on into the first
    collective. Returns the held lock on the main process, None elsewhere; raises RunLockError
    on every process when the lock is refused."""
    lock, message = None, None
    if is_main:
        lock = RunLock(output_dir)
        try:
            lock.acquire()
        except RunLockError as e:
            lock, message = None, str(e)
    message = share(message)
    if message:
        raise RunLockError(message)
    return lock
