"""Checkpoints (docs/reliability.md#outputs, #how-it-is-tested): by round trip (safetensors + JSON,
verified on load); malformed metadata, forged checksums and impossible weights refused by name and
skipped in auto mode; SIGKILL while saving leaves a loadable one; train.py skips a corrupt newest
checkpoint, refuses one past its schedule, and resumes one of bfcl 0.1."""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from torch import nn

import train
from bfcl.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, check_weights, latest_checkpoint, list_checkpoints,
                             load_checkpoint, load_model_state, load_optimizer_state, optimizer_state_tensors,
                             read_meta, save_checkpoint)
from bfcl.optim import LARS
from bfcl.pretrained import load_backbone_state
from scripts import REPO, TINY, error_of, metrics, run, train_cmd

META = {"config": {"lr": 0.6, "arch": "resnet18"}, "format": "bfcl-checkpoint-1"}


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def make_optimizer(kind: str, model: nn.Module):
    """Two groups, like train.py's main + BatchFormer groups; names in optimizer order."""
    first = [(n, p) for n, p in model.named_parameters() if not n.startswith("2.")]
    second = [(n, p) for n, p in model.named_parameters() if n.startswith("2.")]
    groups = [{"params": [p for _, p in first]}, {"params": [p for _, p in second], "lr": 0.01}]
    optimizer = LARS(groups, lr=0.1, weight_decay=1e-2) if kind == "lars" else torch.optim.AdamW(groups, lr=0.1)
    return optimizer, [n for n, _ in first + second]


def train_steps(model, optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=g)).square().sum().backward()
        optimizer.step()


@pytest.mark.parametrize("kind, state_keys", [("lars", {"mu"}), ("adamw", {"step", "exp_avg", "exp_avg_sq"})])
def test_round_trip_then_training_continues_identically(tmp_path, kind, state_keys):
    model = small_model(0)
    optimizer, names = make_optimizer(kind, model)
    train_steps(model, optimizer, 2, seed=1)
    state = optimizer_state_tensors(optimizer, names)
    assert {key.rsplit(".", 1)[1] for key in state} == state_keys
    path = save_checkpoint(str(tmp_path), 2, model.state_dict(), state, META, keep=3)

    restored = small_model(99)  # different init: everything must come from the file
    restored_optimizer, _ = make_optimizer(kind, restored)
    model_state, optimizer_state, meta = load_checkpoint(path)
    restored.load_state_dict(model_state)  # strict
    load_optimizer_state(restored_optimizer, names, optimizer_state)
    assert meta["config"] == META["config"] and meta["step"] == 2

    for key, value in model.state_dict().items():  # BN buffers incl. num_batches_tracked
        assert torch.equal(restored.state_dict()[key], value), key
    original = optimizer.state_dict()["state"]
    loaded = restored_optimizer.state_dict()["state"]
    assert original.keys() == loaded.keys() and len(original) == len(names)
    for index in original:
        assert original[index].keys() == loaded[index].keys()
        for key, value in original[index].items():
            assert torch.equal(torch.as_tensor(loaded[index][key]), torch.as_tensor(value)), (names[index], key)
    # hyper-parameters stay those of the new optimizer (the schedules recompute them)
    assert [g["lr"] for g in restored_optimizer.param_groups] == [0.1, 0.01]

    train_steps(model, optimizer, 2, seed=5)
    train_steps(restored, restored_optimizer, 2, seed=5)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_optimizer_state_of_an_unknown_parameter_is_refused():
    model = small_model(0)
    optimizer, names = make_optimizer("lars", model)
    train_steps(model, optimizer, 1, seed=1)
    state = optimizer_state_tensors(optimizer, names)
    state["3.weight.mu"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unknown parameters"):
        load_optimizer_state(make_optimizer("lars", small_model(0))[0], names, state)


def save_tiny(root, step: int, value: float = 0.0, keep: int = 0) -> str:
    return save_checkpoint(str(root), step, {"w": torch.full((64,), value + step)},
                           {"w.mu": torch.zeros(64)}, META, keep=keep)


def test_keep_deletes_older_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        save_tiny(tmp_path, step, keep=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step-00000030", "step-00000040"]
    assert latest_checkpoint(str(tmp_path)).endswith("step-00000040")


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_tiny(tmp_path, 5, value=1.0)
    path = save_tiny(tmp_path, 5, value=2.0)
    assert load_checkpoint(path)[0]["w"][0].item() == 7.0
    assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["step-00000005"]  # no temporary folder left


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)


def flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 20)  # inside the tensor data: the header still parses
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage, message", [(truncate, "truncated"), (flip_byte, "SHA-256")])
@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors"])
def test_damaged_checkpoint_is_skipped_and_refused(tmp_path, damage, message, file):
    good = save_tiny(tmp_path, 1)
    bad = save_tiny(tmp_path, 2)
    damage(os.path.join(bad, file))
    with pytest.warns(UserWarning, match=message):
        assert latest_checkpoint(str(tmp_path)) == good
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad)


def test_corrupt_meta_and_missing_checkpoint(tmp_path):
    path = save_tiny(tmp_path, 1)
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.warns(UserWarning, match="corrupt"):
        assert latest_checkpoint(str(tmp_path)) is None
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "checkpoints" / "step-00000099"))


def test_no_pickle_anywhere(tmp_path):
    model = small_model(0)
    optimizer, names = make_optimizer("adamw", model)
    train_steps(model, optimizer, 1, seed=1)
    path = save_checkpoint(str(tmp_path), 1, model.state_dict(), optimizer_state_tensors(optimizer, names), META,
                           keep=1)
    assert sorted(os.listdir(path)) == ["meta.json", "model.safetensors", "optimizer.safetensors"]
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    assert set(meta["files"]) == {"model.safetensors", "optimizer.safetensors"}
    for name in ("model.safetensors", "optimizer.safetensors"):
        with open(os.path.join(path, name), "rb") as f:
            head = f.read(8)
        assert head[:1] != b"\x80" and head[:2] != b"PK"  # neither a pickle nor torch.save's zip
        header_size = int.from_bytes(head, "little")  # safetensors: u64 header length, then JSON
        with open(os.path.join(path, name), "rb") as f:
            f.seek(8)
            json.loads(f.read(header_size))
        with safe_open(os.path.join(path, name), framework="pt") as f:
            assert all(not k.startswith(("module.", "_orig_mod.")) for k in f.keys())


def save_good(root, step: int) -> str:
    model = small_model(step)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 4)).sum().backward()
    optimizer.step()
    names = [n for n, _ in model.named_parameters()]
    meta = {"config": {"arch": "tiny"}, "epoch": step / 10, "steps_per_epoch": 10, "scaler": None}
    return save_checkpoint(str(root), step, model.state_dict(), optimizer_state_tensors(optimizer, names), meta, keep=0)


def edit_meta(path: str, change) -> None:
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    change(meta)
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def setter(key, value):
    return lambda meta: meta.__setitem__(key, value)


SHA = "0" * 64


BAD_META = {
    "no files": (lambda m: m.pop("files"), '"files" must be'),
    "files is a list": (setter("files", ["model.safetensors", "optimizer.safetensors"]), '"files" must be'),
    "files without the optimizer": (lambda m: m["files"].pop("optimizer.safetensors"), '"files" must be'),
    "files with another file": (lambda m: m["files"].__setitem__("../../etc/passwd", {"bytes": 1, "sha256": SHA}),
                                '"files" must be'),
    "no checksum": (lambda m: m["files"]["model.safetensors"].pop("sha256"), "files.model.safetensors.sha256"),
    "bad checksum string": (lambda m: m["files"]["model.safetensors"].__setitem__("sha256", "xyz"),
                            "files.model.safetensors.sha256"),
    "bytes a string": (lambda m: m["files"]["optimizer.safetensors"].__setitem__("bytes", "12"),
                       "files.optimizer.safetensors.bytes"),
    "negative bytes": (lambda m: m["files"]["optimizer.safetensors"].__setitem__("bytes", -1),
                       "files.optimizer.safetensors.bytes"),
    "negative step": (setter("step", -1), '"step" must be an integer >= 0, found -1'),
    "step a string": (setter("step", "12"), "\"step\" must be an integer >= 0, found '12'"),
    "step a bool": (setter("step", True), '"step" must be'),
    "step a float": (setter("step", 12.0), '"step" must be'),
    "no format": (lambda m: m.pop("format"), '"format" must be "bfcl-checkpoint-1", found None'),
    "wrong format": (setter("format", "bfcl-checkpoint-2"), '"format" must be'),
    "config a list": (setter("config", []), '"config" must be an object'),
    "epoch NaN": (setter("epoch", math.nan), '"epoch" must be a finite number'),
    "epoch negative": (setter("epoch", -1), '"epoch" must be'),
    "steps_per_epoch 0": (setter("steps_per_epoch", 0), '"steps_per_epoch" must be an integer >= 1'),
    "scaler a string": (setter("scaler", "big"), '"scaler" must be'),
}


@pytest.mark.parametrize("case", BAD_META)
def test_malformed_meta_is_refused_by_name_and_skipped_in_auto_mode(tmp_path, case):
    change, message = BAD_META[case]
    good = save_good(tmp_path, 1)
    bad = save_good(tmp_path, 2)
    edit_meta(bad, change)
    with pytest.raises(CheckpointError, match=message) as e:
        read_meta(bad)
    assert str(e.value).startswith(os.path.join(bad, "meta.json")) and "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert latest_checkpoint(str(tmp_path)) == good


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "top level must be a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "corrupt"),  # json.load: RecursionError
    ("\xff\xfe", "corrupt"),
    ('{"step": 1, "step": Infinity}', '"format" must be'),
])
def test_meta_that_is_not_an_object_or_not_json(tmp_path, content, message):
    path = save_good(tmp_path, 1)
    with open(os.path.join(path, "meta.json"), "w", encoding="latin-1") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=message):
        read_meta(path)


def test_renamed_checkpoint_folder_is_refused(tmp_path):
    path = save_good(tmp_path, 3)
    os.rename(path, path.replace("step-00000003", "step-00000009"))
    with pytest.warns(UserWarning, match="named for step 9 but its meta.json says step 3"):
        assert latest_checkpoint(str(tmp_path)) is None


def test_forged_checksums_of_a_garbage_file_fail_in_one_line(tmp_path):
    path = save_good(tmp_path, 1)
    garbage = os.path.join(path, "model.safetensors")
    with open(garbage, "wb") as f:
        f.write(b"\xff" * 100)
    from bfcl.checkpoint import _sha256
    edit_meta(path, lambda m: m["files"]["model.safetensors"].update(bytes=100, sha256=_sha256(garbage)))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_unexpected_errors_while_reading_are_a_skip(tmp_path, monkeypatch):
    good = save_good(tmp_path, 1)
    save_good(tmp_path, 2)
    import bfcl.checkpoint as checkpoint
    real = checkpoint.read_meta
    monkeypatch.setattr(checkpoint, "read_meta", lambda p: real(p) if p == good else {}["boom"])
    with pytest.warns(UserWarning, match="unexpected KeyError"):
        assert latest_checkpoint(str(tmp_path)) == good


def test_a_good_checkpoint_still_loads_and_records_the_format(tmp_path):
    path = save_good(tmp_path, 5)
    model_state, optimizer_state, meta = load_checkpoint(path)
    assert meta["format"] == CHECKPOINT_FORMAT and meta["step"] == 5 and meta["epoch"] == 0.5
    model = small_model(99)
    load_model_state(model, model_state, path)
    check_weights(model.state_dict(), "checkpoint")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    load_optimizer_state(optimizer, [n for n, _ in model.named_parameters()], optimizer_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in model_state.items())


def test_keep_never_deletes_the_new_checkpoint(tmp_path):
    for step in (100, 200, 300):  # a longer run that used this folder before
        save_good(tmp_path, step)
    tensors = {"w": torch.zeros(2)}
    new = save_checkpoint(str(tmp_path), 10, tensors, {"w.mu": torch.zeros(2)}, {"config": {}}, keep=2)
    assert os.path.isdir(new) and len(list_checkpoints(str(tmp_path))) == 4
    save_checkpoint(str(tmp_path), 20, tensors, {}, {"config": {}}, keep=1)
    assert not os.path.exists(new)


def test_load_model_state_names_what_differs_in_one_line():
    model = small_model()
    state = dict(model.state_dict())
    del state["0.bias"], state["1.running_mean"]
    state["3.weight"] = torch.zeros(1)
    state["2.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_model_state(model, state, "ckpt")
    assert str(e.value) == ("checkpoint ckpt does not fit the model: 2 missing (e.g. 0.bias), 1 unexpected (e.g. "
                            "3.weight), 1 shape differs (e.g. 2.bias: checkpoint [3], model [2]); resume with the "
                            "settings it was made with")
    state = dict(model.state_dict(), **{"0.weight": torch.zeros(3, 4, dtype=torch.long)})
    with pytest.raises(CheckpointError, match=r"1 dtype differs \(e.g. 0.weight: checkpoint torch.int64"):
        load_model_state(model, state, "ckpt")


def test_optimizer_state_of_another_shape_is_refused():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    names = [n for n, _ in model.named_parameters()]
    state = {f"{n}.momentum_buffer": torch.zeros_like(p) for n, p in model.named_parameters()}
    state["2.weight.momentum_buffer"] = torch.zeros(3, 2)
    message = r"2.weight.momentum_buffer has shape \[3, 2\] but the parameter has \[2, 3\]"
    with pytest.raises(CheckpointError, match=message):
        load_optimizer_state(optimizer, names, state)
    adam = torch.optim.AdamW(model.parameters())
    scalar_step = {f"{n}.{k}": torch.zeros_like(p) if k != "step" else torch.tensor(3.0)
                   for n, p in model.named_parameters() for k in ("step", "exp_avg", "exp_avg_sq")}
    load_optimizer_state(adam, names, scalar_step)  # scalar 'step' entries are fine


@pytest.mark.parametrize("key, value, message", [
    ("0.weight", torch.full((3, 4), math.nan), "non-finite values in 1 tensor"),
    ("1.running_mean", torch.tensor([0.0, math.inf, 0.0]), "non-finite values"),
    ("2.weight", torch.zeros(2, 3, dtype=torch.int32), "stores 2.weight as torch.int32, not floating point"),
    ("1.running_var", torch.tensor([1.0, -0.5, 1.0]), "negative BatchNorm variances in 1.running_var"),
])
def test_check_weights_refuses_states_no_run_could_save(key, value, message):
    state = dict(small_model().state_dict())
    assert state["1.num_batches_tracked"].dtype == torch.long
    check_weights(state, "backbone x")  # the real thing passes, int num_batches_tracked included
    state[key] = value
    with pytest.raises(CheckpointError, match=message) as e:
        check_weights(state, "backbone x")
    assert str(e.value).startswith("backbone x ")


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pth.tar"
    path.write_bytes(bytes(range(7, 256)) * 16)
    with pytest.raises(CheckpointError, match="is not a checkpoint .*neither"):
        load_backbone_state(str(path))


KILLER = r"""
import sys, torch
from bfcl.checkpoint import save_checkpoint
out = sys.argv[1]
big = {"w": torch.randn(1_500_000)}
print("ready", flush=True)
for step in range(1, 10_000):
    save_checkpoint(out, step, big, {"w.mu": big["w"] * 0}, {"config": {}}, keep=2)
"""


@pytest.mark.slow
def test_sigkill_while_writing_checkpoints_leaves_a_loadable_one(tmp_path):
    """SIGKILL at arbitrary moments of a save loop: the newest complete checkpoint always loads."""
    for delay in (0.6, 0.85, 1.1, 1.45):
        proc = subprocess.Popen([sys.executable, "-c", KILLER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        path = latest_checkpoint(str(tmp_path))
        assert path is not None
        from bfcl.checkpoint import load_checkpoint
        model, optimizer, meta = load_checkpoint(path)  # verifies size and SHA-256
        assert model["w"].shape == (1_500_000,) and meta["step"] == int(path[-8:])
    # a later save cleans up the temporary directories the kills left behind
    save_checkpoint(str(tmp_path), 99_999, {"w": torch.zeros(1)}, {}, {"config": {}}, keep=1)
    assert [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith(".")] == []


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_skipped_in_auto_mode_and_an_error_when_named(tiny_data, straight_run,
                                                                                   tmp_path):
    shutil.copytree(straight_run / "checkpoints", tmp_path / "checkpoints")  # steps 4 and 8
    older, newest = list_checkpoints(str(tmp_path))[-2:]
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\x00" * 100)
    named = error_of(train.main, ["--data", tiny_data, "--output-dir", str(tmp_path / "other"), *TINY, "--resume",
                                  newest])
    assert named.startswith("error: ") and "SHA-256" in named

    auto = run(train_cmd(tiny_data, tmp_path))
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "SHA-256" in auto.stderr and f"{older} (step 4)" in auto.stdout
    assert metrics(tmp_path) and [(r["step"], r["loss"]) for r in metrics(tmp_path)] == \
        [(r["step"], r["loss"]) for r in metrics(straight_run)][4:]  # steps 5-8 again, as they were


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
    message = error_of(train.main, ["--data", tiny_data, "--output-dir", str(out), *TINY])
    assert "is at step 1000000, past this run's 8 steps" in message


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
    assert train.main(["--data", tiny_data, "--output-dir", str(out), *TINY]) == 0
    assert error_of(train.main, ["--data", tiny_data, "--output-dir", str(out), *TINY, "--patch-size", "4"]) \
        .endswith("restore them or pass --force-resume")
