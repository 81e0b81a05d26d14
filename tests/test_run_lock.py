"""One output folder, one run (bfcl/runlock.py): the lock is exclusive and removed on exit, a live
holder is refused in one line, a stale lock taken over (and only the one judged stale), a lock that
cannot be checked refused; train.py refuses a held folder before writing anything, in every process."""

import json
import os
import socket
import subprocess
import sys

import pytest

import train
from bfcl.runlock import RunLock, RunLockError, _pid_namespace, _process_start
from bfcl.synthetic import make_image_folder
from scripts import IMAGENET_STEM_ONE_EPOCH, REPO, error_of


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=8,
                             val_per_class=4, size=16)


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
        assert lock.message == (f"took over {tmp_path}/.lock of pid {os.getpid()} on host {socket.gethostname()} "
                                "(started 2025-01-01T00:00:00), which is no longer running")
        assert json.load(open(tmp_path / ".lock"))["pid_start"] != "1"  # now ours


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


def test_second_run_on_the_same_output_dir_is_refused(data, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bfcl.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        message = error_of(train.main, ["--data", data, "--output-dir", str(out), *IMAGENET_STEM_ONE_EPOCH])
        assert f"is in use by pid {holder.pid}" in message
        assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "metrics.jsonl")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_refused_lock_stops_every_process(data, tmp_path):
    """Two torchrun processes on a folder another run holds: both stop with the one-line error;
    the second process does not run on into a collective and hang."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bfcl.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "train.py", "--data", data,
                                 "--output-dir", str(out), *IMAGENET_STEM_ONE_EPOCH], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode != 0
        assert result.stderr.count(f"is in use by pid {holder.pid}") == 2, result.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()
