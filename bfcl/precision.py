"""Which mixed precision to train in: `--mixed-precision auto` picks it from the hardware.

bf16 pays on a CPU only where it is computed natively (AVX512-BF16 or AMX); elsewhere PyTorch
emulates it, and a ResNet step runs about 9x slower than in fp32 (AMD EPYC Zen 3, AVX2 only:
3.0 against 28.1 images/s). On GPUs bf16 is used where supported, fp16 with a loss scaler
otherwise.

Native bf16 is not always the faster one, though: on an Intel Xeon with AMX the small-image recipe
(2 processes x 1 thread, batch 256, 32 px) ran 15-20 % slower in bf16 than in fp32, where an AMD EPYC
Zen 4 ran it 1.6x faster (docs/reliability.md, issue 33 case 15). So where auto meets a CPU with native
bf16, train.py times a few steps of its own model in each precision at start-up (decide_auto) and
keeps bf16 only where it is at least MARGIN times faster; the answer is cached per CPU, launch, model,
image size and batch (cache_file), and a resume keeps the precision its checkpoint trained in.

BFCL_CPU_BF16=0 or 1 overrides the CPU detection (to test either path on any machine).
BFCL_PRECISION_PROBE=0 skips the measurement (the native-bf16 rule decides, and the summary says so).
BFCL_CACHE names the cache's folder (default: $XDG_CACHE_HOME/bfcl, else ~/.cache/bfcl).
"""

import json
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from bfcl.paths import atomic_open

CHOICES = ("auto", "no", "fp16", "bf16")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_capability() -> str:
    """The CPU's vector class as bfcl names it: AMX, AVX512-BF16, AVX512, AVX2 or DEFAULT."""
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX).

    /proc/cpuinfo's flags decide where they exist; elsewhere (macOS, Windows) oneDNN's own check
    does. BFCL_CPU_BF16=0/1 overrides both.
    """
    forced = os.environ.get("BFCL_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if _cpu_flags():
        return cpu_capability() in ("AMX", "AVX512-BF16")
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, with its vector class: 'AMD EPYC (AVX2)'."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{name or 'unknown CPU'} ({cpu_capability()})"


def launch_device_type(cpu: bool = False) -> str:
    """'cuda' or 'cpu': where Accelerate will put this process (accelerate launch --cpu sets ACCELERATE_USE_CPU)."""
    forced_cpu = cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return "cuda" if torch.cuda.is_available() and not forced_cpu else "cpu"


def resolve(requested: str | None, device_type: str) -> tuple[str | None, str]:
    """(the precision to hand Accelerate, why). `requested` None: the launcher's choice where it
    names one (accelerate launch exports ACCELERATE_MIXED_PRECISION), else 'auto' (torchrun, plain
    python: nothing names a precision, and fp32 on a GPU or a bf16-native CPU would cost speed)."""
    if requested is None:
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if launcher:
            return None, f"accelerate launch's setting: {launcher}"
        chosen, why = resolve("auto", device_type)
        return chosen, why.replace("auto: ", "auto (no --mixed-precision, none from the launcher): ", 1)
    if device_type == "cpu" and requested == "bf16" and not cpu_has_native_bf16():
        return "bf16", (f"asked for; this CPU ({cpu_capability()}) has no native bf16, so it is emulated and "
                        "likely several times slower than --mixed-precision no (about 9x for a ResNet on AVX2)")
    if requested != "auto":
        return requested, "asked for"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU computes bf16"
        return "fp16", "auto: this GPU has no bf16; fp16 with a loss scaler"
    if device_type == "cpu":
        if cpu_has_native_bf16():
            return "bf16", f"auto: this CPU computes bf16 natively ({cpu_capability()})"
        return "no", f"auto: fp32, this CPU ({cpu_capability()}) has no native bf16"
    return "no", f"auto: fp32 on {device_type}"


def emulated_bf16_warning(precision: str | None, device_type: str) -> str | None:
    """The one-line warning for an explicit bf16 on a CPU that only emulates it, else None."""
    if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
        return (f"warning: --mixed-precision bf16 on a CPU without native bf16 ({cpu_capability()}) is emulated, "
                "likely several times slower than fp32 (about 9x for a ResNet on AVX2); use --mixed-precision auto")
    return None


# --- auto on a CPU with native bf16: measured (issue 33 case 15) ------------------------------------------------

PROBE_ENV = "BFCL_PRECISION_PROBE"
WARMUP_STEPS, TIMED_STEPS = 1, 3
PROBE_STEPS = WARMUP_STEPS + TIMED_STEPS  # steps of each precision the measurement runs
# bf16 is kept only where its step is at least this much faster than fp32's: fp32 is the safer numeric
# choice, and the forward and backward timed are not the whole step (loading, the optimizer, the gather
# and the momentum update cost the same in both), so a small measured gain shrinks in the run.
MARGIN = 1.05
CACHE_FORMAT = "bfcl-precision-1"
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16"}


def auto_is_measured(requested: str | None, device_type: str) -> bool:
    """True where `requested` leaves the precision to auto (resolve: 'auto', or None with no launcher
    setting) on a CPU that computes bf16 natively: the case the rule alone may get wrong. Elsewhere
    the rule stands: an explicit choice is kept, GPUs take bf16 where supported, and a CPU that
    emulates bf16 (about 9x slower) takes fp32 without timing it."""
    if requested is None:
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            return False
    elif requested != "auto":
        return False
    return device_type == "cpu" and cpu_has_native_bf16()


def choose(seconds: dict[str, float], margin: float = MARGIN) -> str:
    """'bf16' where a bf16 step takes at most 1/margin of an fp32 one (seconds per step, keys 'no' and
    'bf16'), else 'no'. Anything not a positive finite time (a failed measurement) gives 'no'."""
    fp32, bf16 = seconds["no"], seconds["bf16"]
    if not (math.isfinite(fp32) and math.isfinite(bf16) and fp32 > 0 and bf16 > 0):
        return "no"
    return "bf16" if fp32 / bf16 >= margin else "no"


def step_clock() -> Callable[[], float]:
    """What a step is timed with: with one thread per process (the small-image recipe), the process's
    CPU time, which another job on the machine barely moves (wall-clock time under a loaded machine
    measured 0.44x and 1.00x for the same step); with several threads, wall-clock time, since CPU time
    would add up the threads (and their spinning) instead of showing what parallelism gains."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def time_precisions(step: Callable[[str], None], warmup: int = WARMUP_STEPS,
                    timed: int = TIMED_STEPS, clock: Callable[[], float] | None = None) -> dict[str, float]:
    """Median seconds of `step(precision)` for 'no' and 'bf16': `warmup` untimed steps of each, then
    `timed` steps of each, interleaved (fp32, bf16, fp32, bf16, ...), so that a slow spell of the
    machine (another job, the clock) falls on both alike. clock: step_clock() unless given."""
    clock = clock or step_clock()
    for _ in range(warmup):
        for precision in ("no", "bf16"):
            step(precision)
    times: dict[str, list[float]] = {"no": [], "bf16": []}
    for _ in range(timed):
        for precision, spent in times.items():
            start = clock()
            step(precision)
            spent.append(clock() - start)
    return {precision: statistics.median(spent) for precision, spent in times.items()}


def cache_file() -> str:
    """$BFCL_CACHE/precision.json, else $XDG_CACHE_HOME/bfcl/precision.json, else ~/.cache/bfcl/precision.json."""
    root = os.environ.get("BFCL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "bfcl")
    return os.path.join(root, "precision.json")


def cache_key(processes: int, threads: int, model: str, image_size: int, local_batch: int) -> str:
    """What the measured answer depends on: the CPU, PyTorch (its kernels), processes x threads (the
    contention), the model (`model`: arch, stem or patch, BatchFormer, widths), image size and batch."""
    return (f"{cpu_name()} | torch {torch.__version__} | processes {processes} x threads {threads} | {model} | "
            f"{image_size} px | batch {local_batch} per process")


def _entries(path: str) -> dict:
    """The cache's entries; {} for a missing, unreadable or foreign file (never an error)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def read_cached(path: str, key: str) -> dict | None:
    """The entry cached under `key` ({"choice", "img_per_s": {"no", "bf16"}, "measured"}), or None where
    there is none or it is malformed."""
    entry = _entries(path).get(key)
    try:
        ok = entry["choice"] in ("no", "bf16") and all(
            isinstance(entry["img_per_s"][p], (int, float)) and math.isfinite(entry["img_per_s"][p])
            for p in ("no", "bf16"))
    except (TypeError, KeyError):
        ok = False
    return entry if ok else None


def write_cached(path: str, key: str, entry: dict) -> str | None:
    """Add `entry` under `key` (other keys kept), written atomically (a temporary renamed into place).
    None when written, else why not (the run goes on: the cache only saves a later run the measurement)."""
    entries = {**_entries(path), key: entry}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_open(path, encoding="utf-8") as f:
            json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=1)
    except OSError as e:
        return e.strerror or str(e)
    return None


def _describe(img_per_s: dict[str, float]) -> str:
    ratio = img_per_s["bf16"] / img_per_s["no"] if img_per_s["no"] > 0 else float("nan")
    return (f"bf16 {img_per_s['bf16']:.0f} img/s vs fp32 {img_per_s['no']:.0f} img/s ({ratio:.2f}x; "
            f"bf16 needs {MARGIN:g}x)")


def rule_fallback(why_not: str) -> tuple[str, str]:
    """(precision, why) where auto could not measure: today's rule, saying why it was not measured."""
    return "bf16", f"auto: not measured ({why_not}); native bf16 rule: this CPU computes bf16 ({cpu_capability()})"


def decide_auto(key: str, make_step: Callable[[], Callable[[str], None]], images_per_step: int,
                shape: str) -> tuple[str, str]:
    """(precision, why) for auto on a CPU with native bf16: the answer cached under `key`, else measured.

    make_step() builds what to time (a callable running one forward and backward in the precision it
    is given; it must not touch the run's model or random state); time_precisions times it. Under
    several processes (torch.distributed initialised) every process measures at once, as the run will
    contend, the slowest process's time counts (all-reduce max), and process 0's cache decides for all,
    so every process picks the same. A measurement that raises falls back on the rule, on every
    process. `images_per_step`: images per step over all processes; `shape`: the summary's words for it."""
    import torch.distributed as dist
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    main = not several or dist.get_rank() == 0
    path = cache_file()
    found = [read_cached(path, key) if main else None]
    if several:
        dist.broadcast_object_list(found, src=0)
    if found[0] is not None:
        entry = found[0]
        return entry["choice"], (f"auto: cached in {path} (measured {_describe(entry['img_per_s'])} on this CPU, "
                                 f"{shape}, {entry.get('measured', 'earlier')}); delete it to measure again")
    error = ""
    try:
        seconds = time_precisions(make_step())
    except Exception as e:  # noqa: BLE001 -- any failure to measure falls back on the rule
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        seconds = {"no": math.nan, "bf16": math.nan}
    values = torch.tensor([seconds["no"], seconds["bf16"], float(bool(error))], dtype=torch.float64)
    values = torch.nan_to_num(values, nan=math.inf)
    if several:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    if values[2] > 0 or not torch.isfinite(values[:2]).all():
        return rule_fallback(f"measuring failed: {error or 'on another process'}")
    seconds = {"no": float(values[0]), "bf16": float(values[1])}
    choice = choose(seconds)
    img_per_s = {p: images_per_step / s for p, s in seconds.items()}
    cached = ""
    if main:
        failed = write_cached(path, key, {"choice": choice, "img_per_s": {p: round(v, 1) for p, v in img_per_s.items()},
                                          "measured": time.strftime("%Y-%m-%d")})
        cached = f"; cached in {path}" if failed is None else f"; not cached ({failed})"
    clock = "CPU time" if step_clock() is time.process_time else "wall-clock"
    return choice, f"auto: measured {_describe(img_per_s)} on this CPU ({clock}), {shape}{cached}"
