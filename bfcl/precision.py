"""Which mixed precision to train in: `--mixed-precision auto` picks it from the hardware.

bf16 pays on a CPU only where it is computed natively (AVX512-BF16 or AMX); elsewhere PyTorch
emulates it, and a ResNet step runs about 9x slower than in fp32 (AMD EPYC Zen 3, AVX2 only:
3.0 against 28.1 images/s). On GPUs bf16 is used where supported, fp16 with a loss scaler
otherwise.

BFCL_CPU_BF16=0 or 1 overrides the CPU detection (to test either path on any machine).
"""

import os

import torch

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
