"""Never lose a run: kills, signals, corrupt checkpoints, corrupt images, and bad settings.

Whole-script tests run train.py in a subprocess on a tiny generated dataset; validation tests
call train.main() in-process, where `fail` raises SystemExit with the one-line message.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import bfcl.runs
import train
from bfcl.errors import ConfigError
from bfcl.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from bfcl.views import PretrainDataset, pretrain_views
from bfcl.synthetic import make_image_folder
from scripts import REPO, STEPS, assert_same_weights, checkpoint_steps, final_weights, metrics, run, start, train_cmd
from scripts import TINY as SCRIPT_TINY

TINY = ["-a", "resnet18", "--stem", "imagenet", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "64",
        "--moco-dim", "32", "--workers", "0", "--log-every", "1", "--add_bf", "1", "--lr", "0.3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=12,
                             val_per_class=4, size=16)


def run_train(data, out, *extra):
    return run(train_cmd(data, out, *extra, settings=TINY))


def logged_steps(out) -> int:
    """Complete lines in metrics.jsonl so far (a run may be writing the next one)."""
    path = os.path.join(out, "metrics.jsonl")
    return open(path).read().count("\n") if os.path.exists(path) else 0


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_then_sigkill_mid_run_then_resume_match_the_uninterrupted_run(tiny_data, straight_run, tmp_path):
    """SIGTERM mid-epoch: a checkpoint, exit 75, and the losses so far are the uninterrupted run's.
    The resumed run is then killed (SIGKILL) after its next checkpoint; the last resume ends with the
    uninterrupted run's losses and weights (scripts.TINY: 8 steps)."""
    cmd = train_cmd(tiny_data, tmp_path, "--save-every", "2")
    reference = {r["step"]: r["loss"] for r in metrics(straight_run)}

    proc = start(cmd)
    wait_for(lambda: logged_steps(tmp_path) >= 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == train.EXIT_PREEMPTED, out
    assert "stopped by a signal" in out
    stopped_at = metrics(tmp_path)[-1]["step"]
    assert 0 < stopped_at < STEPS - 2, "the signal should land mid-run"
    assert checkpoint_steps(tmp_path)[-1] == stopped_at
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == [(s, reference[s]) for s in range(1, stopped_at + 1)]

    proc = start(cmd)
    wait_for(lambda: checkpoint_steps(tmp_path)[-1] > stopped_at)
    proc.kill()
    out, _ = proc.communicate(timeout=120)
    assert f"(step {stopped_at})" in out
    assert proc.returncode == -signal.SIGKILL, "the kill should land before the end of the run"

    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "scratch" not in resumed.stdout
    # each step once: the resume dropped what the killed run logged after its last checkpoint
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == sorted(reference.items())
    assert_same_weights(final_weights(tmp_path), final_weights(straight_run))


KILLER = r"""
import sys, torch
from bfcl.checkpoint import save_checkpoint
out = sys.argv[1]
big = {"w": torch.randn(1_500_000)}
print("ready", flush=True)
for step in range(1, 10_000):
    save_checkpoint(out, step, big, {"w.mu": big["w"] * 0}, {"config": {}}, keep=2)
"""


@pytest.mark.slow
def test_sigkill_while_writing_checkpoints_leaves_a_loadable_one(tmp_path):
    """SIGKILL at arbitrary moments of a save loop: the newest complete checkpoint always loads."""
    for delay in (0.6, 0.85, 1.1, 1.45):
        proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        path = latest_checkpoint(str(tmp_path))
        assert path is not None
        from bfcl.checkpoint import load_checkpoint
        model, optimizer, meta = load_checkpoint(path)  # verifies size and SHA-256
        assert model["w"].shape == (1_500_000,) and meta["step"] == int(path[-8:])
    # a later save cleans up the temporary directories the kills left behind
    save_checkpoint(str(tmp_path), 99_999, {"w": torch.zeros(1)}, {}, {"config": {}}, keep=1)
    assert [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith(".")] == []


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_skipped_in_auto_mode_and_an_error_when_named(tiny_data, straight_run,
                                                                                   tmp_path):
    shutil.copytree(straight_run / "checkpoints", tmp_path / "checkpoints")  # steps 4 and 8
    older, newest = list_checkpoints(str(tmp_path))[-2:]
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\x00" * 100)
    named = error_of(["--data", tiny_data, "--output-dir", str(tmp_path / "other"), *SCRIPT_TINY, "--resume", newest])
    assert named.startswith("error: ") and "SHA-256" in named

    auto = run(train_cmd(tiny_data, tmp_path))
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "SHA-256" in auto.stderr and f"{older} (step 4)" in auto.stdout
    assert metrics(tmp_path) and [(r["step"], r["loss"]) for r in metrics(tmp_path)] == \
        [(r["step"], r["loss"]) for r in metrics(straight_run)][4:]  # steps 5-8 again, as they were


def test_corrupt_jpeg_is_replaced_and_counted(tmp_path):
    root = make_image_folder(str(tmp_path), classes=2, train_per_class=3, val_per_class=1, size=16)
    broken = os.path.join(root, "train", "class_0", "00001.jpg")
    with open(broken, "r+b") as f:
        f.truncate(60)  # a truncated JPEG: opens, fails to decode
    dataset = PretrainDataset(os.path.join(root, "train"), pretrain_views(16, blur=False))
    assert dataset.folder.path(1) == broken
    v1, v2, label, failed = dataset[(1, 123)]
    assert failed == 1 and v1.shape == (3, 16, 16) and label == 0  # replaced by 00002.jpg, same class
    reference = dataset[(2, 123)]
    assert torch.equal(v1, reference[0]) and torch.equal(v2, reference[1]) and reference[3] == 0


@pytest.mark.slow
def test_training_counts_bad_images_and_stops_above_the_threshold(tmp_path):
    root = make_image_folder(str(tmp_path / "data"), classes=2, train_per_class=8, val_per_class=1, size=16)
    for i in range(4):
        with open(os.path.join(root, "train", "class_0", f"{i:05d}.jpg"), "wb") as f:
            f.write(b"not a jpeg")
    ok = run_train(root, tmp_path / "ok", "--epochs", "1", "--warmup-epochs", "0", "--max-bad-image-share", "0.9")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    records = [json.loads(line) for line in open(tmp_path / "ok" / "metrics.jsonl")]
    assert records[-1]["bad_images"] > 0
    assert "unreadable images" in ok.stdout

    strict = run_train(root, tmp_path / "strict", "--epochs", "1", "--warmup-epochs", "0")
    assert strict.returncode == 1
    assert "image reads failed" in strict.stderr and "--max-bad-image-share" in strict.stderr


def error_of(argv) -> str:
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = str(e.value.code)
    assert "\n" not in message.strip(), "errors must be one line"
    return message


@pytest.mark.parametrize("extra, expected", [
    (["--warmup-epochs", "3", "--epochs", "3"], "--warmup-epochs 3 must be shorter than --epochs 3"),
    (["-b", "1", "--add_bf", "1"], "BatchFormer needs at least 2 samples per process"),
    (["-b", "10000"], "do not fill one global batch"),
])
def test_settings_refused_before_any_work(data, tmp_path, extra, expected):
    argv = ["--data", data, "--output-dir", str(tmp_path), *TINY[:-4], *extra]
    assert expected in error_of(argv)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_batch_not_divisible_by_processes(tmp_path):
    args = train.parse_args(["--data", "x", "-b", "10", "--output-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        train.validate(args, num_processes=3, bf_loss=None, knn=("off", None))


def test_unknown_arch_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "x", "-a", "resnet5"])
    assert "invalid choice: 'resnet5'" in capsys.readouterr().err


def test_unwritable_output_dir(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "is not writable" in error_of(["--data", data, "--output-dir", str(blocker / "run"), *TINY])


def test_too_little_disk(data, tmp_path, monkeypatch):
    monkeypatch.setattr(bfcl.runs.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=0, free=1000))
    message = error_of(["--data", data, "--output-dir", str(tmp_path), *TINY])
    assert "GiB free" in message and "choose another --output-dir" in message


@pytest.mark.parametrize("layout, expected", [
    ({}, "holds no images"),  # no train/: any folder of images, searched recursively
    ({"train/readme.txt": b""}, "has no class subfolders"),
    ({"train/cat/a.jpg": None, "train/dog/notes.txt": b""}, "class folders without images (dog)"),
])
def test_bad_data_folders(tmp_path, layout, expected):
    root = tmp_path / "data"
    root.mkdir()
    for rel, content in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            make_image_folder(str(tmp_path / "one"), classes=1, train_per_class=1, val_per_class=0, size=8)
            os.replace(tmp_path / "one" / "train" / "class_0" / "00000.jpg", path)
        else:
            path.write_bytes(content)
    assert expected in error_of(["--data", str(root), "--output-dir", str(tmp_path / "out"), *TINY])


@pytest.mark.slow
def test_resume_refuses_changed_settings_unless_forced(tiny_data, straight_run, tmp_path):
    shutil.copytree(straight_run / "checkpoints" / "step-00000004", tmp_path / "checkpoints" / "step-00000004")
    changed = error_of(["--data", tiny_data, "--output-dir", str(tmp_path), *SCRIPT_TINY, "--max-steps", "5", "--lr",
                        "0.5", "-a", "resnet34"])
    assert "--lr 0.6 -> 0.5" in changed and "--arch 'resnet18' -> 'resnet34'" in changed
    assert checkpoint_steps(tmp_path) == [4]
    forced = run(train_cmd(tiny_data, tmp_path, "--max-steps", "5", "--lr", "0.5", "--force-resume"))
    assert forced.returncode == 0, forced.stderr
    assert "(step 4)" in forced.stdout and checkpoint_steps(tmp_path)[-1] == 5
