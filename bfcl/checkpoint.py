"""Checkpoints as safetensors + JSON: nothing pickled, so loading one can never run code.

A training checkpoint is a directory, written as a whole under a temporary name and renamed
into place, so a run killed at any moment leaves either the old set or the new one:

    <output-dir>/checkpoints/step-00001000/
        model.safetensors      model state, clean keys (no `module.` / `_orig_mod.` prefixes)
        optimizer.safetensors  optimizer state as "<parameter name>.<state key>" tensors
        meta.json              config, step, epoch, code version, scaler state, the precision
                               trained in, and the size and SHA-256 of both tensor files (checked on load)
    <output-dir>/backbone.safetensors  the base backbone with torchvision's key names
"""

import hashlib
import json
import math
import os
import re
import shutil
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bfcl.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "bfcl-checkpoint-1"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
MAX_META_BYTES = 16 << 20  # ours are a few KB; a bigger meta.json is not one of ours
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
PRECISIONS = ("no", "fp16", "bf16", "fp8")  # Accelerate's mixed_precision values


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


def umask() -> int:
    """This process's umask, read without changing it (Linux), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _save_tensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage; clone into plain CPU tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, path, metadata=metadata)
    # safetensors creates its files with mode 0600; like every other file bfcl writes (open()), they
    # follow the umask, so that whoever may read the output folder may read the weights
    os.chmod(path, 0o666 & ~umask())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_error(what: str, e: Exception, kept: str) -> "CheckpointError":
    """One line for a write that failed (a full disk, a file-size limit, a folder made read-only):
    what was not written, why, what is still intact, and the fix."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
    return CheckpointError(f"cannot write {what} ({reason}); {kept}; free some space or make the folder writable, "
                           "then run the same command again")


def save_file_atomic(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """Write one safetensors file under a temporary name, then rename it over `path`. A failed
    write removes the temporary and raises CheckpointError in one line; `path` is left as it was."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _save_tensors(tensors, tmp, metadata)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except (OSError, SafetensorError) as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        kept = f"{path} is unchanged" if os.path.exists(path) else "nothing was written"
        raise _write_error(path, e, kept) from None


def save_checkpoint(output_dir: str, step: int, model_state: dict, optimizer_state: dict,
                    meta: dict, keep: int) -> str:
    """Write checkpoints/step-<step>/ atomically, then delete the oldest so that `keep` remain
    (0: keep all). Only checkpoints of earlier steps are deleted: a folder of later steps (left by
    another run in this --output-dir) is never taken for an old one, nor is the new one."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    for stale in os.listdir(root):  # left by a run killed while saving; only one process saves
        if stale.startswith(".step-"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    tmp = os.path.join(root, f".step-{step:08d}.tmp-{os.getpid()}")
    try:
        os.makedirs(tmp)
        files = {}
        for name, tensors in (("model.safetensors", model_state), ("optimizer.safetensors", optimizer_state)):
            path = os.path.join(tmp, name)
            _save_tensors(tensors, path)
            files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "format": CHECKPOINT_FORMAT, "step": step, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
    except (OSError, SafetensorError) as e:  # the checkpoints already in place are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise _write_error(f"checkpoint step {step} in {root}", e, kept) from None
    if os.path.exists(final):  # a re-save of the same step (e.g. a stop right after a save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    earlier = [p for p in list_checkpoints(output_dir) if int(os.path.basename(p)[5:]) < step]
    for old in earlier[:max(0, len(earlier) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint directories in output_dir, oldest first (temporary ones excluded)."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root)) if _STEP_DIR.match(d)]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta(meta, meta_path: str) -> None:
    """Schema and ranges of a parsed meta.json; CheckpointError names the field."""
    def refuse(field: str, expected: str, value) -> None:
        raise CheckpointError(f"{meta_path}: {field} must be {expected}, found {_short(value)}; the file is damaged "
                              "or not written by bfcl, use an earlier checkpoint")
    if not isinstance(meta, dict):
        refuse("the top level", "a JSON object", type(meta).__name__)
    if meta.get("format") != CHECKPOINT_FORMAT:
        refuse('"format"', f'"{CHECKPOINT_FORMAT}"', meta.get("format"))
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != set(TENSOR_FILES):
        refuse('"files"', f"an object with exactly {' and '.join(TENSOR_FILES)}",
               sorted(files) if isinstance(files, dict) else files)
    for name in TENSOR_FILES:
        entry = files[name]
        if not isinstance(entry, dict):
            refuse(f'"files.{name}"', 'an object with "bytes" and "sha256"', entry)
        if not _is_int(entry.get("bytes")) or entry["bytes"] < 0:
            refuse(f'"files.{name}.bytes"', "an integer >= 0", entry.get("bytes"))
        if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            refuse(f'"files.{name}.sha256"', "64 lowercase hex digits", entry.get("sha256"))
    if not _is_int(meta.get("step")) or meta["step"] < 0:
        refuse('"step"', "an integer >= 0", meta.get("step"))
    if not isinstance(meta.get("config"), dict):
        refuse('"config"', "an object", meta.get("config"))
    epoch = meta.get("epoch", 0)
    if not (_is_int(epoch) or isinstance(epoch, float)) or not math.isfinite(epoch) or epoch < 0:
        refuse('"epoch"', "a finite number >= 0", epoch)
    if "steps_per_epoch" in meta and (not _is_int(meta["steps_per_epoch"]) or meta["steps_per_epoch"] < 1):
        refuse('"steps_per_epoch"', "an integer >= 1", meta["steps_per_epoch"])
    images = meta.get("images")
    if images is not None and not (isinstance(images, dict) and _is_int(images.get("count")) and images["count"] >= 0
                                   and isinstance(images.get("sha256"), str) and _SHA256.match(images["sha256"])):
        refuse('"images"', 'null or {"count": an integer >= 0, "sha256": 64 hex digits}', images)
    if meta.get("precision") is not None and meta["precision"] not in PRECISIONS:
        refuse('"precision"', f"null or one of {', '.join(PRECISIONS)}", meta["precision"])
    scaler = meta.get("scaler")
    if scaler is not None and (not isinstance(scaler, dict) or not all(
            (_is_int(v) or isinstance(v, float)) and math.isfinite(v) for v in scaler.values())):
        refuse('"scaler"', "null or an object of finite numbers", scaler)


def read_meta(path: str) -> dict:
    """meta.json of a checkpoint directory, after checking its schema and ranges and both tensor
    files' size and SHA-256. Anything wrong is one CheckpointError naming the file and the fix."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or use --resume auto")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a bfcl checkpoint (no meta.json); pass a checkpoints/step-* directory")
    try:
        if os.path.getsize(meta_path) > MAX_META_BYTES:
            raise CheckpointError(f"{meta_path} is {os.path.getsize(meta_path)} bytes, not a bfcl meta.json; "
                                  "use an earlier checkpoint")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{meta_path} is corrupt ({type(e).__name__}: {_short(str(e))}); "
                              "use an earlier checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"{meta_path} cannot be read ({e.strerror}); check its permissions") from None
    _check_meta(meta, meta_path)
    named = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != meta["step"]:
        raise CheckpointError(f"{path} is named for step {int(named.group(1))} but its meta.json says step "
                              f"{meta['step']}; it was renamed or mixed up, use another checkpoint")
    for name, expected in meta["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing; use an earlier checkpoint")
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            raise CheckpointError(f"{file} has {size} bytes, expected {expected['bytes']} (truncated?); "
                                  "use an earlier checkpoint")
        try:
            digest = _sha256(file)
        except OSError as e:
            raise CheckpointError(f"{file} cannot be read ({e.strerror}); check its permissions") from None
        if digest != expected["sha256"]:
            raise CheckpointError(f"{file} fails its SHA-256 check (corrupt); use an earlier checkpoint")
    return meta


def _load_tensors(file: str) -> dict:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({_short(str(e))}); "
                              "use an earlier checkpoint") from None


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """(model_state, optimizer_state, meta) of a verified checkpoint directory."""
    meta = read_meta(path)
    return _load_tensors(os.path.join(path, "model.safetensors")), \
        _load_tensors(os.path.join(path, "optimizer.safetensors")), meta


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint that passes read_meta; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            read_meta(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
        except Exception as e:  # noqa: BLE001 -- a malformed checkpoint must never stop auto-resume
            warnings.warn(f"skipping checkpoint {path}: unexpected {type(e).__name__} ({_short(str(e))})", stacklevel=2)
    return None


def _mismatch(kind: str, keys: list[str], describe=lambda key: key) -> str:
    return f"{len(keys)} {kind} (e.g. {describe(keys[0])})" if keys else ""


def load_model_state(model: torch.nn.Module, state: dict, path: str) -> None:
    """model.load_state_dict(state, strict=True), after comparing keys, shapes and dtypes so
    that a checkpoint of other settings fails in one line naming what differs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    common = sorted(set(own) & set(state))
    shapes = [k for k in common if tuple(state[k].shape) != tuple(own[k].shape)]
    dtypes = [k for k in common if own[k].is_floating_point() and not state[k].is_floating_point()]
    problems = [_mismatch("missing", missing), _mismatch("unexpected", unexpected),
                _mismatch("shape differs" if len(shapes) == 1 else "shapes differ", shapes,
                          lambda k: f"{k}: checkpoint {list(state[k].shape)}, model {list(own[k].shape)}"),
                _mismatch("dtype differs" if len(dtypes) == 1 else "dtypes differ", dtypes,
                          lambda k: f"{k}: checkpoint {state[k].dtype}, model {own[k].dtype}")]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {', '.join(problems)}; "
                              "resume with the settings it was made with")
    model.load_state_dict(state, strict=True)


def check_weights(state: dict, what: str) -> None:
    """Refuse a state dict that no training run could have saved: non-finite values (a run that
    diverged), weights or BatchNorm statistics that are not floating point, or negative
    BatchNorm variances. `what` names it in the message ("checkpoint X", "backbone Y")."""
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{what} holds non-finite values in {len(nonfinite)} tensor(s) (e.g. {nonfinite[0]}); "
                              "the run diverged before it was saved, use an earlier checkpoint")
    stats = ("weight", "bias", "running_mean", "running_var")
    not_float = [k for k, v in state.items() if k.rsplit(".", 1)[-1] in stats and not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{what} stores {not_float[0]} as {state[not_float[0]].dtype}, not floating point; "
                              "it is damaged or not a model state, use another file")
    negative = [k for k, v in state.items() if k.endswith("running_var") and (v < 0).any()]
    if negative:
        raise CheckpointError(f"{what} has negative BatchNorm variances in {negative[0]}; it is damaged, "
                              "use an earlier checkpoint")


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
    """Inverse of optimizer_state_tensors; every stored tensor must belong to a known parameter,
    and per-element state (momentum, exp_avg, ...) must have its parameter's shape."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != len(param_names):
        raise ValueError(f"{len(param_names)} names for the optimizer's {len(params)} parameters")
    state, used = {}, set()
    for index, (name, param) in enumerate(zip(param_names, params)):
        entries = {k[len(name) + 1:]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        for key, value in entries.items():
            if value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"optimizer state {name}.{key} has shape {list(value.shape)} but the parameter "
                                      f"has {list(param.shape)}; the model does not match the checkpoint")
        if entries:
            state[index] = entries
            used.update(f"{name}.{k}" for k in entries)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise CheckpointError(f"optimizer state for unknown parameters ({unknown[0]} ...); "
                              "the model does not match the checkpoint")
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def recorded_precision(meta: dict, path: str) -> str | None:
    """The precision the checkpoint at `path` trained in: its meta.json's "precision" (bfcl since issue 33
    case 15), else the first word of the "precision" line that its run folder's config.json derived
    (written by every run since the start-up summary named the precision), else None (unknown)."""
    if meta.get("precision") in PRECISIONS:
        return meta["precision"]
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.json"),
                  encoding="utf-8") as f:
            derived = json.load(f)["derived"]["precision"]
        word = derived.split()[0]
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError, IndexError):
        return None
    return word if word in PRECISIONS else None


def peek_precision(output_dir: str, resume: str) -> tuple[str, str] | None:
    """(precision, checkpoint path) that a resume will continue in, read before the run is set up (the
    precision must be known before the Accelerator is built): the newest checkpoint whose meta.json
    parses (resume 'auto') or the one named; None for a fresh start or an unknown precision. Only a
    glance: resume_checkpoint verifies the checkpoint it takes and refuses one trained in another
    precision than the run's, so a wrong glance cannot go unnoticed."""
    if resume == "none":
        return None
    for path in reversed(list_checkpoints(output_dir)) if resume == "auto" else [resume]:
        try:
            if os.path.getsize(os.path.join(path, "meta.json")) > MAX_META_BYTES:
                continue
            with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(meta, dict):
            precision = recorded_precision(meta, path)
            return (precision, path) if precision is not None else None
    return None


def resume_checkpoint(output_dir: str, resume: str, config: dict, may_change: set, force: bool,
                      total_steps: int, added: dict | None = None,
                      images: dict | None = None, precision: str | None = None) -> tuple[str | None, dict | None]:
    """What a script resumes from: (None, None) for a fresh start, else (path, {"model",
    "optimizer", "meta"}) of a verified checkpoint whose weights are sane, whose settings match
    `config` (except the keys in may_change, or anything with force) and whose step lies within
    the run. resume is 'auto' (the newest good checkpoint in output_dir, if any), 'none' (refused
    where checkpoints exist: a later 'auto' would pick up the old run's) or a checkpoint folder.
    `added` holds options that older checkpoints do not record, with the value they had then.
    `images` is the identity of this run's training images (bfcl.index.ImageIndex.identity):
    where the checkpoint records one, a different list or order is refused unless `force`, whatever
    files beside the checkpoint say. `precision` is the precision this run trains in (Accelerate's
    mixed_precision): where the checkpoint's is known (recorded_precision), the precisions are compared
    instead of the --mixed-precision flags, since one flag (auto, or none) gives different precisions on
    different machines and launchers. Every refusal is a one-line CheckpointError."""
    if resume == "none":
        if list_checkpoints(output_dir):
            raise CheckpointError(f"--output-dir {output_dir} already holds checkpoints of another run; continue it "
                                  "with --resume auto, or choose an empty --output-dir")
        return None, None
    path = latest_checkpoint(output_dir) if resume == "auto" else resume
    if path is None:
        return None, None
    model_state, optimizer_state, meta = load_checkpoint(path)
    check_weights(model_state, f"checkpoint {path}")
    old = {**(added or {}), **meta["config"]}
    trained_in = recorded_precision(meta, path) if precision is not None else None
    if trained_in is not None:
        may_change = {*may_change, "mixed_precision"}
    changed = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
               if k not in may_change and old.get(k) != config.get(k)]
    if trained_in is not None and trained_in != precision:
        changed.append(f"precision: trained in {trained_in!r}, this run's {precision!r}")
    if changed and not force:
        raise CheckpointError(f"cannot resume {path}: settings differ ({'; '.join(changed)}); restore them or pass "
                              "--force-resume")
    recorded = meta.get("images")
    if images is not None and recorded is not None and recorded != images and not force:
        raise CheckpointError(
            f"cannot resume {path}: it was trained on {recorded['count']} images (list SHA-256 "
            f"{recorded['sha256'][:12]}), the data now gives {images['count']} (SHA-256 {images['sha256'][:12]}): "
            "other images or another order. Restore the data as it was, or pass --force-resume to continue "
            "on these images")
    if meta["step"] > total_steps:
        raise CheckpointError(f"{path} is at step {meta['step']}, past this run's {total_steps} steps; resume it "
                              "with the settings it was made with, or pass --resume none")
    return path, {"model": model_state, "optimizer": optimizer_state, "meta": meta}
