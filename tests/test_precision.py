"""--mixed-precision auto: bf16 only where the hardware computes it, and a warning where an
explicit bf16 would be emulated (bfcl/precision.py). The capability query is monkeypatched, so
both paths run on any machine."""

import os
import subprocess
import sys

import pytest
import torch

from bfcl import auto_precision, precision
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
    ("1", None, "precision: bf16 (auto (no --mixed-precision, none from the launcher): not measured (--max-steps 1 is "
                "below the 4 steps of each precision timing needs); native bf16 rule: this CPU computes bf16", False),
])
def test_train_py_reports_its_choice(tiny_data, tmp_path, native, requested, summary, warned):
    cmd = [sys.executable, "train.py", "--data", tiny_data, "--output-dir", str(tmp_path), "-a", "resnet18",
           "--stem", "small", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "32", "--moco-dim", "16",
           "--workers", "0", "--epochs", "1", "--warmup-epochs", "0", "--max-steps", "1",
           *(["--mixed-precision", requested] if requested else [])]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}  # as under torchrun
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**env, "BFCL_CPU_BF16": native, "BFCL_PRECISION_PROBE": "1"})
    assert result.returncode == 0, result.stderr
    assert summary in result.stdout
    assert ("warning: --mixed-precision bf16 on a CPU without native bf16" in result.stdout) is warned


# --- auto measured on a CPU with native bf16 (issue 33 case 15) ---------------------------------------------------

@pytest.mark.parametrize("seconds, expected", [
    ({"no": 1.0, "bf16": 1.2}, "no"),  # fp32 faster (the AMX Xeon of the issue)
    ({"no": 1.0, "bf16": 0.625}, "bf16"),  # bf16 1.6x faster (the EPYC Zen 4)
    ({"no": 1.0, "bf16": 0.97}, "no"),  # 1.03x: within the margin, fp32
    ({"no": 1.0, "bf16": 1 / precision.MARGIN}, "bf16"),  # exactly the margin
    ({"no": float("nan"), "bf16": 0.5}, "no"), ({"no": 1.0, "bf16": 0.0}, "no"),  # no real measurement
])
def test_choose_bf16_only_beyond_the_margin(seconds, expected):
    assert precision.choose(seconds) == expected


def test_timing_interleaves_and_takes_the_median(monkeypatch):
    """Warm-up steps of each, then fp32 and bf16 alternating; each precision's median step time."""
    calls = []
    durations = {"no": iter([5, 1, 2]), "bf16": iter([1, 9, 3])}
    now = [0.0]

    def step(p):
        calls.append(p)
        if len(calls) > 2:  # timed steps only
            now[0] += next(durations[p])
    assert precision.time_precisions(step, warmup=1, timed=3, clock=lambda: now[0]) == {"no": 2, "bf16": 3}
    assert calls == ["no", "bf16"] * 4


def test_only_auto_on_a_bf16_native_cpu_is_measured(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.auto_is_measured("auto", "cpu") and precision.auto_is_measured(None, "cpu")
    assert not precision.auto_is_measured("bf16", "cpu") and not precision.auto_is_measured("no", "cpu")
    assert not precision.auto_is_measured("auto", "cuda")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # the launcher named one
    assert not precision.auto_is_measured(None, "cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # emulated bf16: fp32 without timing
    assert not precision.auto_is_measured("auto", "cpu")


def test_cache_round_trip_keys_and_damaged_files(tmp_path):
    path = str(tmp_path / "sub" / "precision.json")
    key = precision.cache_key(2, 1, "resnet18, imagenet stem", 32, 128)
    entry = {"choice": "no", "img_per_s": {"no": 135.0, "bf16": 110.0}, "measured": "2026-12-08"}
    assert precision.read_cached(path, key) is None  # no file yet
    assert precision.write_cached(path, key, entry) is None
    assert precision.read_cached(path, key) == entry
    for other in (precision.cache_key(2, 1, "resnet18, imagenet stem", 32, 64),  # another batch
                  precision.cache_key(2, 1, "resnet18, imagenet stem", 64, 128),  # another image size
                  precision.cache_key(1, 2, "resnet18, imagenet stem", 32, 128),  # another launch
                  precision.cache_key(2, 1, "resnet50, imagenet stem", 32, 128)):  # another model
        assert other != key and precision.read_cached(path, other) is None
    second = precision.cache_key(1, 1, "vit_tiny, patch 4", 32, 256)
    assert precision.write_cached(path, second, {**entry, "choice": "bf16"}) is None
    assert precision.read_cached(path, key) == entry and precision.read_cached(path, second)["choice"] == "bf16"
    assert not [n for n in os.listdir(tmp_path / "sub") if ".tmp-" in n]  # written through a temporary
    for damaged in (b"\xff\xfe not json", b"[1, 2]", b'{"format": "bfcl-precision-1", "entries": {"%s": '
                    b'{"choice": "fp64", "img_per_s": {}}}}' % key.encode()):
        with open(path, "wb") as f:
            f.write(damaged)
        assert precision.read_cached(path, key) is None  # ignored, no error
    assert precision.write_cached(path, key, entry) is None and precision.read_cached(path, key) == entry
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert precision.write_cached(str(blocked / "precision.json"), key, entry)  # why not, never an exception


def test_decide_auto_measures_then_reuses_the_cache_and_falls_back_on_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("BFCL_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "time_precisions", lambda step: {"no": 1.0, "bf16": 2.0})  # fp32 twice as fast
    chosen, why = precision.decide_auto("key", lambda: None, 256, "2 x batch 128 x 32 px")
    assert chosen == "no"
    assert why.startswith("auto: measured bf16 128 img/s vs fp32 256 img/s (0.50x; bf16 needs 1.05x) on this CPU (")
    assert why.endswith("), 2 x batch 128 x 32 px; cached in " + str(tmp_path / "precision.json"))

    def broken():
        raise AssertionError("a cached answer must not be measured again")
    chosen, why = precision.decide_auto("key", broken, 256, "2 x batch 128 x 32 px")
    assert chosen == "no" and why.startswith(f"auto: cached in {tmp_path / 'precision.json'} (measured bf16 128 img/s")

    def failing():
        raise RuntimeError("out of memory\nmore")
    chosen, why = precision.decide_auto("other key", failing, 256, "x")
    assert chosen == "bf16" and why.startswith("auto: not measured (measuring failed: RuntimeError: out of memory); "
                                               "native bf16 rule")
    assert precision.read_cached(str(tmp_path / "precision.json"), "other key") is None


def test_the_timing_leaves_the_run_untouched():
    """The probe's step runs on its own copy of the model and its own views: the global RNG stream (which
    the run's model init, BatchFormer's dropout and the data use) and a model built before it are unchanged."""
    import train
    config, _ = train.with_recipe(train.parse_args(["--data", "x", "-a", "resnet18", "--stem", "small", "--image-size",
                                                    "16", "-b", "4", "--moco-mlp-dim", "32", "--moco-dim", "16",
                                                    "--add_bf", "1"]))
    torch.manual_seed(1)
    real = auto_precision.MoCo("resnet18", "small", 16, 32, batchformer=True, image_size=16)
    before = {k: v.clone() for k, v in real.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = precision.time_precisions(auto_precision.precision_probe_step(config, 4, "pairs-sum"), warmup=1, timed=1)
    assert set(seconds) == {"no", "bf16"} and all(s > 0 for s in seconds.values())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in real.state_dict().items())


def _config(tmp_path, *extra):
    import train
    argv = ["--data", "x", "--output-dir", str(tmp_path), "-a", "resnet18", "--image-size", "32", "-b", "256", *extra]
    return train.with_recipe(train.parse_args(argv))[0]


def test_resume_keeps_the_precision_it_trained_in(monkeypatch, tmp_path):
    """A checkpoint records its precision; a resume under auto takes it without measuring, even where this
    machine would choose otherwise, and a checkpoint written before the record (a torchrun run without a
    flag before case 14: fp32) is read from its run's config.json."""
    from bfcl.checkpoint import save_checkpoint
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # the rule would say bf16
    monkeypatch.setattr(auto_precision, "decide_auto", lambda *a: pytest.fail("a resume must not measure"))
    save_checkpoint(str(tmp_path), 4, {"w": torch.zeros(1)}, {}, {"config": {}, "precision": "no"}, keep=0)
    chosen, why = auto_precision.decide_precision(_config(tmp_path), None, 2, None, "cpu", "bf16", "auto: rule")
    assert chosen == "no" and why.startswith("auto (no --mixed-precision, none from the launcher): kept from ")
    assert "step-00000004" in why
    save_checkpoint(str(tmp_path), 8, {"w": torch.zeros(1)}, {}, {"config": {}}, keep=0)  # nothing recorded ...
    (tmp_path / "config.json").write_text('{"derived": {"precision": "no (accelerate launch\'s setting: no)"}}')
    assert auto_precision.decide_precision(_config(tmp_path), None, 2, "auto", "cpu", "bf16", "auto: rule")[0] == "no"
    # explicit choices and a fresh start are not the resume's business here (resume_checkpoint compares them)
    assert auto_precision.decide_precision(_config(tmp_path), None, 2, "bf16", "cpu", "bf16", "asked for") == \
        ("bf16", "asked for")


def test_resume_compares_the_precision_used_not_the_flag(tmp_path):
    from bfcl.checkpoint import resume_checkpoint, save_checkpoint
    from bfcl.errors import CheckpointError
    meta = {"config": {"mixed_precision": None, "lr": 0.1}, "precision": "no"}
    save_checkpoint(str(tmp_path), 4, {"w": torch.zeros(1)}, {}, meta, keep=0)
    args = (str(tmp_path), "auto")
    # another flag, the same precision: resumed
    assert resume_checkpoint(*args, {"mixed_precision": "no", "lr": 0.1}, set(), False, 8, precision="no")[0]
    # the same flag (none), another precision (auto would now pick bf16): refused, unless forced
    with pytest.raises(CheckpointError, match="precision: trained in 'no', this run's 'bf16'"):
        resume_checkpoint(*args, {"mixed_precision": None, "lr": 0.1}, set(), False, 8, precision="bf16")
    assert resume_checkpoint(*args, {"mixed_precision": None, "lr": 0.1}, set(), True, 8, precision="bf16")[0]


@pytest.mark.parametrize("extra, env, reason", [
    (["--max-steps", "2"], {}, "not measured (--max-steps 2 is below the 4 steps of each precision timing needs); "
                               "native bf16 rule"),
    ([], {"BFCL_PRECISION_PROBE": "0"}, "not measured (BFCL_PRECISION_PROBE=0); native bf16 rule"),
])
def test_where_measuring_cannot_run_the_rule_decides_and_says_so(monkeypatch, tmp_path, extra, env, reason):
    monkeypatch.setenv("BFCL_PRECISION_PROBE", "1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(auto_precision, "decide_auto", lambda *a: pytest.fail("must not measure"))
    chosen, why = auto_precision.decide_precision(_config(tmp_path, *extra), None, 2, "auto", "cpu", "bf16",
                                                  "auto: rule")
    assert chosen == "bf16" and why.startswith("auto: " + reason)


@pytest.mark.slow
def test_train_py_measures_records_and_reuses_its_choice(tiny_data, tmp_path):
    """auto on a bf16-native CPU (forced): the summary names the measurement, config.json and the
    checkpoint record the precision chosen, a second run reads the cache, and the losses are those of a run
    given that precision explicitly (the timing changed nothing of the run)."""
    import json
    import re
    from scripts import ENV, train_cmd
    env = {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}, **ENV,  # as torchrun
           "BFCL_CPU_BF16": "1", "BFCL_PRECISION_PROBE": "1", "BFCL_CACHE": str(tmp_path / "cache")}
    run = lambda cmd: subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    measured = run(train_cmd(tiny_data, tmp_path / "a", "--mixed-precision", "auto", "--max-steps", "4"))
    assert measured.returncode == 0, measured.stdout + measured.stderr
    line = re.search(r"precision: (\w+) \(auto: measured bf16 \d+ img/s vs fp32 \d+ img/s \([\d.]+x; bf16 needs "
                     r"1.05x\) on this CPU \(CPU time\), 1 x batch 8 x 16 px; cached in (\S+)\)", measured.stdout)
    assert line, measured.stdout
    chosen = line.group(1)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["precision"] == chosen
    meta = json.loads((tmp_path / "a" / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert meta["precision"] == chosen
    cache = json.loads((tmp_path / "cache" / "precision.json").read_text())["entries"]
    assert [e["choice"] for e in cache.values()] == [chosen]

    cached = run(train_cmd(tiny_data, tmp_path / "b", "--mixed-precision", "auto", "--max-steps", "4"))
    assert cached.returncode == 0 and f"precision: {chosen} (auto: cached in " in cached.stdout, cached.stdout
    fixed = run(train_cmd(tiny_data, tmp_path / "c", "--mixed-precision", chosen, "--max-steps", "4"))
    assert fixed.returncode == 0, fixed.stderr
    losses = lambda out: [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl"))]
    assert losses(tmp_path / "a") == losses(tmp_path / "c") == losses(tmp_path / "b")
