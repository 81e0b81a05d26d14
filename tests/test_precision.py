"""--mixed-precision auto: bf16 only where the hardware computes it, and a warning where an
explicit bf16 would be emulated (bfcl/precision.py). The capability query is monkeypatched, so
both paths run on any machine."""

import os
import subprocess
import sys

import pytest
import torch

from bfcl import precision
from bfcl.synthetic import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags, capability, native", [
    ({"avx2", "fma"}, "AVX2", False),
    ({"avx512f", "avx512bw"}, "AVX512", False),  # AVX-512 without its bf16 extension emulates bf16
    ({"avx512f", "avx512_bf16"}, "AVX512-BF16", True),
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AMX", True),
])
def test_native_bf16_from_cpu_flags(monkeypatch, flags, capability, native):
    monkeypatch.delenv("BFCL_CPU_BF16", raising=False)
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if "avx512f" in flags else "AVX2")
    assert precision.cpu_capability() == capability
    assert precision.cpu_has_native_bf16() is native


def test_environment_overrides_the_detection(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2"})
    monkeypatch.setenv("BFCL_CPU_BF16", "1")
    assert precision.cpu_has_native_bf16()
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"amx_bf16"})
    monkeypatch.setenv("BFCL_CPU_BF16", "0")
    assert not precision.cpu_has_native_bf16()


@pytest.mark.parametrize("native, expected", [(False, "no"), (True, "bf16")])
def test_auto_on_a_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    chosen, why = precision.resolve("auto", "cpu")
    assert chosen == expected
    assert why.startswith("auto: ") and ("natively" in why) is native


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert precision.resolve("auto", "cuda")[0] == expected


def test_explicit_choices_are_kept_and_none_defers_to_the_launcher(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve("no", "cpu") == ("no", "asked for")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch names one
    assert precision.resolve(None, "cpu") == (None, "accelerate launch's setting: no")
    chosen, why = precision.resolve("bf16", "cpu")  # honoured, with the reason it is slow
    assert chosen == "bf16" and "emulated" in why


@pytest.mark.parametrize("native, expected", [(False, "no"), (True, "bf16")])
def test_no_flag_and_no_launcher_setting_is_auto(monkeypatch, native, expected):
    """torchrun or plain python set no ACCELERATE_MIXED_PRECISION: the default is auto, not fp32."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    chosen, why = precision.resolve(None, "cpu")
    assert chosen == expected and why.startswith("auto (no --mixed-precision, none from the launcher): ")


def test_warning_only_for_emulated_bf16_on_a_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    warning = precision.emulated_bf16_warning("bf16", "cpu")
    assert warning.startswith("warning: --mixed-precision bf16") and "auto" in warning and "\n" not in warning
    assert precision.emulated_bf16_warning("no", "cpu") is None
    assert precision.emulated_bf16_warning("bf16", "cuda") is None
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.emulated_bf16_warning("bf16", "cpu") is None


def test_launch_device_type_honours_accelerate_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert precision.launch_device_type() == "cuda"
    assert precision.launch_device_type(cpu=True) == "cpu"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert precision.launch_device_type() == "cpu"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision-data")
    make_image_folder(str(root), classes=2, train_per_class=8, val_per_class=2, size=16)
    return str(root)


@pytest.mark.slow
@pytest.mark.parametrize("native, requested, summary, warned", [
    ("0", "auto", "precision: no (auto: fp32, this CPU", False),
    ("0", "bf16", "precision: bf16 (asked for; this CPU", True),
    ("1", None, "precision: bf16 (auto (no --mixed-precision, none from the launcher): this CPU computes", False),
])
def test_train_py_reports_its_choice(tiny_data, tmp_path, native, requested, summary, warned):
    cmd = [sys.executable, "train.py", "--data", tiny_data, "--output-dir", str(tmp_path), "-a", "resnet18",
           "--stem", "small", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "32", "--moco-dim", "16",
           "--workers", "0", "--epochs", "1", "--warmup-epochs", "0", "--max-steps", "1",
           *(["--mixed-precision", requested] if requested else [])]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}  # as under torchrun
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**env, "BFCL_CPU_BF16": native})
    assert result.returncode == 0, result.stderr
    assert summary in result.stdout
    assert ("warning: --mixed-precision bf16 on a CPU without native bf16" in result.stdout) is warned
