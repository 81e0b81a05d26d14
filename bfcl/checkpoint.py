"""Checkpoints as safetensors + JSON: nothing pickled, so loading one can never run code.

A training checkpoint is a directory, written as a whole under a temporary name and renamed
into place, so a run killed at any moment leaves either the old set or the new one:

    <output-dir>/checkpoints/step-00001000/
        model.safetensors      model state, clean keys (no `module.` / `_orig_mod.` prefixes)
        optimizer.safetensors  optimizer state as "<parameter name>.<state key>" tensors
        meta.json              config, step, epoch, code version, scaler state, and the size
                               and SHA-256 of both tensor files (checked on load)
    <output-dir>/backbone.safetensors  the base backbone with torchvision's key names
"""

import hashlib
import json
import os
import re
import shutil
import warnings

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or of the wrong kind."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage; clone into plain CPU tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, path, metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_file_atomic(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """Write one safetensors file under a temporary name, then rename it over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    _save_tensors(tensors, tmp, metadata)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(output_dir: str, step: int, model_state: dict, optimizer_state: dict,
                    meta: dict, keep: int) -> str:
    """Write checkpoints/step-<step>/ atomically, then delete all but the newest `keep`."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    for stale in os.listdir(root):  # left by a run killed while saving; only one process saves
        if stale.startswith(".step-"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    tmp = os.path.join(root, f".step-{step:08d}.tmp-{os.getpid()}")
    os.makedirs(tmp)
    files = {}
    for name, tensors in (("model.safetensors", model_state), ("optimizer.safetensors", optimizer_state)):
        path = os.path.join(tmp, name)
        _save_tensors(tensors, path)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({**meta, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # a re-save of the same step (e.g. a stop right after a save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint directories in output_dir, oldest first (temporary ones excluded)."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root)) if _STEP_DIR.match(d)]


def read_meta(path: str) -> dict:
    """meta.json of a checkpoint directory, after checking both tensor files' size and checksum."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or use --resume auto")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a bfcl checkpoint (no meta.json); pass a checkpoints/step-* directory")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt ({e}); use an earlier checkpoint") from None
    for name, expected in meta.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing; use an earlier checkpoint")
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            raise CheckpointError(f"{file} has {size} bytes, expected {expected['bytes']} (truncated?); use an earlier checkpoint")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file} fails its SHA-256 check (corrupt); use an earlier checkpoint")
    return meta


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """(model_state, optimizer_state, meta) of a verified checkpoint directory."""
    meta = read_meta(path)
    return load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(path, "optimizer.safetensors")), meta


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint that passes read_meta; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            read_meta(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
    return None


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, param_names: list[str]) -> dict:
    """Optimizer state as named tensors: "<param name>.<key>". param_names follows the order
    of the parameters in optimizer.param_groups. Hyper-parameters are not stored: the
    schedules recompute them from the step."""
    state = optimizer.state_dict()["state"]
    tensors = {}
    for index, name in enumerate(param_names):
        for key, value in state.get(index, {}).items():
            tensors[f"{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, param_names: list[str], tensors: dict) -> None:
    """Inverse of optimizer_state_tensors; every stored tensor must belong to a known parameter."""
    state, used = {}, set()
    for index, name in enumerate(param_names):
        entries = {k[len(name) + 1:]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        if entries:
            state[index] = entries
            used.update(f"{name}.{k}" for k in entries)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise CheckpointError(f"optimizer state for unknown parameters ({unknown[0]} ...); the model does not match the checkpoint")
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
