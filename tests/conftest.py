"""Reference runs shared by the whole-script tests, made once per session (each is what an
uninterrupted run of the tiny setting in scripts.py gives; tests compare their own runs against it).
Fixtures that launch train.py are only requested by tests marked slow, so `make test-fast` runs none."""

import json
import os

import pytest
import torch

from bfcl.export import export_backbone
from bfcl.model import MoCo
from bfcl.synthetic import make_image_folder
from scripts import PARAM_HASHES, STEPS, TINY, TORCHRUN, checkpoint_steps, run, train_cmd

# Whole-script tests compare runs with each other and with fp32 references: fp32, named as accelerate
# launch names a precision, since without it train.py and probe.py now pick auto (bf16 on a CPU that
# computes it). Tests of the default itself remove it (tests/test_precision.py).
os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "no")
# ... and where a test still reaches auto on this bf16-native CPU (--mixed-precision auto, the small-images
# recipe), no timing at start-up: the rule decides, as before. The tests of the measurement set it to 1,
# with BFCL_CACHE in their own temporary folder (tests/test_precision.py).
os.environ.setdefault("BFCL_PRECISION_PROBE", "0")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two pytest workers on two cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """4 classes x 8 train and 8 val images, 16 px: 4 steps an epoch at batch 8. Tests read it only."""
    return make_image_folder(str(tmp_path_factory.mktemp("tiny-data")), classes=4, train_per_class=8,
                             val_per_class=8, size=16)


@pytest.fixture(scope="session")
def straight_run(tiny_data, tmp_path_factory):
    """TINY for all 8 steps in one go: checkpoints at steps 4 and 8, the export, metrics.jsonl.
    Tests read it; one that changes a run copies it first."""
    out = tmp_path_factory.mktemp("straight")
    result = run(train_cmd(tiny_data, out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert checkpoint_steps(out) == [4, STEPS]
    return out


@pytest.fixture(scope="session")
def two_process_run(tiny_data, tmp_path_factory):
    """TINY on two CPU processes under torchrun, stopped at step 2 and resumed to the end, every
    process recording a hash of its parameters after each step (scripts.PARAM_HASHES).
    Returns {"out", "hashes": [rank0, rank1] lists of hex digests, "first", "second": the two runs}."""
    root = tmp_path_factory.mktemp("two-processes")
    wrapper, out, hashes = root / "train_with_hashes.py", root / "run", root / "hashes"
    wrapper.write_text(PARAM_HASHES)
    hashes.mkdir()
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(wrapper), "--data", tiny_data, "--output-dir",
           str(out), *TINY]
    first = run(cmd + ["--max-steps", "2"], HASH_DIR=str(hashes))
    assert first.returncode == 0, first.stdout + first.stderr
    steps_after_first = checkpoint_steps(out)
    second = run(cmd, HASH_DIR=str(hashes))
    assert second.returncode == 0, second.stdout + second.stderr
    ranks = [[json.loads(line)["sha256"] for line in open(hashes / f"rank{r}.jsonl")] for r in range(2)]
    return {"out": out, "hashes": ranks, "first": first, "second": second, "steps_after_first": steps_after_first}


# The small folder and export the flag and pretrained-file tests share (module scope: each module its own;
# a module that defines its own `data` or `export` uses that one).
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 classes x 8 train and 4 val images, 16 px."""
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
