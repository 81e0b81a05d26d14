"""bench/downstream.py end to end at toy size on bfcl.synthetic data: label subsets, kNN and fast-linear,
fine-tuning from both starts with and without BatchFormer, the table, results.json and the plot; the
random-init arm's commands loading no weights (probe.py in this process, make test); and the guard that
stops the benchmark when both arms loaded the same weights."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from bfcl.export import export_backbone
from bfcl.model import MoCo
from bfcl.synthetic import make_image_folder
from scripts import correct_of
from test_quality_small import REPO


def markdown_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with header_start."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
@pytest.mark.e2e
def test_downstream_small(tmp_path):
    """Half the labels of a 4-class toy set (five probe.py processes, about a minute on 2 idle cores)."""
    data = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=40, val_per_class=8, size=32)
    torch.manual_seed(1)
    export = str(tmp_path / "backbone.safetensors")
    export_backbone(MoCo("resnet18", "imagenet", 16, 32).state_dict(), export, arch="resnet18", stem="imagenet",
                    image_size=32, step=1)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "bench/downstream.py", "--data", data, "--out", out, "--pretrained", export,
           "--fractions", "0.5", "--ft-min", "1", "--ft-steps", "3", "--bf-fractions", "0.5", "--bf-starts",
           "pretrained", "--seeds", "1", "--batch-size", "16", "--procs", "1", "--fast-epochs", "5",
           "--precision", "no"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    results = json.load(open(os.path.join(out, "results.json")))
    quick = {q["start"]: q for q in results["quick"]}
    assert set(quick) == {"pretrained", "random-init"}
    assert quick["pretrained"]["loaded"] == export and quick["random-init"]["loaded"] == "random-init"
    # The two arms' features differ: they would be equal if both had loaded the same weights.
    assert quick["pretrained"]["features_sha256"] != quick["random-init"]["features_sha256"]

    runs = {(x["start"], x["bf"]): x for x in results["finetune"]}
    assert set(runs) == {("pretrained", False), ("random-init", False), ("pretrained", True)}
    assert all(x["steps"] == 3 and x["seed"] == 0 for x in runs.values())
    for x in runs.values():  # 4 x 8 val images: each top-1 a count of 32
        correct_of(x["top1"], 32)
    assert all(x["loaded"] == (export if x["start"] == "pretrained" else "random-init") for x in runs.values())
    assert ["--add_bf" in x["command"] for x in runs.values()] == [bf for _, bf in runs]
    # each start with its own recipe
    assert {x["recipe"] for x in runs.values() if x["start"] == "pretrained"} == {"simclr-semi-supervised"}
    assert runs["random-init", False]["recipe"] == "torchvision-resnet"
    # 4 classes x 40 images: the class-balanced half is 20 a class, the same images in every run
    subsets = [x["subset"] for x in [*quick.values(), *runs.values()]]
    assert all(s["train_samples"] == 80 and s["subset"]["per_class"] == {f"class_{c}": 20 for c in range(4)}
               for s in subsets)
    assert len({s["subset"]["sha256"] for s in subsets}) == 1
    diffs = results["paired_top1_differences"]["0.5"]
    assert diffs["pretrained_minus_random"] == [runs["pretrained", False]["top1"] - runs["random-init", False]["top1"]]
    assert diffs["bf_minus_plain_pretrained"] == [runs["pretrained", True]["top1"] - runs["pretrained", False]["top1"]]
    assert diffs["bf_minus_plain_random-init"] == []

    table = markdown_rows(open(os.path.join(out, "results.md")).read(), "| labels (images) |")
    assert [row[:2] for row in table] == [["50 % (80)", "pretrained"], ["50 % (80)", "random-init"]]
    for (_, start, knn, fast, ft, ft_bf) in table:
        assert float(knn) == pytest.approx(quick[start]["knn_top1"], abs=0.051)
        assert float(fast) == pytest.approx(quick[start]["fast_linear_top1"], abs=0.051)
        assert float(ft) == pytest.approx(runs[start, False]["top1"], abs=0.051)
        assert ft_bf == ("–" if start == "random-init" else f"{runs[start, True]['top1']:.1f}")
    svg = ET.parse(os.path.join(out, "downstream.svg")).getroot()
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 7  # 2 starts x 3 methods, + BatchFormer


def test_random_init_arm_loads_no_weights(tmp_path, monkeypatch):
    """bench/downstream.py's main with probe.py run in this process at toy size: every command of the
    random-init arm (kNN/fast-linear and fine-tuning, with and without BatchFormer) has --random-init
    and no --pretrained, every pretrained one loads the export, and the two arms' features differ."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import downstream
    import probe
    from test_probe import colour_folder

    commands = []

    def probe_here(cmd, log_path, env, stop_after_s=None):
        assert cmd[:2] == [sys.executable, "probe.py"]  # --procs 1: no launcher
        commands.append(cmd)
        assert probe.main(cmd[2:]) == 0
        return {"start": 0.0, "wall_s": 1.0, "stopped_at_budget": False}

    monkeypatch.setattr(downstream, "run", probe_here)
    data = colour_folder(str(tmp_path / "data"), train_per_class=8, val_per_class=2, size=16)
    torch.manual_seed(1)
    export = str(tmp_path / "backbone.safetensors")
    export_backbone(MoCo("resnet18", "small", 16, 32).state_dict(), export, arch="resnet18", stem="small",
                    image_size=16, step=1)
    out = str(tmp_path / "out")
    assert downstream.main(["--data", data, "--out", out, "--pretrained", export, "--fractions", "0.5",
                            "--ft-min", "1", "--ft-steps", "1", "--bf-fractions", "0.5", "--bf-starts", "random-init",
                            "--seeds", "1", "--batch-size", "8", "--procs", "1", "--fast-epochs", "2",
                            "--precision", "no", "--image-size", "16"]) == 0

    arms = {"random-init": [c for c in commands if "/random-init" in c[c.index("--output-dir") + 1]],
            "pretrained": [c for c in commands if "/pretrained" in c[c.index("--output-dir") + 1]]}
    assert len(arms["random-init"]) == 3 and len(arms["pretrained"]) == 2  # quick, fine-tune (+ BatchFormer)
    for cmd in arms["random-init"]:
        assert "--random-init" in cmd and "--pretrained" not in cmd, cmd
    for cmd in arms["pretrained"]:
        assert "--random-init" not in cmd and cmd[cmd.index("--pretrained") + 1] == export, cmd
    results = json.load(open(os.path.join(out, "results.json")))
    quick = {q["start"]: q for q in results["quick"]}
    assert quick["random-init"]["loaded"] == "random-init" and quick["pretrained"]["loaded"] == export
    assert quick["pretrained"]["features_sha256"] != quick["random-init"]["features_sha256"]
    assert {(x["start"], x["bf"], x["loaded"]) for x in results["finetune"]} == \
        {("pretrained", False, export), ("random-init", False, "random-init"), ("random-init", True, "random-init")}


def test_report_over_fractions(tmp_path, monkeypatch):
    """The tables, paired differences and plot of three fractions, against values worked by hand."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    from downstream_report import write_report

    fractions = [0.01, 0.1, 1.0]
    info = {"command": "c", "date": "d", "date_end": "e", "git": "g", "fractions": fractions, "ft_min": [2, 4, 8],
            "ft_steps": 0, "seeds": 2, "subset_seed": 0, "batch_size": 128, "precision": "auto", "pretrained": "p",
            "random_init": "--random-init", "hardware": {"cpu": "cpu", "cores": 2, "torch": "t",
                                                         "load_average_at_start": [0.0]}}
    quick = [{"start": s, "fraction": f, "knn_top1": 10 * f + (20 if s == "pretrained" else 0),
              "fast_linear_top1": 30.0, "subset": {"train_samples": int(50000 * f)}}
             for f in fractions for s in ("pretrained", "random-init")]
    top1 = {("pretrained", False): [50.0, 52.0], ("random-init", False): [40.0, 41.0],
            ("pretrained", True): [51.0, 55.0]}  # per seed, plus 100 x the fraction
    records = [{"start": s, "fraction": f, "bf": bf, "seed": seed, "recipe": "r", "lr": 0.1, "steps": 5, "epochs": 1.0,
                "top1": v + 100 * f, "best_top1": v, "wall_s": 60.0}
               for f in fractions for (s, bf), values in top1.items() if f < 1 or not bf
               for seed, v in enumerate(values)]
    text = write_report(str(tmp_path), info, quick, records)
    table = markdown_rows(text, "| labels (images) |")
    assert table[0] == ["1 % (500)", "pretrained", "20.1", "30.0", "52.0 ± 1.4", "54.0 ± 2.8"]
    assert table[5] == ["100 % (50000)", "random-init", "10.0", "30.0", "140.5 ± 0.7", "–"]
    paired = markdown_rows(text, "| labels | pretrained − random init |")
    # at 1 %: pretrained - random 51 - 41 = 10 and 53 - 42 = 11 (beyond 2 std); BatchFormer 52 - 51 = 1 and 56 - 53 = 3
    assert paired[0] == ["1 %", "+10.5 ± 0.7 (beyond 2 std)", "+2.0 ± 1.4", "–"]
    assert paired[2] == ["100 %", "+10.5 ± 0.7 (beyond 2 std)", "–", "–"]
    svg = ET.parse(os.path.join(tmp_path, "downstream.svg")).getroot()
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 7 and sum(len(line.get("points").split()) for line in lines) == 3 * 6 + 2
    xs = sorted({float(p.split(",")[0]) for line in lines for p in line.get("points").split()})
    assert xs[1] - xs[0] == pytest.approx(xs[2] - xs[1])  # 1 %, 10 %, 100 %: equal steps on the log axis


def test_arms_with_equal_features_stop_the_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import downstream

    records = [{"start": "pretrained", "fraction": 0.1, "loaded": "/b.safetensors", "features_sha256": "ab"},
               {"start": "random-init", "fraction": 0.1, "loaded": "random-init", "features_sha256": "cd"}]
    downstream.check_arms_differ(records, "/b.safetensors")  # different features: passes
    records[1]["features_sha256"] = "ab"
    with pytest.raises(SystemExit, match="both arms loaded the same weights"):
        downstream.check_arms_differ(records, "/b.safetensors")
    records[1]["features_sha256"], records[1]["loaded"] = "cd", "/b.safetensors"
    with pytest.raises(SystemExit, match="the random-init arm at 0.1 loaded /b.safetensors, expected random-init"):
        downstream.check_arms_differ(records, "/b.safetensors")
