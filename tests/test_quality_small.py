"""bench/quality.py end to end on a few hundred real CIFAR-10 images (about a minute on 2 cores).

The full benchmark (make bench-quality, 15 minutes per run) does not belong in CI; this runs the
same pipeline, calibration, pretraining with and without BatchFormer, probes, tables and plot,
on a copied subset, and skips where the shared data folder is absent (a user's checkout).
"""

import json
import os
import random
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "cifar10"))
ROWS = ("random init", "MoCo v3", "MoCo v3 + BatchFormer")
# The toy size of the recipe. 24 px, not 16: with the ImageNet stem (32x down) a 16 px image reaches
# layer4.0.conv1 (3x3, stride 2, pad 1) as a 1x1 map, and on CPUs PyTorch's bf16 convolution (chosen by
# --mixed-precision auto on AVX512-BF16/AMX) returns a weight gradient with NaN or ~1e32 garbage for that
# shape (its eight taps that see only padding) in about half of the backward passes; LARS keeps a
# non-finite update (trust ratio 1) and the export held NaN. At 24 px layer4 gets a 2x2 map; fp32 is unaffected.
TOY_TRAIN_ARGS = "--image-size 24 --moco-mlp-dim 256"
# The budget per run. Start-up alone takes about 20 s on a loaded 2-core machine, and a run is stopped at
# 1.5 budgets: at 0.25 min a run could be stopped before its first step and leave no backbone. At 0.5 min
# the runs still plan their minimum of 10 steps, so they take no longer; the budget is only slack.
TOY_BUDGET_MIN = "0.5"


def copy_subset(dst: str, train_per_class: int, val_per_class: int) -> None:
    """A seeded subset of the CIFAR-10 ImageFolder, copied into dst (never into the repo)."""
    rng = random.Random(0)
    for part, n in (("train", train_per_class), ("val", val_per_class)):
        for cls in sorted(os.listdir(os.path.join(CIFAR, part))):
            files = sorted(os.listdir(os.path.join(CIFAR, part, cls)))
            os.makedirs(os.path.join(dst, part, cls))
            for name in rng.sample(files, n):
                shutil.copy(os.path.join(CIFAR, part, cls, name), os.path.join(dst, part, cls, name))


def table_rows(stdout: str) -> dict:
    """{row name: {column: cell}} of the first markdown table in stdout."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def planned_steps(run: dict) -> int:
    """The step count a run was planned for: its --epochs times the 400-image set's steps per epoch at its batch."""
    words = run["command"].split()
    batch = int(words[len(words) - 1 - words[::-1].index("-b") + 1])
    return round(float(words[words.index("--epochs") + 1]) * (400 // batch))


def assert_ran_as_planned(run: dict) -> None:
    """A budgeted run does its planned steps (at least 10), or fewer where a loaded machine made it overrun its
    budget and it was stopped; either way it learned something. 10 classes: chance is 10 %. A backbone that
    collapsed to a constant, or a probe that mixed up labels, lands there; 400 images for the bank are enough
    to sit well above it."""
    assert planned_steps(run) >= 10 and run["wall_s"] > 0 and 1 <= run["steps"] <= planned_steps(run), run
    assert (run["steps"] == planned_steps(run) and run["curve"]) or run["stopped_at_budget"], run
    assert run["knn_top1"] > 15, run


@pytest.mark.slow
@pytest.mark.e2e
def test_quality_bench_small(tmp_path):
    if not (os.path.isdir(os.path.join(CIFAR, "train")) and os.path.isdir(os.path.join(CIFAR, "val"))):
        pytest.skip(f"CIFAR-10 ImageFolder not found at {CIFAR} (see ../shared/data/README.md)")
    data, out = str(tmp_path / "cifar-small"), str(tmp_path / "out")
    copy_subset(data, train_per_class=40, val_per_class=20)
    cmd = [sys.executable, "bench/quality.py", "--data", data, "--out", out, "--budget-min", TOY_BUDGET_MIN,
           "--seeds", "1", "--batch-size", "32", "--train-args", TOY_TRAIN_ARGS, "--no-equal-steps",
           "--calibration-steps", "15", "--knn-points", "2",
           "--knn-samples", "100", "--fast-epochs", "20"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    rows = table_rows(r.stdout)
    assert tuple(rows) == ROWS
    assert all("kNN top-1" in row and "fast-linear top-1" in row for row in rows.values())
    results = json.load(open(os.path.join(out, "results.json")))
    runs = {run["name"]: run for run in results["runs"]}
    assert set(runs) == {"random-init", "moco", "bf"}
    for name in ("moco", "bf"):
        assert_ran_as_planned(runs[name])
    assert results["hardware"]["cores"] >= 1 and results["date"] and results["command"].endswith("--fast-epochs 20")
    assert "| MoCo v3 + BatchFormer |" in open(os.path.join(out, "results.md")).read()
    plot = ET.parse(os.path.join(out, "knn_curve.svg")).getroot()
    assert len(plot.findall("{http://www.w3.org/2000/svg}polyline")) == 4  # two runs, two panels
