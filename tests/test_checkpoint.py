"""Checkpoints by round trip (docs/reliability.md#outputs, #how-it-is-tested): safetensors + JSON, verified on load."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from bfcl.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                             load_optimizer_state, optimizer_state_tensors, save_checkpoint)
from bfcl.optim import LARS

META = {"config": {"lr": 0.6, "arch": "resnet18"}, "format": "bfcl-checkpoint-1"}


def small_model(seed: int) -> nn.Module:
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
