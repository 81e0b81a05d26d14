"""bench/longtail.py end to end at toy size on bfcl.synthetic data: the long-tailed list written once and
trained on by every run (train.py --train-list, probe.py --imbalance: the same SHA-256), pretraining arms
at equal steps with kNN by group, fine-tuning arms (start x loss x BatchFormer head) at equal steps, the
tables, results.json, the paired answers and the plot."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from bfcl.synthetic import make_image_folder
from scripts import correct_of
from test_downstream_small import markdown_rows
from test_quality_small import REPO


@pytest.mark.slow
@pytest.mark.e2e
def test_longtail_small(tmp_path):
    """4 classes of 40 at R 4: 40, 25, 15, 10 images; three pretraining arms of 4 steps, eight fine-tuning
    runs of 2 steps (11 minutes on 2 cores busy with a benchmark)."""
    data = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=40, val_per_class=8, size=32)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "bench/longtail.py", "--data", data, "--out", out, "--imbalance", "4", "--pretrain-steps",
           "4", "--batch-size", "16", "--knn-samples", "16", "--knn-points", "1", "--ft-starts", "moco",
           "--ft-steps", "2", "--ft-batch-size", "16", "--seeds", "1", "--max-seeds", "1", "--procs", "1",
           "--precision", "no"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    results = json.load(open(os.path.join(out, "results.json")))
    subset = results["subset"]
    assert sorted(subset["per_class"].values(), reverse=True) == [40, 25, 15, 10] and subset["size"] == 90
    listed = open(os.path.join(out, "train_list.txt")).read().splitlines()
    assert len(listed) == 90
    pre = {p["arm"]: p for p in results["pretraining"]}
    assert set(pre) == {"moco", "released", "after-warmup"}
    for arm, p in pre.items():
        run_dir = os.path.join(out, "runs", "pretrain", arm, "seed0")
        steps = [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        assert steps[-1] == 4  # equal steps
        assert "--train-list" in p["command"] and ("--add_bf 1" in p["command"]) == (arm != "moco")
        assert ("--bf-start-epoch" in p["command"]) == (arm == "after-warmup")
        knn = json.load(open(os.path.join(run_dir, "knn", "results.json")))
        assert knn["subset"]["sha256"] == subset["sha256"] and knn["val_samples"] == 32  # val/ balanced
        correct_of(p["knn"]["top1"], 32)
        assert {n for n, _ in p["knn"]["per_class"].values()} == {40, 25, 15, 10}
    # the pretraining runs read exactly the listed images
    log = open(os.path.join(out, "runs", "pretrain", "moco", "seed0", "train.log")).read()
    assert f"list file {os.path.join(out, 'train_list.txt')}: 90 images" in log

    runs = {(x["start"], x["loss"], x["bf"]): x for x in results["finetune"]}
    assert set(runs) == {(s, loss, bf) for s in ("moco", "random-init") for loss in ("ce", "balanced-softmax")
                         for bf in (False, True)}
    for (start, loss, bf), x in runs.items():
        assert x["steps"] == 2 and x["seed"] == 0
        assert ("--bf-head 1" in x["command"]) == bf and f"--loss {loss}" in x["command"]
        assert x["loaded"] == ("random-init" if start == "random-init" else pre["moco"]["backbone"])
        correct_of(x["top1"], 32)
        for group in ("many", "medium", "few"):
            assert x[group] is not None
    answers = results["answers"]
    assert set(answers["pretrained_minus_random"]) == {"pretrained (moco) - random init, CE"}
    diffs = results["paired_differences"]["Balanced Softmax - CE, moco"]["top1"]
    assert diffs == [runs["moco", "balanced-softmax", False]["top1"] - runs["moco", "ce", False]["top1"]]

    text = open(os.path.join(out, "results.md")).read()
    knn_rows = markdown_rows(text, "| arm | overall |")
    assert [row[0] for row in knn_rows] == ["moco", "released", "after-warmup"]
    assert float(knn_rows[0][1]) == pytest.approx(pre["moco"]["knn"]["top1"], abs=0.051)
    ft_rows = markdown_rows(text, "| start | loss | BatchFormer head |")
    assert len(ft_rows) == 8 and float(ft_rows[0][3]) == pytest.approx(runs["moco", "ce", False]["top1"], abs=0.051)
    svg = ET.parse(os.path.join(out, "longtail.svg")).getroot()
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 3 + 8 and all(len(line.get("points").split()) == 4 for line in lines)  # a point a class
