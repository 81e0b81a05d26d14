"""bfcl as a library: the notebook example runs, and its numbers are the ones probe.py and a kNN
worked by hand give for the same inputs; bad input raises one-line errors instead of exiting."""

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import bfcl
from bfcl.errors import BfclError, ConfigError, DataError
from bfcl.runs import check_ranges, scaled_warmup
from scripts import run

# The README's notebook example (tests/test_readme.py compares the README's block with it).
NOTEBOOK_EXAMPLE = '''\
import bfcl
from bfcl.synthetic import make_image_folder

make_image_folder("data/toy", train_per_class=8, val_per_class=4, size=16)  # 4 classes, 32 + 16 images
backbone = bfcl.load_backbone("random", arch="resnet18", stem="small")  # or "runs/toy", any --pretrained
data = bfcl.labelled_data("data/toy", backbone=backbone)  # train/ and val/; image size: the images' side
x, y = bfcl.features(backbone, data.val)  # [16, 512] float32, [16] labels
knn = bfcl.knn_accuracy(backbone, data, ks=(20,))  # {"temperature": 0.07, "k20": {"top1": %, "top5": %}}
fast = bfcl.fast_linear(backbone, data, epochs=20)  # {"protocol": False, "top1": %, ...}
tuned = bfcl.fine_tune(backbone, data, output_dir="runs/toy-finetune", epochs=1, batch_size=8)
print(f"kNN {knn['k20']['top1']:.1f}  fast-linear {fast['top1']:.1f}  fine-tuned {tuned['last']['top1']:.1f}")
'''


def hand_knn_top1(bank, bank_labels, queries, labels, k: int, temperature: float) -> float:
    """Weighted kNN one query at a time: the k most cosine-similar bank rows vote exp(sim / T)."""
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    hits = 0
    for q, label in zip(queries, labels):
        sim = bank @ q
        top = sim.argsort(descending=True)[:k]
        votes = torch.zeros(int(bank_labels.max()) + 1, dtype=torch.float64)
        for i in top:
            votes[bank_labels[i]] += (sim[i].double() / temperature).exp()
        hits += int(votes.argmax() == label)
    return 100.0 * hits / len(labels)


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """The example run once in a fresh folder, the tests' working folder too (its paths are
    relative); its variables."""
    folder = tmp_path_factory.mktemp("notebook")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        names = {}
        exec(NOTEBOOK_EXAMPLE, names)
        yield folder, names
    finally:
        os.chdir(cwd)


def test_notebook_features_and_knn_match_a_hand_worked_knn(notebook):
    _, nb = notebook
    backbone, data = nb["backbone"], nb["data"]
    assert data.image_size == 16 and len(data.train) == 32 and data.classes == [f"class_{c}" for c in range(4)]
    assert nb["x"].shape == (16, 512) and nb["x"].dtype == torch.float32
    assert nb["y"].tolist() == [c for c in range(4) for _ in range(4)]  # val/ in folder order
    bank, bank_labels = bfcl.features(backbone, data.train, batch_size=7)  # another batch: the same rows
    assert bank_labels.tolist() == [c for c in range(4) for _ in range(8)]
    assert nb["knn"]["temperature"] == 0.07
    assert nb["knn"]["k20"]["top1"] == pytest.approx(hand_knn_top1(bank, bank_labels, nb["x"], nb["y"], 20, 0.07))


def test_notebook_numbers_are_probe_scripts(notebook):
    """probe.py with the same backbone, data and settings writes the same kNN and fast-linear results."""
    folder, nb = notebook
    out = folder / "probe"
    result = run([sys.executable, "probe.py", "--random-init", "-a", "resnet18", "--stem", "small", "--data",
                  str(folder / "data/toy"), "--mode", "quick", "--knn-k", "20", "--fast-epochs", "20", "-b", "256",
                  "--workers", "0", "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["knn"] == nb["knn"]
    assert results["fast_linear"] == nb["fast"]


def test_notebook_finetune_reports_what_its_exported_classifier_scores(notebook):
    folder, nb = notebook
    backbone, data, tuned = nb["backbone"], nb["data"], nb["tuned"]
    assert tuned["steps"] == 4 and tuned["batch_size"] == 8  # 32 images / 8, one epoch
    assert tuned["recipe"]["name"] == "torchvision-resnet"  # a random init takes the from-scratch recipe
    model = backbone.model(4, image_size=16, freeze=False)
    model.load_state_dict(load_file(folder / "runs/toy-finetune/finetuned.safetensors"))
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(torch.stack([data.val[i][0] for i in range(16)]))])
    top1 = 100.0 * (scores.argmax(1) == nb["y"]).float().mean().item()
    assert tuned["last"]["top1"] == pytest.approx(top1)


def test_random_is_a_seeded_init():
    a = bfcl.load_backbone(None, arch="resnet18", stem="small", seed=1)
    b = bfcl.load_backbone("random", arch="resnet18", stem="small", seed=1)
    c = bfcl.load_backbone("random", arch="resnet18", stem="small", seed=2)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not torch.equal(a.state["conv1.weight"], c.state["conv1.weight"])


def test_bad_input_raises_one_line_errors_not_exits(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        bfcl.labelled_data(str(tmp_path / "missing"), image_size=16)
    assert "\n" not in str(e.value) and isinstance(e.value, BfclError)
    with pytest.raises(ConfigError, match=r"--label-fraction 1.5 is outside its range \(0, 1\]"):
        check_ranges({"label_fraction": 1.5}, {"label_fraction": (0, 1, False, True)})
    with pytest.raises(ConfigError, match="--layer-decay applies to ViTs only"):
        bfcl.fine_tune(bfcl.load_backbone(None, arch="resnet18"), None, str(tmp_path / "out"), layer_decay=0.7)


def test_scaled_warmup_keeps_the_recipe_share():
    assert scaled_warmup(90, 5, 9, None) == 0.5  # 5 of 90 epochs over 9 epochs
    assert scaled_warmup(90, 5, 9, 2.0) is None  # a warm-up given stands
    assert scaled_warmup(90, 5, 90, None) is None and scaled_warmup(90, 5, None, None) is None
    assert scaled_warmup(90, 0, 9, None) is None  # nothing to scale
    assert scaled_warmup(90, 5, float("nan"), None) is None  # not shorter: the range check reports it
