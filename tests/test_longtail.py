"""Long-tailed data (bfcl/longtail.py, probe.py --imbalance / --loss balanced-softmax, docs/longtail.md):
the LDAM counts (CIFAR-10-LT at R = 100 keeps 12,406 images), the seeded class order and the balanced
subsets' draw within a class, the balanced subsets left byte-identical, the per-class and group
metrics against hand-worked values, Balanced Softmax's loss by hand and its absence at evaluation,
and probe.py / the library end to end at toy size."""

import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import bfcl
import probe
from bfcl.errors import BfclError, ConfigError
from bfcl.finetune_recipe import soft_target_cross_entropy
from bfcl.images import image_folder
from bfcl.longtail import (class_order, literature_groups, log_prior, longtail_counts, longtail_metrics,
                           longtail_subset, rank_groups, training_logits)
from bfcl.subsets import balanced_subset, label_subset
from scripts import PROBE_TINY
from test_probe import colour_folder, error_of

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_ldam_counts_worked_value():
    """LDAM's int(n_max * R ** (-i / (C - 1))): CIFAR-10-LT at R 100 is 12,406 images, CIFAR-100-LT 10,847."""
    counts = longtail_counts(5000, 10, 100)
    assert counts == CIFAR10_LT_100 and sum(counts) == 12406
    assert counts == [math.floor(5000 * 100 ** (-i / 9)) for i in range(10)]
    assert sum(longtail_counts(500, 100, 100)) == 10847
    assert longtail_counts(5000, 10, 10)[-1] == 500 and longtail_counts(7, 3, 1) == [7, 7, 7]
    assert longtail_counts(10, 4, 1000) == [10, 1, 1, 1]  # at least one image a class
    assert longtail_counts(9, 1, 100) == [9]
    with pytest.raises(ConfigError, match="at least 1"):
        longtail_counts(10, 4, 0.5)


def reference_first(paths, members, seed, count):
    return sorted(members, key=lambda i: hashlib.sha256(f"{seed}/{paths[i]}".encode()).hexdigest())[:count]


def test_longtail_subset_order_draw_and_nesting():
    targets = [c for c in range(5) for _ in range(40)] + [2, 2]  # class 2 has 42: n_max is the smallest, 40
    paths = [f"k{t}/{i}.jpg" for i, t in enumerate(targets)]
    indices, order, counts = longtail_subset(targets, paths, seed=3, imbalance=10, num_classes=5)
    assert order == torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist() == class_order(5, 3)
    assert [counts[c] for c in order] == longtail_counts(40, 5, 10) == [40, 22, 12, 7, 4]
    members = {c: [i for i, t in enumerate(targets) if t == c] for c in range(5)}
    assert indices == sorted(i for c in range(5) for i in reference_first(paths, members[c], 3, counts[c]))
    # a larger R keeps a subset of each class's images; another seed another order (or other images)
    steeper, order100, _ = longtail_subset(targets, paths, seed=3, imbalance=100, num_classes=5)
    assert order100 == order and set(steeper) < set(indices)
    assert longtail_subset(targets, paths, seed=4, imbalance=10, num_classes=5)[0] != indices
    # --labels-per-class N sets the head's count
    head, _, counts8 = longtail_subset(targets, paths, seed=3, imbalance=10, num_classes=5, n_max=8)
    assert counts8[order[0]] == 8 and len(head) == sum(longtail_counts(8, 5, 10))
    with pytest.raises(ConfigError, match="class index 4 has none"):
        longtail_subset([0, 1, 2, 3], ["a", "b", "c", "d"], 0, 10, 5)


def test_balanced_subsets_are_unchanged():
    """Lists computed on the commit before --imbalance existed (8b6d381): the same SHA-256."""
    targets = [c for c, n in enumerate((50, 37, 12, 5)) for _ in range(n)]
    paths = [f"class_{t}/img_{i:03d}.jpg" for i, t in enumerate(targets)]
    expected = {(0, "labels_per_class", 5): "93222ce431f8e01bc45647d4645c24d3a554a33c4297e1cb838bac9c61fe3091",
                (0, "fraction", 0.1): "330952ecd7d3b715c49e0d28aefdf243bca04f06a7a94df7479d96cc87f9307a",
                (7, "labels_per_class", 5): "ea0942e04a7c8507a8e325da691d44c8329b2d934f4999c6a177219410660aed",
                (7, "fraction", 0.1): "0bc11cbd1a8a7dc975e2be150a4ee56c47a6176f36b3514eb070ef19d80ddabd"}
    for (seed, name, value), digest in expected.items():
        picked = balanced_subset(targets, paths, seed, **{name: value})
        assert hashlib.sha256("".join(paths[i] + "\n" for i in picked).encode()).hexdigest() == digest


def test_balanced_list_files_are_unchanged(tmp_path):
    data = colour_folder(str(tmp_path / "data"), train_per_class=12, val_per_class=1, size=8)
    train = image_folder(os.path.join(data, "train"))
    root = os.path.join(data, "train")
    lpc = label_subset(train, root, 0, labels_per_class=3)
    assert lpc.record["sha256"] == "0c88e187aa0fddd4937d84d8ac78392d31188bf4cf82cf67751dc1a6b19e8bc5"
    half = label_subset(train, root, 0, fraction=0.5)
    assert half.record["sha256"] == "67c4f557274c5df20a9c1bd315cbb346ad5614c7d2293b33dd5e42123cc550ec"
    assert "imbalance" not in half.record and "class_order" not in half.record  # the record's keys as before


def test_groups_of_cifar10_lt():
    """Thirds by class size leave every group non-empty at R 100; the literature's few group is empty."""
    groups = rank_groups(CIFAR10_LT_100)
    assert groups == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    assert literature_groups(CIFAR10_LT_100) == {"many": list(range(8)), "medium": [8, 9], "few": []}
    shuffled = [CIFAR10_LT_100[i] for i in (4, 9, 0, 7, 2, 5, 1, 8, 3, 6)]  # the class order does not matter
    assert [shuffled[k] for k in rank_groups(shuffled)["few"]] == [50, 139, 83]
    assert rank_groups([5, 5, 5, 5]) is None and rank_groups([9, 1]) is None
    assert rank_groups([4, 4, 2, 2, 1, 1]) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}


def test_longtail_metrics_by_hand():
    """3 classes of 200, 50 and 10 training images; val 4, 2 and 2 images, 3 + 1 + 2 right."""
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2])
    scores = F.one_hot(predicted, 3).float()
    m = longtail_metrics(scores, labels, [200, 50, 10], ["a", "b", "c"])
    assert m["per_class"] == {"a": {"train": 200, "val": 4, "top1": 75.0}, "b": {"train": 50, "val": 2, "top1": 50.0},
                              "c": {"train": 10, "val": 2, "top1": 100.0}}
    assert m["groups"] == {"many": {"classes": 1, "train": [200, 200], "top1": 75.0},
                           "medium": {"classes": 1, "train": [50, 50], "top1": 50.0},
                           "few": {"classes": 1, "train": [10, 10], "top1": 100.0}}
    assert m["literature"] == m["groups"]  # > 100, 20-100, < 20: the same split here
    two = longtail_metrics(scores, labels, [200, 150, 10], ["a", "b", "c"])
    assert two["literature"]["many"] == {"classes": 2, "train": [150, 200], "top1": 62.5}  # mean of 75 and 50
    assert two["literature"]["medium"] is None
    json.dumps(m)  # results.json takes it as it is


def test_balanced_softmax_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    prior = log_prior([3, 1])
    assert torch.allclose(prior, torch.tensor([math.log(0.75), math.log(0.25)]))
    # row 0, label 0: -log(e^(2 + ln .75) / (e^(2 + ln .75) + e^(ln .25))) = -log(.75 e^2 / (.75 e^2 + .25))
    row0 = -math.log(0.75 * math.e ** 2 / (0.75 * math.e ** 2 + 0.25))
    row1 = -math.log(0.25 * math.e / (0.75 + 0.25 * math.e))
    loss = F.cross_entropy(training_logits(logits, prior), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # soft (Mixup) targets and BatchFormer's [x ; BF(x)] rows take the same prior
    soft = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    expected = 0.7 * (-math.log(0.75 * math.e ** 2 / (0.75 * math.e ** 2 + 0.25))) \
        + 0.3 * (-math.log(0.25 / (0.75 * math.e ** 2 + 0.25)))
    got = soft_target_cross_entropy(training_logits(logits[:1], prior), soft[:1])
    assert got.item() == pytest.approx(expected, rel=1e-6)
    doubled = training_logits(torch.cat([logits, logits]), prior)
    assert torch.equal(doubled[2:], doubled[:2])
    assert training_logits(logits, None) is logits  # cross-entropy: the logits as they are
    with pytest.raises(ConfigError, match="class index 1 has none"):
        log_prior([4, 0, 2])


def lt_folder(tmp_path, size=8):
    return colour_folder(str(tmp_path / "data"), train_per_class=12, val_per_class=3, size=size)


def test_probe_imbalance_writes_the_list_and_reports_groups(tmp_path):
    """--imbalance 4 on 4 classes of 12: 12, 7, 4, 3 images (int(12 x 4^(-i/3))) in the seeded class order;
    the list reads back through --train-list to the same images; knn and fast-linear report per-class top-1."""
    data = lt_folder(tmp_path)
    out = str(tmp_path / "quick")
    assert probe.main([*PROBE_TINY, "--data", data, "--output-dir", out, "--mode", "quick", "--fast-epochs", "2",
                       "--imbalance", "4", "--subset-seed", "2", "--knn-k", "5", "--loss", "balanced-softmax"]) == 0
    record = json.load(open(os.path.join(out, "results.json")))
    subset = record["subset"]
    order = [f"c{c}" for c in class_order(4, 2)]
    assert subset["rule"] == "--imbalance 4" and subset["class_order"] == order and subset["imbalance"] == 4
    assert [subset["per_class"][c] for c in order] == [12, 7, 4, 3] and record["train_samples"] == 26
    text = open(os.path.join(out, "train_list.txt"), "rb").read()
    assert hashlib.sha256(text).hexdigest() == subset["sha256"] and len(text.splitlines()) == 26
    assert record["val_samples"] == 12  # val/ stays balanced
    for block in (record["results"]["knn"]["k5"]["longtail"], record["results"]["fast_linear"]["longtail"]):
        assert {c: v["train"] for c, v in block["per_class"].items()} == subset["per_class"]
        assert all(v["val"] == 3 for v in block["per_class"].values())
        assert block["groups"]["many"]["train"] == [12, 12] and block["groups"]["few"]["train"] == [3, 3]
        assert block["groups"]["medium"]["classes"] == 2
    assert record["results"]["fast_linear"]["criterion"] == "balanced-softmax"

    listed = str(tmp_path / "listed")
    assert probe.main([*PROBE_TINY, "--data", data, "--output-dir", listed, "--mode", "knn", "--knn-k", "5",
                       "--train-list", os.path.join(out, "train_list.txt")]) == 0
    again = json.load(open(os.path.join(listed, "results.json")))
    assert again["subset"]["sha256"] == subset["sha256"] and again["subset"]["per_class"] == subset["per_class"]
    assert again["results"]["knn"]["k5"] == record["results"]["knn"]["k5"]


def test_imbalance_composes_with_labels_per_class_and_refuses_the_rest(tmp_path):
    data = lt_folder(tmp_path)
    out = str(tmp_path / "lpc")
    assert probe.main([*PROBE_TINY, "--data", data, "--output-dir", out, "--mode", "knn", "--knn-k", "3",
                       "--imbalance", "8", "--labels-per-class", "8"]) == 0
    subset = json.load(open(os.path.join(out, "results.json")))["subset"]
    assert sorted(subset["per_class"].values(), reverse=True) == longtail_counts(8, 4, 8) == [8, 4, 2, 1]
    assert subset["rule"] == "--imbalance 8 --labels-per-class 8"
    for extra, fix in ((["--label-fraction", "0.5"], "--label-fraction"), (["--max-train-samples", "20"],
                                                                            "drop --max-train-samples")):
        message = error_of([*PROBE_TINY, "--data", data, "--output-dir", str(tmp_path / "x"), "--mode", "knn",
                            "--imbalance", "10", *extra])
        assert fix in message
    message = error_of([*PROBE_TINY, "--data", data, "--output-dir", str(tmp_path / "e"), "--mode", "embed",
                        "--imbalance", "10"])
    assert "--imbalance selects labelled train/ images" in message
    assert "--imbalance 0.5" in error_of([*PROBE_TINY, "--data", data, "--output-dir", str(tmp_path / "y"),
                                          "--mode", "knn", "--imbalance", "0.5"])


def test_finetune_and_linear_with_balanced_softmax_bf_head_and_mixup(tmp_path):
    """Balanced Softmax through the fine-tuning loop with Mixup's soft targets and --bf-head's doubled rows,
    and through the linear protocol; both report the criterion and the final model's per-class top-1."""
    data = lt_folder(tmp_path)
    lt = ["--imbalance", "4", "--subset-seed", "1"]
    out = str(tmp_path / "ft")
    assert probe.main([*PROBE_TINY, "--data", data, "--output-dir", out, "--mode", "finetune", "--epochs", "2",
                       "-b", "8", "--log-every", "1", "--mixup", "0.4", "--bf-head", "1", "--loss",
                       "balanced-softmax", *lt]) == 0
    ft = json.load(open(os.path.join(out, "results.json")))["results"]["finetune"]
    assert ft["criterion"] == "balanced-softmax" and ft["steps"] == 6  # 26 images at batch 8: 3 steps an epoch
    assert sum(v["val"] for v in ft["longtail"]["per_class"].values()) == 12
    assert all(math.isfinite(h["loss"]) for h in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
               if "loss" in h)
    out = str(tmp_path / "lin")
    assert probe.main([*PROBE_TINY, "--data", data, "--output-dir", out, "--mode", "linear", "--epochs", "1",
                       "-b", "8", "--loss", "balanced-softmax", "--bf-head", "1", *lt]) == 0
    lin = json.load(open(os.path.join(out, "results.json")))["results"]["linear"]
    assert lin["criterion"] == "balanced-softmax" and lin["longtail"]["groups"]["few"]["classes"] == 1


def test_evaluation_does_not_add_the_prior(tmp_path):
    """The library at a learning rate too small to move anything: Balanced Softmax and cross-entropy
    train the same weights, and their evaluations agree class by class. Adding the log prior at
    evaluation would move predictions to the head classes."""
    data_dir = lt_folder(tmp_path)
    backbone = bfcl.load_backbone(None, arch="resnet18", stem="small", image_size=8)
    data = bfcl.labelled_data(data_dir, 8, imbalance=4, subset_seed=1)
    assert len(data.train) == 26 and len(data.val) == 12
    runs = {loss: bfcl.fine_tune(backbone, data, str(tmp_path / loss), epochs=1, lr=1e-12, batch_size=8,
                                 loss=loss, resume="none")
            for loss in ("ce", "balanced-softmax")}
    ce, bs = runs["ce"], runs["balanced-softmax"]
    assert ce["last"]["top1"] == bs["last"]["top1"] and ce["longtail"]["per_class"] == bs["longtail"]["per_class"]
    with pytest.raises(BfclError, match="unknown loss 'focal'"):
        bfcl.fine_tune(backbone, data, str(tmp_path / "focal"), epochs=1, batch_size=8, loss="focal")
    with pytest.raises(ConfigError, match="--max-train-samples"):
        bfcl.labelled_data(data_dir, 8, imbalance=4, max_train_samples=5)


def test_results_table_notes_the_groups():
    from rich.console import Console

    from bfcl.evaluation import results_table
    block = longtail_metrics(F.one_hot(torch.tensor([0, 1, 1]), 3).float(), torch.tensor([0, 1, 2]), [9, 5, 1],
                             ["a", "b", "c"])
    console = Console(width=200, record=True)
    console.print(results_table({"fast_linear": {"top1": 66.7, "top5": 100.0, "longtail": block}}, "t"))
    assert "many / medium / few top-1 100.0 / 100.0 / 0.0" in console.export_text()


def test_resume_refuses_another_loss_or_subset(tmp_path):
    """A fine-tuning run stopped after one step resumes only with the same --loss and --imbalance."""
    data = lt_folder(tmp_path)
    out = str(tmp_path / "ft")
    base = [*PROBE_TINY, "--data", data, "--output-dir", out, "--mode", "finetune", "--epochs", "2", "-b", "8",
            "--imbalance", "4"]
    assert probe.main([*base, "--max-steps", "1", "--save-every", "1"]) == 0
    for changed in (["--loss", "balanced-softmax"], ["--imbalance", "8"]):
        message = error_of([*base, *changed])
        assert ("loss" if "--loss" in changed else "imbalance") in message


CIFAR10 = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                        "cifar10"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(CIFAR10, "train")), reason="CIFAR-10 is not in ../shared/data")
def test_cifar10_lt_on_the_real_data():
    """CIFAR-10 as JPEGs: --imbalance 100 keeps the 12,406 images of CIFAR-10-LT (a minute to scan 50,000 files)."""
    root = os.path.join(CIFAR10, "train")
    record = label_subset(image_folder(root), root, 0, imbalance=100).record
    assert record["size"] == 12406 and record["available"] == 50000
    assert sorted(record["per_class"].values(), reverse=True) == CIFAR10_LT_100
    assert [record["per_class"][c] for c in record["class_order"]] == CIFAR10_LT_100
