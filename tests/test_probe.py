"""probe.py: kNN against brute force, sharding without duplicates, the linear probe on separable
classes, one-line errors, and two CPU processes against one."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import probe
from bfcl.evaluation import shard
from bfcl.knn import knn_scores
from bfcl.linear import fast_linear, knn_eval
from bfcl.model import MoCo
from bfcl.synthetic import make_image_folder
from scripts import PROBE_TINY, correct_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
def colour_folder(root, classes=4, train_per_class=12, val_per_class=6, size=16, seed=0) -> str:
    """Classes that differ in colour (a hue each, random brightness, pixel noise): separable
    even by a randomly initialised backbone, so the probes have a known right answer."""
    g = torch.Generator().manual_seed(seed)
    hues = torch.tensor([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40]], dtype=torch.float32)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(count):
                img = hues[c] * (0.7 + 0.3 * torch.rand((), generator=g)) + 20 * torch.randn(size, size, 3, generator=g)
                Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy()).save(
                    os.path.join(root, split, f"c{c}", f"{i}.png"))
    return root


def test_shard_splits_whole_batches_without_padding():
    for num_samples in (1, 3, 15, 16, 17, 40):
        for batch in (1, 4, 16):
            single = [list(range(s, min(s + batch, num_samples))) for s in range(0, num_samples, batch)]
            for world in (1, 2, 3):
                shards = [shard(num_samples, batch, r, world) for r in range(world)]
                assert sorted(i for s in shards for i in s) == list(range(num_samples))  # each once
                for r, s in enumerate(shards):  # rank r's batches are single-process batches r, r + world, ...
                    assert [s[i:i + batch] for i in range(0, len(s), batch)] == single[r::world]


def brute_force_knn(bank, bank_labels, queries, num_classes, k, t):
    """Per query: cosine to every bank row, the k largest, each adds exp(cos / t) to its class."""
    scores = []
    for q in queries.tolist():
        sims = []
        for b, label in zip(bank.tolist(), bank_labels.tolist()):
            cos = sum(x * y for x, y in zip(q, b)) / math.sqrt(sum(x * x for x in q) * sum(y * y for y in b))
            sims.append((cos, label))
        votes = [0.0] * num_classes
        for cos, label in sorted(sims, reverse=True)[:k]:
            votes[label] += math.exp(cos / t)
        scores.append(votes)
    return torch.tensor(scores, dtype=torch.float64)


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 6, 8
    centres = torch.randn(num_classes, dim, generator=g)
    bank_labels = torch.randint(0, num_classes, (40,), generator=g)
    labels = torch.randint(0, num_classes, (25,), generator=g)
    bank = centres[bank_labels] + 1.2 * torch.randn(40, dim, generator=g)  # overlapping: accuracy < 100
    queries = 3.0 * (centres[labels] + 1.2 * torch.randn(25, dim, generator=g))  # scale must not matter
    result = knn_eval(bank, bank_labels, queries, labels, num_classes, ks=(5, 200), temperature=0.07)
    for k, key in ((5, "k5"), (40, "k200")):  # k beyond the bank uses the whole bank
        reference = brute_force_knn(bank, bank_labels, queries, num_classes, k, 0.07)
        scores = knn_scores(queries, bank, bank_labels, num_classes, k=200 if k == 40 else k, temperature=0.07)
        assert torch.allclose(scores.double(), reference, rtol=1e-4)
        ranked = reference.argsort(dim=1, descending=True)
        assert result[key]["top1"] == pytest.approx(100 * (ranked[:, 0] == labels).double().mean().item())
    # With k = 5 classes without votes tie at 0, so top-5 is only well defined with the whole bank.
    top5 = 100 * (ranked[:, :5] == labels[:, None]).any(dim=1).double().mean().item()
    assert result["k200"]["top5"] == pytest.approx(top5)
    assert 0 < result["k5"]["top1"] < 100 and result["temperature"] == 0.07


def test_fast_linear_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(5, 32, generator=g)
    train_y, val_y = torch.arange(5).repeat(20), torch.arange(5).repeat(8)
    train_x = (centres[train_y] + torch.randn(100, 32, generator=g)).relu() * 50  # unnormalised, like features
    val_x = (centres[val_y] + torch.randn(40, 32, generator=g)).relu() * 50
    result = fast_linear(train_x, train_y, val_x, val_y, num_classes=5, epochs=30, seed=0)
    assert result["protocol"] is False and result["top1"] == 100.0
    shuffled = fast_linear(train_x, train_y[torch.randperm(100, generator=g)], val_x, val_y, 5, 30, 0)
    assert shuffled["top1"] < 60  # no signal, no accuracy: the 100 above is not an artefact


def test_linear_probe_learns_separable_classes(tmp_path):
    """The whole script in-process on colour classes: every evaluation gets them all right, the
    lr follows the per-epoch cosine, and the frozen-backbone assertion passed (it raises)."""
    data = colour_folder(str(tmp_path / "data"), train_per_class=8, val_per_class=5, size=8)
    out = str(tmp_path / "out")
    assert probe.main([*PROBE_TINY, "--data", data, "--mode", "all", "--epochs", "3", "-b", "8", "--lr", "3.0",
                       "--fast-epochs", "50", "--output-dir", out]) == 0
    record = json.load(open(os.path.join(out, "results.json")))
    results = record["results"]
    assert (record["arch"], record["stem"], record["image_size"], record["num_classes"]) == ("resnet18", "small", 8, 4)
    assert (record["train_samples"], record["val_samples"]) == (32, 20)
    assert results["knn"]["k20"]["top1"] >= 95 and results["knn"]["k200"]["top1"] >= 95  # chance: 25
    assert results["fast_linear"]["top1"] >= 95 and results["fast_linear"]["protocol"] is False
    linear = results["linear"]
    assert linear["protocol"] is True and linear["best"]["top1"] >= 95 and linear["last"]["top1"] >= 95
    peak = 3.0 * 8 / 256
    assert [h["lr"] for h in linear["history"]] == pytest.approx(
        [peak * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)])
    assert linear["history"][-1]["loss"] < linear["history"][0]["loss"]
    assert linear["last"] == linear["history"][-1] and linear["best"] == max(linear["history"], key=lambda h: h["top1"])


def test_quick_mode_equals_knn_and_fast_linear_run_apart(tmp_path):
    """--mode quick (what bench/quality.py scores with) shares one feature pass; its numbers are
    those of --mode knn and --mode fast-linear run on their own, and it trains no linear head."""
    data = colour_folder(str(tmp_path / "data"), train_per_class=6, val_per_class=4, size=8)
    got = {}
    for mode in ("quick", "knn", "fast-linear"):
        out = str(tmp_path / mode)
        assert probe.main([*PROBE_TINY, "--data", data, "--mode", mode, "--fast-epochs", "5", "--seed", "3",
                           "--output-dir", out]) == 0
        got[mode] = json.load(open(os.path.join(out, "results.json")))["results"]
    assert set(got["quick"]) == {"knn", "fast_linear"}
    assert got["quick"]["knn"] == got["knn"]["knn"]
    assert got["quick"]["fast_linear"] == got["fast-linear"]["fast_linear"]


def test_bn_head_probe_runs(tmp_path):
    data = colour_folder(str(tmp_path / "data"), train_per_class=8, val_per_class=4, size=8)
    out = str(tmp_path / "out")
    probe.main([*PROBE_TINY, "--data", data, "--epochs", "2", "-b", "16", "--bn-head", "--output-dir", out])
    linear = json.load(open(os.path.join(out, "results.json")))["results"]["linear"]
    assert linear["bn_head"] is True and linear["best"]["top1"] >= 90  # the BN head makes lr 0.1 enough


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's choice")
def test_auto_precision_is_fp32_on_a_cpu_without_bf16_and_says_why(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BFCL_CPU_BF16", "0")  # as on an AVX2-only CPU, whatever this one is
    data = colour_folder(str(tmp_path / "data"), train_per_class=4, val_per_class=2, size=8)
    assert probe.main([*PROBE_TINY, "--data", data, "--mode", "knn", "--mixed-precision", "auto",
                       "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "precision: no (auto: fp32, this CPU" in out and "warning" not in out


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's warning")
def test_bf16_on_a_cpu_without_it_warns(tmp_path):
    """An explicit bf16 where it is emulated still runs, with one warning line (a subprocess:
    Accelerate fixes the precision once per process)."""
    data = colour_folder(str(tmp_path / "data"), train_per_class=4, val_per_class=2, size=8)
    result = subprocess.run([sys.executable, "probe.py", *PROBE_TINY, "--data", data, "--mode", "knn",
                             "--mixed-precision", "bf16", "--output-dir", str(tmp_path / "out")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "BFCL_CPU_BF16": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: --mixed-precision bf16 on a CPU without native bf16" in result.stdout
    assert "precision: bf16 (asked for; this CPU" in result.stdout


def error_of(argv) -> str:
    with pytest.raises(SystemExit) as e:
        probe.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_input_gives_one_line_errors(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), classes=3, train_per_class=2, val_per_class=1, size=16)
    os.rename(os.path.join(data, "val", "class_2"), os.path.join(data, "val", "class_9"))
    message = error_of([*PROBE_TINY, "--data", data, "--output-dir", str(tmp_path / "o")])
    assert "different classes" in message and "class_2" in message and "class_9" in message

    os.makedirs(tmp_path / "flat" / "train")
    Image.new("RGB", (16, 16)).save(tmp_path / "flat" / "train" / "0.jpg")
    assert "no class subfolders" in error_of([*PROBE_TINY, "--data", str(tmp_path / "flat"), "--image-size", "16"])

    os.rename(os.path.join(data, "val", "class_9"), os.path.join(data, "val", "class_2"))
    missing = str(tmp_path / "nope.pth.tar")
    assert missing in error_of(["--pretrained", missing, "--data", data])

    torch.manual_seed(0)
    moco = MoCo("resnet18", "small", dim=16, mlp_dim=32)
    export = str(tmp_path / "backbone.safetensors")
    save_file({k[len("base_encoder.backbone."):]: v.contiguous() for k, v in moco.state_dict().items()
               if k.startswith("base_encoder.backbone.")}, export, {"arch": "resnet18", "stem": "small"})
    message = error_of(["--pretrained", export, "--arch", "resnet50", "--data", data, "--workers", "0"])
    assert "does not fit resnet50" in message and "looks like resnet18 with the small stem" in message


@pytest.mark.slow
def test_two_processes_give_the_single_process_features(tmp_path):
    """21 train images in per-process batches of 4 (two processes interleave batches), 3 val
    images (the second process gets none): the gathered features must be bit-identical to one
    process's with the same per-process batch, and so must kNN and fast-linear."""
    data = make_image_folder(str(tmp_path / "data"), classes=3, train_per_class=7, val_per_class=1, size=16)
    common = [*PROBE_TINY, "--data", data, "--mode", "all", "--epochs", "1", "--fast-epochs", "5", "--save-features"]
    two = subprocess.run([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "probe.py", *common, "-b", "8",
                          "--output-dir", str(tmp_path / "two")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    probe.main([*common, "-b", "4", "--output-dir", str(tmp_path / "one")])

    one_f, two_f = (load_file(str(tmp_path / "one" / "features.safetensors")),
                    load_file(str(tmp_path / "two" / "features.safetensors")))
    assert one_f["train_features"].shape == (21, 512) and one_f["val_features"].shape == (3, 512)
    for key in one_f:
        assert torch.equal(one_f[key], two_f[key]), key
    one_r = json.load(open(tmp_path / "one" / "results.json"))
    two_r = json.load(open(tmp_path / "two" / "results.json"))
    assert two_r["processes"] == 2 and one_r["processes"] == 1
    assert one_r["results"]["knn"] == two_r["results"]["knn"]
    assert one_r["results"]["fast_linear"] == two_r["results"]["fast_linear"]


@pytest.mark.slow
def test_makefile_smoke_path_train_then_knn(tmp_path):
    """train.py's backbone.safetensors through `accelerate launch ... probe.py --mode knn`, as
    `make smoke-test` runs it; arch, stem and step come from the export's metadata."""
    data = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=8, val_per_class=4, size=16)
    run = str(tmp_path / "run")
    train = subprocess.run([sys.executable, "train.py", "--data", data, "--output-dir", run, "-a", "resnet18", "--stem",
                            "small", "--image-size", "16", "-b", "8", "--epochs", "1", "--warmup-epochs", "0",
                            "--moco-mlp-dim", "64", "--moco-dim", "32", "--max-steps", "2", "--workers", "0"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    out = str(tmp_path / "probe")
    result = subprocess.run([os.path.join(BIN, "accelerate"), "launch", "--config_file", "accelerate_configs/cpu.yaml",
                             "probe.py", "--pretrained", os.path.join(run, "backbone.safetensors"), "--data", data,
                             "--mode", "knn", "--workers", "2", "--output-dir", out],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.load(open(os.path.join(out, "results.json")))
    assert (record["arch"], record["stem"], record["step"], record["image_size"]) == ("resnet18", "small", 2, 16)
    assert record["source"] == "bfcl backbone export" and set(record["results"]) == {"knn"}
    knn = record["results"]["knn"]["k200"]
    assert record["val_samples"] == 16 and knn["top5"] == 100.0  # 4 classes: top-5 covers them all
    correct_of(knn["top1"], 16)
    # the same probe in this process without loader workers: the same neighbours, the same result
    assert probe.main(["--pretrained", os.path.join(run, "backbone.safetensors"), "--data", data, "--mode", "knn",
                       "--workers", "0", "--output-dir", out + "-here"]) == 0
    assert json.load(open(out + "-here/results.json"))["results"]["knn"] == record["results"]["knn"]
