"""bench/continued_pretraining.py end to end at toy size on bfcl.synthetic data: the class split as list
files, source pretraining, (a) random init and (b) --init-from the source on the target half, (c) the source
as it is, kNN / fast-linear / fine-tuning on the target classes, and the report's numbers."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from bfcl.synthetic import make_image_folder
from test_quality_small import REPO


@pytest.mark.slow
@pytest.mark.e2e
def test_continued_pretraining_small(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=32, val_per_class=8, size=32)
    out = tmp_path / "out"
    cmd = [sys.executable, "bench/continued_pretraining.py", "--data", data, "--out", str(out), "--steps", "4",
           "--seeds", "1", "--fraction", "0.5", "--ft-steps", "2", "--ft-batch-size", "16", "--batch-size", "16",
           "--knn-points", "2", "--knn-samples", "16", "--fast-epochs", "3", "--procs", "1", "--precision", "no",
           "--train-args", "--mixed-precision no --moco-mlp-dim 64 --augment pil"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.load(open(out / "results.json"))

    # the split: the first two classes are the source, the others the target, disjoint, every train image once
    split = results["info"]["split"]
    assert split["source"]["classes"] == ["class_0", "class_1"] and split["target"]["classes"] == ["class_2", "class_3"]
    lists = {part: open(split[part]["list"]).read().split() for part in ("source", "target")}
    assert all(p.split("/")[1] in split["source"]["classes"] for p in lists["source"])
    assert all(p.split("/")[1] in split["target"]["classes"] for p in lists["target"])
    assert len(lists["source"]) == len(lists["target"]) == 64 and not set(lists["source"]) & set(lists["target"])
    assert sorted(os.listdir(os.path.join(split["target"]["folder"], "val"))) == ["class_2", "class_3"]

    # (b) started from the source backbone, (a) from scratch; both ran the same steps on the target list
    source = results["source"]["backbone"]
    pre = results["pretraining"]
    config = {arm: json.load(open(os.path.join(os.path.dirname(pre[arm][0]["backbone"]), "config.json")))
              for arm in ("a", "b")}
    assert config["a"]["config"]["init_from"] is None and config["b"]["config"]["init_from"] == source
    digest = hashlib.sha256(open(source, "rb").read()).hexdigest()
    assert digest in config["b"]["derived"]["initialised from"]
    assert all(c["config"]["train_list"] == split["target"]["list"] for c in config.values())
    assert pre["a"][0]["steps"] == pre["b"][0]["steps"] == results["source"]["steps"] == 4
    assert [p["step"] for p in pre["b"][0]["curve"]] == [0, 2, 4]

    # the report's numbers are the runs' numbers
    scores, ft, summary = results["scores"], results["finetune"], results["summary"]
    assert summary["knn_b_minus_a"] == [scores["b"][0]["knn_top1"] - scores["a"][0]["knn_top1"]]
    assert summary["knn_b_minus_c"] == [scores["b"][0]["knn_top1"] - scores["c"][0]["knn_top1"]]
    assert summary["finetune_b_minus_a"] == [ft["b"][0]["top1"] - ft["a"][0]["top1"]]
    final_a = pre["a"][0]["curve"][-1]["knn_top1"]
    reached = [p["step"] for p in pre["b"][0]["curve"] if p["knn_top1"] >= final_a]
    assert summary["steps_b_needs_for_a_final_monitor_knn"] == [reached[0] if reached else None]
    starts = {arm: ft[arm][0]["loaded"] for arm in ("a", "b", "c")}
    assert starts == {"a": pre["a"][0]["backbone"], "b": pre["b"][0]["backbone"], "c": source}
    assert all(r["steps"] == 2 for arm in ft.values() for r in arm)
    table = open(out / "results.md").read()
    assert f"| (c) source, not continued | 0 | – | {scores['c'][0]['knn_top1']:.1f} |" in table
