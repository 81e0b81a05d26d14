"""Run plumbing: what the pretraining loop (train.py) and the fine-tuning loop (bfcl/finetune.py)
share. The Accelerator and its precision, the output folder and its run lock, setting ranges, the
warm-up of a shortened schedule, stop signals, the start-up summary and the code version.

Nothing here parses flags or exits: bad settings raise bfcl.errors, which the scripts print as one
line. Nothing here decides who prints either: the callers do.
"""

import contextlib
import math
import os
import shutil
import signal
import subprocess

import psutil
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list

from bfcl import __version__
from bfcl.checkpoint import list_checkpoints
from bfcl.errors import ConfigError, TrainingError
from bfcl.paths import atomic_open, printable_text
from bfcl.precision import emulated_bf16_warning, launch_device_type
from bfcl.precision import resolve as resolve_precision
from bfcl.runlock import take_lock

# A flag's allowed range: (low, high, low inclusive, high inclusive); None for an open end.
# Listed once per script (train.FLAG_RANGES, probe.FLAG_RANGES) and checked before any work.
Range = tuple
# Upper bounds where "no bound" would overflow later: a step count (steps per epoch x epochs) must stay
# an exact integer, and a layer's width must be a tensor size (its memory is then estimated too).
MAX_EPOCHS, MAX_WIDTH = 1e6, 2**24


def check_ranges(values: dict, ranges: dict[str, Range]) -> None:
    """ConfigError on the first setting outside its range, naming it as its flag and the range.

    NaN and infinities are never in range. Settings set to None (not given, no default) are skipped.
    """
    for dest, (low, high, low_in, high_in) in ranges.items():
        value = values[dest]
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            try:
                ok = math.isfinite(v)
            except OverflowError:  # an integer beyond any float (--save-every 1e400 as digits)
                ok = False
            if ok and low is not None:
                ok = v >= low if low_in else v > low
            if ok and high is not None:
                ok = v <= high if high_in else v < high
            if not ok:
                raise ConfigError(f"--{dest.replace('_', '-')} {v!r} is outside its range "
                                  f"{describe_range(low, high, low_in, high_in)}; pass a value inside it")


def check_memory(needed: int, available: int, what: str) -> None:
    """ConfigError when `needed` bytes exceed `available`, naming `what` asked for them and both sizes."""
    if needed > available:
        raise ConfigError(f"{what} needs about {needed / 2**30:.3g} GiB for the model's weights, gradients and "
                          f"optimizer state alone, more than the {available / 2**30:.3g} GiB available; lower it")


def available_memory(device: torch.device) -> int:
    """Bytes a process may use: free memory of its GPU, or its share of the host's available memory
    (LOCAL_WORLD_SIZE: the processes on this host, set by torchrun and accelerate launch)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def describe_range(low, high, low_in: bool, high_in: bool) -> str:
    """'[1, inf)', '(0, 1]', ...: the mathematical interval notation."""
    left = ("[" if low_in else "(") + ("-inf" if low is None else f"{low:g}")
    right = "inf)" if high is None else f"{high:g}" + ("]" if high_in else ")")
    return f"{left}, {right}"


def check_output_dir(output_dir: str, data_dir: str | None = None) -> None:
    """Create --output-dir and prove it writable, or raise ConfigError. Refuses a folder inside the
    data folder BEFORE creating anything: an output folder inside train/ would become a class."""
    if data_dir is not None:
        data, out = os.path.realpath(data_dir), os.path.realpath(output_dir)
        if out == data or out.startswith(data + os.sep):
            raise ConfigError(f"--output-dir {output_dir} is inside --data {data_dir}; it would be read as "
                              "images. Choose a folder outside the data")
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--output-dir {output_dir} is not writable ({e.strerror}); choose another folder") \
            from None


@contextlib.contextmanager
def run_lock(output_dir: str, accelerator: Accelerator):
    """One run per output folder, as a run writes checkpoints there: the main process holds
    OUTPUT/.lock while the body runs (yields the lock there, None elsewhere) and every process learns
    whether it was refused (RunLockError, bfcl/runlock.py)."""
    lock = take_lock(output_dir, accelerator.is_main_process, lambda m: broadcast_object_list([m])[0])
    if lock is not None:  # this run now owns the folder: a previous run's clean stop is no longer its state
        clear_stop_marker(output_dir)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def launched_on_cpu() -> bool:
    """torchrun without GPUs: Accelerate starts gloo only when told the processes are CPU ones."""
    return "LOCAL_RANK" in os.environ and not torch.cuda.is_available()


def launch_state() -> PartialState:
    """The launcher's processes before the Accelerator: process group started and threads set, as the
    Accelerator will find them. train.py validates its settings and measures auto's precision on it."""
    return PartialState(cpu=launched_on_cpu())


def make_accelerator(precision: str | None = None, kwargs_handlers=(), log_with=None,
                     decide=None) -> tuple[Accelerator, str]:
    """(the Accelerator, why its precision): the launcher's processes and devices, with precision
    from --mixed-precision (None: the launcher's setting, 'auto' where it names none; 'auto': bf16
    where the device computes it, bfcl/precision.py). decide(requested, device type, precision, why)
    -> (precision, why), where given, may replace the rule's choice before the Accelerator is built
    (train.py: a resume keeps its checkpoint's precision, auto on a CPU is measured). log_with:
    Accelerate's trackers (bfcl/tracking.py), or None. Prints the one-line warning for bf16 emulated
    on a CPU."""
    cpu = launched_on_cpu()
    device_type = launch_device_type(cpu)
    mixed_precision, why = resolve_precision(precision, device_type)
    if decide is not None:
        mixed_precision, why = decide(precision, device_type, mixed_precision, why)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=list(kwargs_handlers),
                              log_with=log_with or None)
    warning = emulated_bf16_warning(accelerator.mixed_precision, accelerator.device.type)
    if warning:
        accelerator.print(warning)
    return accelerator, why


def scaled_warmup(recipe_epochs: float, recipe_warmup: float, epochs: float | None,
                  warmup: float | None) -> float | None:
    """The warm-up of a shortened schedule, or None where the recipe's stands or warmup was given.

    A schedule shorter than the recipe's (epochs given below recipe_epochs, warmup not given)
    keeps the recipe's warm-up share instead of its warm-up epochs (docs/method.md#schedules):
    5 of 90 epochs over 9 epochs is 0.5, not 5. Used by train.py and by fine-tuning alike."""
    if warmup is not None or epochs is None or not epochs < recipe_epochs or not recipe_warmup:  # NaN: not shorter
        return None
    return recipe_warmup * epochs / recipe_epochs


def check_free_disk(output_dir: str, model_state: dict) -> None:
    """ConfigError unless output_dir has room for a checkpoint: model and optimizer state, with room."""
    need = 3 * sum(t.numel() * t.element_size() for t in model_state.values())
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise ConfigError(f"{free / 2**30:.2f} GiB free in {output_dir} but a checkpoint needs about "
                          f"{need / 2**30:.2f} GiB; free some space or choose another --output-dir")


def check_finite_weights(model_state: dict, accelerator: Accelerator, step: int, lr: float, output_dir: str) -> None:
    """TrainingError, on every process, if a floating-point tensor of model_state holds a NaN or an
    infinity: called before a checkpoint or an export is written, so that a run never saves weights
    that diverged after its last loss check (the loss is read only at sync points, and a tensor the
    loss never sees, e.g. a kernel tap that only meets padding, can turn non-finite with the loss
    still finite). One torch.isfinite pass over the state and one all-reduce of a flag: cheap next
    to writing the same bytes to disk. Every process checks its own copy and all agree, so none waits
    for a save that never comes."""
    bad = next((name for name, t in model_state.items() if t.is_floating_point() and not torch.isfinite(t).all()),
               None)
    flag = torch.tensor(float(bad is not None), device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() == 0:
        return
    kept = list_checkpoints(output_dir)
    kept = f"the last good checkpoint is kept in {kept[-1]}" if kept else f"no checkpoint was written in {output_dir}"
    raise TrainingError(f"the weights became non-finite by step {step} ({bad or 'on another process'}; lr {lr:.4g}, "
                        f"precision {accelerator.mixed_precision}); {kept}; lower --lr, or use fp32 with "
                        "--mixed-precision no")


def format_summary(summary: dict, width: int = 20) -> str:
    """The derived quantities a script prints once at start, one 'name: value' a line; paths whose
    bytes are not UTF-8 shown as \\xNN (bfcl.paths.printable_text), never a UnicodeEncodeError."""
    return printable_text("\n".join(f"{k:>{width}}: {v}" for k, v in summary.items()))


def code_version() -> str:
    """bfcl's version and, in a git checkout, the commit: '0.1.0+abc1234'."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


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


# The exit status of a run stopped by SIGTERM/SIGINT after a checkpoint (EX_TEMPFAIL): run the same
# command again to resume. The loops return it; the scripts exit with it.
EXIT_PREEMPTED = 75
# ... and the marker such a run leaves in its output folder, since a launcher's own status does not
# say it (torchrun exits 1 when it was signalled, whatever its processes returned). The next run
# on the folder removes it once it holds the lock (run_lock).
STOP_MARKER = "STOPPED"


def mark_stopped(output_dir: str, step: int) -> None:
    """Write OUTPUT/STOPPED, atomically: 'stopped cleanly at step N; run the same command to resume'."""
    path = os.path.join(output_dir, STOP_MARKER)
    with atomic_open(path) as f:
        f.write(f"stopped cleanly at step {step}; run the same command to resume\n")


def clear_stop_marker(output_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, STOP_MARKER))
