"""bench/gpu.sh --tiny: the GPU benchmark's whole sequence on a CPU at toy size (ResNet-18 small stem
and ViT-Tiny at 32 px, a few steps), so that the script cannot rot between runs on a GPU machine.
About two minutes on 2 cores."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.e2e
def test_gpu_script_tiny_runs_every_section(tmp_path):
    out = tmp_path / "gpu-tiny"
    env = {**os.environ, "OUT": str(out), "BIN": os.path.dirname(sys.executable)}
    r = subprocess.run(["bash", "bench/gpu.sh", "--tiny"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = [json.loads(line) for line in open(out / "results.jsonl")]
    by_mode = {}
    for result in results:
        by_mode.setdefault(result["mode"], []).append(result)

    # 128 JPEGs of 32 px, in 8 class folders, deleted at the end with the runs' checkpoints
    assert by_mode["jpegs"] == [{"mode": "jpegs", "root": str(out / "data"), "count": 128, "size": 32}]
    assert not (out / "data").exists() and not list(out.glob("run-*/checkpoints"))

    # 1. the bare step: ResNet-18 without and with cudnn.benchmark, then ViT-Tiny; BatchFormer off, then on
    synthetic = by_mode["synthetic"]
    assert [(s["arch"], s["bf"], s["cudnn_benchmark"]) for s in synthetic] == [
        ("resnet18", "off", False), ("resnet18", "pairs-sum", False),
        ("resnet18", "off", True), ("resnet18", "pairs-sum", True),
        ("vit_tiny", "off", False), ("vit_tiny", "pairs-sum", False)]
    for s in synthetic:
        assert s["size"] == 32 and s["precision"] == "bf16" and s["memory"] == "peak RSS", s
        assert s["img_per_s"] > 0 and 0 < s["peak_memory_gib"] < 64, s
        assert set(s["phases_ms"]) == {"forward", "backward", "optimizer", "momentum update"}
        assert all(ms > 0 for ms in s["phases_ms"].values()), s

    # 2./3. train.py on the JPEGs: PIL views with BatchFormer off and on, batched views, then the sync check
    trainer = by_mode["trainer"]
    assert len(trainer) == 4
    flags = [t["args"] for t in trainer]
    assert "--add_bf 0" in flags[0] and "--add_bf 1" in flags[1] and "--augment batched" in flags[2]
    for t in trainer:
        assert t["exit"] == 0 and t["img_per_s"] > 0 and t["data_wait_s"] >= 0, t
    # steps 3-6 timed after 2 warm-up steps, logged every 2; the sync run logs every 3 and stops at 6
    assert [tuple(t["steps"]) for t in trainer] == [(3, 6), (3, 6), (3, 6), (4, 6)]
    assert trainer[3]["host_syncs_by_line"] == "not checked (no CUDA)"
    for name in ("pil-bf0", "pil-bf1", "batched-bf1", "sync"):
        metrics = [json.loads(line) for line in open(out / f"run-{name}" / "metrics.jsonl")]
        assert metrics[-1]["step"] == 6

    # 4. the batched augmentation alone: two views per image
    (augment,) = by_mode["augment"]
    assert augment["device"] == "cpu" and augment["batch"] == 16 and augment["views_per_s"] > 0
    assert augment["views_per_s"] == pytest.approx(2 * 16 / (augment["ms_per_batch"] / 1000))

    # the closing table names every measurement, one line each
    log = (out / "log.txt").read_text()
    table = log[log.index("table:"):]
    assert table.count("bare step, synthetic views") == 6 and table.count("train.py, JPEGs") == 4
    assert "batched augmentation alone on cpu" in table
