"""train.py and probe.py against hostile input, one test per class of failure a tester found
(issue "never lose a run, round two"). The units (reader, meta schema, lock) are tested in
tests/test_hostile.py; here the scripts themselves run, in-process where an error is expected
(`fail` raises SystemExit with the one-line message) and as subprocesses for whole runs. A finished
run is the session's shared one (conftest.straight_run, 8 steps); an export to probe is made in-process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import probe
import train
from bfcl.checkpoint import list_checkpoints
from bfcl.export import export_backbone
from bfcl.model import MoCo
from bfcl.synthetic import make_image_folder
from scripts import TINY as SCRIPT_TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["-a", "resnet18", "--stem", "imagenet", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "64",
        "--moco-dim", "32", "--workers", "0", "--log-every", "1", "--add_bf", "1", "--lr", "0.3", "--epochs", "1",
        "--warmup-epochs", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=8,
                             val_per_class=4, size=16)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    """A resnet18 backbone export (imagenet stem, 16 px, step 4), as train.py writes one."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("export") / "backbone.safetensors")
    export_backbone(MoCo("resnet18", "imagenet", 32, 64).state_dict(), path, arch="resnet18", stem="imagenet",
                    image_size=16, step=4)
    return path


def run_script(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def error_of(main, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    return message


# ---- 1. done must mean done ------------------------------------------------------------------

@pytest.mark.slow
def test_resumed_finished_run_rewrites_a_stale_export(tiny_data, straight_run, tmp_path):
    """Killed after the last checkpoint was renamed into place but before the export: the resume
    has nothing to train, and still leaves the export of the newest checkpoint, naming its step."""
    finished = tmp_path / "run"
    shutil.copytree(straight_run, finished)
    export = finished / "backbone.safetensors"
    newest = load_file(os.path.join(list_checkpoints(str(finished))[-1], "model.safetensors"))
    stale = {k: torch.zeros_like(v) for k, v in load_file(export).items()}
    save_file(stale, str(export), {"format": "bfcl-backbone-1", "arch": "resnet18", "stem": "small",
                                   "image_size": "16", "step": "2"})
    again = run_script("train.py", "--data", tiny_data, "--output-dir", str(finished), *SCRIPT_TINY)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"done: 8 steps; backbone (step 8) in {export}" in again.stdout
    with safe_open(str(export), "pt") as f:
        assert f.metadata()["step"] == "8"
    for key, value in load_file(export).items():
        assert torch.equal(value, newest["base_encoder.backbone." + key]), key


@pytest.mark.slow
def test_checkpoint_past_the_run_is_refused(tiny_data, straight_run, tmp_path):
    """A checkpoint whose step lies beyond this run's schedule cannot be 'done' without training."""
    out = tmp_path / "run"
    source = list_checkpoints(str(straight_run))[-1]
    target = out / "checkpoints" / "step-01000000"
    os.makedirs(target)
    for name in ("model.safetensors", "optimizer.safetensors", "meta.json"):
        with open(os.path.join(source, name), "rb") as f, open(target / name, "wb") as g:
            g.write(f.read())
    meta = json.load(open(target / "meta.json"))
    meta["step"] = 1_000_000
    json.dump(meta, open(target / "meta.json", "w"))
    message = error_of(train.main, ["--data", tiny_data, "--output-dir", str(out), *SCRIPT_TINY])
    assert "is at step 1000000, past this run's 8 steps" in message


@pytest.mark.slow
def test_resume_none_in_a_folder_with_checkpoints_is_refused(tiny_data, straight_run):
    message = error_of(train.main, ["--data", tiny_data, "--output-dir", str(straight_run), *SCRIPT_TINY, "--resume",
                                    "none"])
    assert "already holds checkpoints" in message and "--resume auto" in message


# ---- 2. one bad image never ends a run -------------------------------------------------------

@pytest.mark.slow
def test_oversized_image_is_replaced_in_pretraining_and_in_the_probe(tmp_path):
    """An image over --max-image-pixels (the decompression-bomb guard) is unreadable: replaced
    and counted in pretraining, the online kNN monitor and the probe, never a traceback."""
    root = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=8, val_per_class=4, size=16)
    for split in ("train", "val"):
        Image.new("RGB", (64, 64), (200, 10, 10)).save(os.path.join(root, split, "class_0", "huge.png"))
    out = tmp_path / "run"
    result = run_script("train.py", "--data", root, "--output-dir", str(out), *TINY, "--max-image-pixels", "1000",
                        "--max-bad-image-share", "0.5", "--knn-every", "2", "--knn-samples", "16")
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[-1]["bad_images"] >= 1 and "knn_top1" in records[-1]

    probed = run_script("probe.py", "--pretrained", str(out), "--data", root, "--mode", "knn", "--workers", "0",
                        "--output-dir", str(tmp_path / "probe"), "--max-image-pixels", "1000",
                        "--max-bad-image-share", "0.2")
    assert probed.returncode == 0, probed.stdout + probed.stderr
    strict = run_script("probe.py", "--pretrained", str(out), "--data", root, "--mode", "knn", "--workers", "0",
                        "--output-dir", str(tmp_path / "probe2"), "--max-image-pixels", "1000")
    assert strict.returncode == 1 and "image reads failed" in strict.stderr and "Traceback" not in strict.stderr


# ---- 3. and 4. metadata and weights are input too --------------------------------------------

def export_file(export, tmp_path, metadata: dict | None = None, edit=None) -> str:
    tensors = load_file(export)
    if edit is not None:
        edit(tensors)
    path = str(tmp_path / "backbone.safetensors")
    save_file(tensors, path, {"format": "bfcl-backbone-1", "arch": "resnet18", "stem": "imagenet",
                              "image_size": "16", "step": "4", **(metadata or {})})
    return path


@pytest.mark.parametrize("metadata, expected", [
    ({"image_size": "100000"}, "metadata image_size='100000' is not an integer in [8, 4096]"),
    ({"step": "-3"}, "metadata step='-3' is not an integer"),
    ({"arch": "resnet1000"}, "metadata arch='resnet1000' is not one of"),
    ({"stem": "huge"}, "metadata stem='huge' is not one of"),
])
def test_export_metadata_is_validated(data, export, tmp_path, metadata, expected):
    path = export_file(export, tmp_path, metadata)
    message = error_of(probe.main, ["--pretrained", path, "--data", data, "--mode", "knn", "--workers", "0",
                                    "--output-dir", str(tmp_path / "out")])
    assert expected in message


def nan_weight(t):
    t["conv1.weight"][0, 0, 0, 0] = float("nan")


def int_weight(t):
    t["fc_like"] = torch.zeros(3, dtype=torch.int64)
    t["conv1.weight"] = t["conv1.weight"].to(torch.int32)


def negative_variance(t):
    t["bn1.running_var"][0] = -1.0


@pytest.mark.parametrize("edit, expected", [(nan_weight, "non-finite"), (int_weight, "not floating"),
                                            (negative_variance, "negative")])
def test_impossible_weights_are_refused_by_the_probe(data, export, tmp_path, edit, expected):
    path = export_file(export, tmp_path, edit=edit)
    message = error_of(probe.main, ["--pretrained", path, "--data", data, "--mode", "knn", "--workers", "0",
                                    "--output-dir", str(tmp_path / "out")])
    assert expected in message


# ---- 5. one output folder, one run -----------------------------------------------------------

def test_second_run_on_the_same_output_dir_is_refused(data, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bfcl.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        message = error_of(train.main, ["--data", data, "--output-dir", str(out), *TINY])
        assert f"is in use by pid {holder.pid}" in message
        assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "metrics.jsonl")
    finally:
        holder.kill()
        holder.wait()


# ---- 6. every flag is validated before any work ----------------------------------------------

@pytest.mark.parametrize("flag, value, expected", [
    ("--save-every", "0", "--save-every 0 is outside its range [1, inf)"),
    ("--log-every", "0", "--log-every 0 is outside its range [1, inf)"),
    ("-b", "0", "--batch-size 0 is outside its range [1, inf)"),
    ("-b", "-8", "--batch-size -8 is outside its range [1, inf)"),
    ("--epochs", "nan", "--epochs nan is outside its range (0, 1e+06]"),
    ("--image-size", "0", "--image-size 0 is outside its range [8, 4096]"),
    ("--crop-min", "1.5", "--crop-min 1.5 is outside its range (0, 1]"),
    ("--workers", "-1", "--workers -1 is outside its range [0, 256]"),
    ("--lr", "-1", "--lr -1.0 is outside its range (0, inf)"),
    ("--moco-t", "0", "--moco-t 0.0 is outside its range (0, inf)"),
    ("--moco-m", "1.5", "--moco-m 1.5 is outside its range [0, 1]"),
    ("--keep", "-1", "--keep -1 is outside its range [0, inf)"),
    ("--max-bad-image-share", "2", "--max-bad-image-share 2.0 is outside its range [0, 1]"),
    ("--patch-size", "0", "--patch-size 0 is outside its range [1, 4096]"),
])
def test_train_flag_domains(data, tmp_path, flag, value, expected):
    out = tmp_path / "run"
    message = error_of(train.main, ["--data", data, "--output-dir", str(out), *TINY, flag, value])
    assert expected in message
    assert not os.path.exists(out)  # refused before anything was written


@pytest.mark.parametrize("flag, value, expected", [
    ("--epochs", "0", "--epochs 0.0 is outside its range (0, 1e+06]"),
    ("--knn-t", "0", "--knn-t 0.0 is outside its range (0, inf)"),
    ("-b", "0", "--batch-size 0 is outside its range [1, inf)"),
    ("--knn-k", "0", "--knn-k 0 is outside its range [1, inf)"),
    ("--lr", "-1", "--lr -1.0 is outside its range (0, inf)"),
])
def test_probe_flag_domains(data, export, tmp_path, flag, value, expected):
    out = tmp_path / "out"
    message = error_of(probe.main, ["--pretrained", export, "--data", data, "--output-dir", str(out),
                                    "--mode", "knn", flag, value])
    assert expected in message
    assert not os.path.exists(out)


def test_output_dir_inside_the_data_is_refused_and_leaves_nothing(data):
    inside = os.path.join(data, "train", "runs")
    message = error_of(train.main, ["--data", data, "--output-dir", inside, *TINY])
    assert "is inside --data" in message
    assert not os.path.exists(inside)


@pytest.mark.slow
def test_refused_lock_stops_every_process(data, tmp_path):
    """Two torchrun processes on a folder another run holds: both stop with the one-line error;
    the second process does not run on into a collective and hang."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bfcl.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "train.py", "--data", data,
                                 "--output-dir", str(out), *TINY], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode != 0
        assert result.stderr.count(f"is in use by pid {holder.pid}") == 2, result.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_checkpoint_of_bfcl_0_1_resumes(tiny_data, straight_run, tmp_path):
    """A checkpoint whose config predates the ViT options (patch_size, stop_grad_conv1) resumes:
    those options had one value then."""
    out = tmp_path / "run"
    source = list_checkpoints(str(straight_run))[-1]
    target = out / "checkpoints" / os.path.basename(source)
    os.makedirs(target)
    for name in ("model.safetensors", "optimizer.safetensors", "meta.json"):
        with open(os.path.join(source, name), "rb") as f, open(target / name, "wb") as g:
            g.write(f.read())
    meta = json.load(open(target / "meta.json"))
    for key in ("patch_size", "stop_grad_conv1", "max_image_pixels"):
        del meta["config"][key]
    json.dump(meta, open(target / "meta.json", "w"))
    assert train.main(["--data", tiny_data, "--output-dir", str(out), *SCRIPT_TINY]) == 0
    assert error_of(train.main, ["--data", tiny_data, "--output-dir", str(out), *SCRIPT_TINY, "--patch-size", "4"]) \
        .endswith("restore them or pass --force-resume")


def test_knn_monitor_needs_the_same_classes_in_val(data, tmp_path):
    root = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=8, val_per_class=2, size=16)
    os.rename(os.path.join(root, "val", "class_3"), os.path.join(root, "val", "other"))
    message = error_of(train.main, ["--data", root, "--output-dir", str(tmp_path / "run"), *TINY, "--knn-every", "2"])
    assert "needs the same class folders in train/ and val/" in message
