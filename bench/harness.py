"""What every bench script does around its measurements: launch a subprocess and time it, turn a
short timed run into seconds per step, start-up and end, describe the machine and the commit,
write mean ± std over seeds, and write results.md / results.json.

The scripts (quality.py, bf_study.py, recipe_screen.py, finetune_bench.py, downstream.py) parse
their flags and call these; nothing here reads an argparse namespace.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

from bfcl.precision import cpu_has_native_bf16, cpu_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "cifar10"))


def bench_parser(description: str, results: str,
                 formatter=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    """The flags every bench script has: --data, --out (default bench-results/<results>), --procs, --threads."""
    p = argparse.ArgumentParser(description=description, formatter_class=formatter, allow_abbrev=False)
    p.add_argument("--data", default=DEFAULT_DATA, help="ImageFolder root with train/ and val/ (CIFAR-10 here)")
    p.add_argument("--out", default=os.path.join(REPO, "bench-results", results), help="results folder")
    p.add_argument("--procs", type=int, default=2,
                   help="processes per run (torchrun, gloo); 1: a plain python process")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL threads per process (0: torch's default, one per core)")
    return p


def fail(message: str):
    """A bench script's one-line error and exit status 1."""
    sys.exit(f"error: {message}")


def count_images(root: str) -> int:
    return sum(1 for _, _, files in os.walk(root) for f in files if f.lower().endswith((".jpg", ".jpeg", ".png")))


def check_data(data: str) -> None:
    for part in ("train", "val"):
        if not os.path.isdir(os.path.join(data, part)):
            fail(f"{os.path.join(data, part)} not found; pass --data with train/ and val/ ImageFolders "
                 "(CIFAR-10 as JPEGs, see ../shared/data/README.md)")


def check_calibration_steps(steps: int) -> None:
    """Calibration logs every 5 steps and needs a window after the start-up one and before the last."""
    if steps < 15 or steps % 5:
        fail(f"--calibration-steps {steps} must be a multiple of 5, at least 15")


# ---- describing a run: machine, commit, command, date ----------------------------------------------

def hardware() -> dict:
    return {"cpu": cpu_name(), "bf16": "native" if cpu_has_native_bf16() else "emulated", "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "os": platform.platform(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True)
    return r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def run_info(script: str, argv: list[str] | None) -> dict:
    """The head of every results.json: the command as typed (this Python, relative to the repo), the
    start date, the hardware and the commit. argv None: this process's own arguments."""
    command = [os.path.relpath(sys.executable, REPO), script, *(argv if argv is not None else sys.argv[1:])]
    return {"command": shlex.join(command), "date": now(), "hardware": hardware(), "git": git_commit()}


def provenance(info: dict) -> list[str]:
    """results.md's lines on where a result comes from: the command, the machine, the dates and the
    commit (run_info's keys, and date_end)."""
    hw = info["hardware"]
    machine = f"{hw['cpu']}, {hw['cores']} cores" + (f", bf16 {hw['bf16']}" if "bf16" in hw else "")
    if "torch" in hw:
        machine += f", torch {hw['torch']}; load average at start {hw['load_average_at_start']}"
    return [f"- command: `{info['command']}`", f"- hardware: {machine}",
            f"- date: {info['date']} to {info.get('date_end', '?')}; code {info['git']}"]


def write_results(out: str, markdown: str, results: dict, name: str = "results") -> None:
    """out/<name>.md and out/<name>.json."""
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)


# ---- statistics over seeds -----------------------------------------------------------------------

def std(values: list[float]) -> float:
    """Sample std; 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: list[float], digits: int = 1, always_std: bool = False) -> str:
    """'52.3 ± 0.4' over seeds (sample std); for one seed the bare mean, or '52.3 ± 0.0' with
    always_std (the paired columns of bf_study.py and finetune_bench.py); '–' for none."""
    if not values:
        return "–"
    if len(values) == 1 and not always_std:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {std(values):.{digits}f}"


# ---- subprocesses ----------------------------------------------------------------------------------

def thread_env(threads: int) -> dict:
    """This environment with OMP/MKL threads per process set (0: torch's default, one per core)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def launcher(procs: int) -> list[str]:
    """This Python, or torchrun (as a module of it) for several processes; --standalone picks a
    free port, so benchmarks and tests running side by side do not collide."""
    if procs == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]


def run(cmd: list[str], log_path: str, env: dict, stop_after_s: float | None = None) -> dict:
    """Run cmd in the repo root, output to log_path. Past stop_after_s, SIGTERM (train.py then
    checkpoints and exits 75; torchrun passes the signal on and exits non-zero). Returns start
    time, wall-clock and whether it was stopped."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        stopped = False
        while proc.poll() is None:
            time.sleep(0.5)
            if stop_after_s is not None and not stopped and time.time() - start > stop_after_s:
                proc.send_signal(signal.SIGTERM)
                stopped = True
    wall = time.time() - start
    if proc.returncode not in (0, 75) and not stopped:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        fail(f"{shlex.join(cmd)} exited with {proc.returncode}; last lines of {log_path}:\n{tail}")
    return {"start": start, "wall_s": wall, "stopped_at_budget": stopped}


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def reusable(record_path: str, command: str) -> dict | None:
    """The record an earlier bench run left at record_path, if it ran the same command."""
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["command"] == command:
            return record
    return None


def fresh_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


# ---- calibration: how long a step takes, and what a run spends besides steps ------------------------

def time_short_run(cmd: list[str], out_dir: str, log_name: str, env: dict, steps: int,
                   steps_per_epoch: int | None = None) -> dict:
    """Run cmd, a train.py or probe.py run that logs every 5 steps to out_dir/metrics.jsonl and
    stops after `steps`, and split its wall-clock (seconds):

      step_s         median of the 5-step windows from step 10 to the last but one, / 5
      startup_s      before step 5's window: start-up, data loading, the first steps' warm-up
      last_window_s  what the last window holds beyond 5 steps (the online kNN monitor of a
                     pretraining run, the final evaluation of a fine-tuning run)
      exit_s         after the last log: the final checkpoint or evaluation, and interpreter exit

    steps_per_epoch: leave out windows holding an epoch end (they also hold a checkpoint), unless
    every window does (a data set so small that the step time is then overestimated, which keeps
    runs within their budget).
    """
    t = run(cmd, os.path.join(out_dir, log_name), env)
    times = {r["step"]: r["time"] for r in read_metrics(out_dir)}
    window = lambda s: times[s] - times[s - 5]
    windows = list(range(10, steps, 5))
    if steps_per_epoch:
        windows = [s for s in windows if (s - 1) // steps_per_epoch == (s - 5) // steps_per_epoch] or windows
    step_s = statistics.median(window(s) for s in windows) / 5
    return {"step_s": step_s, "startup_s": max(0.0, times[5] - t["start"] - 5 * step_s),
            "last_window_s": max(0.0, window(steps) - 5 * step_s), "exit_s": t["start"] + t["wall_s"] - times[steps],
            "wall_s": t["wall_s"], "command": shlex.join(cmd)}


def steps_in_budget(budget_s: float, step_s: float, fixed_s: float, minimum: int = 10) -> int:
    """How many steps of step_s fit in budget_s after fixed_s of start-up and end; at least `minimum`."""
    return max(minimum, int((budget_s - fixed_s) / step_s))
