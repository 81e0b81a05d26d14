"""Pretrained ResNet and ViT backbones, from whatever file a user has, for probe.py.

Accepted, all read without unpickling code (safetensors, or torch.load(weights_only=True)):

    checkpoints/step-XXXXXXXX/       a bfcl training checkpoint (meta.json + model.safetensors)
    <run>/ or backbone.safetensors   a bfcl backbone export (torchvision keys, bfcl/export.py)
    checkpoint_0099.pth.tar          MoCo v3 / BatchFormer originals: module.base_encoder.* is taken,
                                     its fc or head (the projector) dropped, as are the momentum
                                     encoder, predictor and BatchFormer; ViT files (timm key names)
                                     are mapped onto torchvision's VisionTransformer (bfcl/vit.py)
    resnet50.pth / .safetensors      a plain torchvision state dict (optionally under "state_dict"
                                     or "model", optionally with DataParallel's module. prefix)

Every problem is a CheckpointError with a one-line message that names the file and the fix.
"""

import json
import os
import pickle
import zipfile
from collections import OrderedDict

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torchvision.models import VisionTransformer

from bfcl.checkpoint import CheckpointError, check_weights, read_meta
from bfcl.export import BACKBONE_FORMAT, read_export_metadata
from bfcl.model import ARCHS, STEMS, build_backbone, is_vit
from bfcl.paths import NotRegularFileError, check_regular
from bfcl.vit import is_timm_vit_state, timm_to_torchvision, vit_config_from_state

# The modules of a torchvision ResNet or VisionTransformer that hold the backbone's tensors
# (fc and heads are the classifier, or MoCo v3's projector). Anything else in a checkpoint
# (momentum encoder, predictor, BatchFormer) is not part of the backbone.
BACKBONE_PARTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "conv_proj", "class_token", "encoder")
TIMM_VIT_PARTS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")  # MoCo v3's vits.py (timm names)

# Where the backbone sits in each known layout, most specific first.
LAYOUTS = (
    ("base_encoder.backbone.", "bfcl model state"),
    ("module.base_encoder.", "MoCo v3 / BatchFormer original"),
    ("base_encoder.", "MoCo v3 original without module. prefix"),
    ("module.", "torchvision state dict with module. prefix"),
    ("", "torchvision state dict"),
)


def load_backbone_state(path: str) -> tuple[dict, dict]:
    """(backbone state with torchvision key names and no fc, info) of any accepted file.

    info has "source" (the layout found), "ignored" (top-level names of the tensors that are
    not backbone, e.g. "module.momentum_encoder"), and "arch", "stem", "step", "image_size"
    where the file records them.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; pass a checkpoint folder, backbone.safetensors or .pth.tar file")
    if not os.path.isdir(path):  # a FIFO would block the read forever, /dev/zero never end (bfcl/paths.py)
        try:
            check_regular(path, "--pretrained")
        except NotRegularFileError as e:
            raise CheckpointError(f"{e}; pass a checkpoint folder, backbone.safetensors or .pth.tar file") from None
    if os.path.isdir(path):
        tensors, info = _read_folder(path)
    elif path.endswith(".safetensors"):
        tensors, info = _read_safetensors(path)
    else:
        tensors, info = _read_torch(path)
    for prefix, layout in LAYOUTS:
        if any(k.startswith(prefix) for k in tensors):
            break
    timm = is_timm_vit_state(tensors)
    parts = TIMM_VIT_PARTS if timm else BACKBONE_PARTS
    state = {k[len(prefix):]: v for k, v in tensors.items()
             if k.startswith(prefix) and k[len(prefix):].split(".")[0] in parts}
    ignored = sorted({_group(k, prefix) for k in tensors if not (k.startswith(prefix) and k[len(prefix):] in state)})
    if not state:
        shown = ", ".join(list(tensors)[:3])
        raise CheckpointError(f"{path} holds no backbone tensors (keys like {shown}); probe.py evaluates "
                              f"torchvision ResNets and ViTs ({', '.join(ARCHS)})")
    if timm:
        try:
            state = timm_to_torchvision(state)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        layout += " (timm ViT keys, mapped to torchvision's)"
    check_weights(state, path)
    return state, {**info, "source": info.get("source", layout), "ignored": ignored}


def _group(key: str, prefix: str) -> str:
    """The module an ignored key belongs to: its path down to one level below where it leaves the
    backbone's prefix ('module.base_encoder.fc.0.weight' -> 'module.base_encoder.fc',
    'module.momentum_encoder.conv1.weight' -> 'module.momentum_encoder')."""
    parts, shared = key.split("."), prefix.split(".")[:-1]
    depth = next((i for i, (a, b) in enumerate(zip(parts, shared)) if a != b), len(shared))
    return ".".join(parts[:depth + 1])


def _read_folder(path: str) -> tuple[dict, dict]:
    """A training checkpoint (meta.json, checksums verified) or a run folder with backbone.safetensors."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        meta = read_meta(path)
        config = meta["config"]
        tensors = _safetensors_file(os.path.join(path, "model.safetensors"))
        # the config was checked when the run started; still, only well-typed values are taken
        metadata = {k: str(config[k]) for k in ("arch", "stem", "image_size", "patch_size") if k in config}
        info = read_export_metadata({**metadata, "format": BACKBONE_FORMAT, "step": str(meta["step"])}, path)
        return tensors, {**info, "source": "bfcl training checkpoint"}
    export = os.path.join(path, "backbone.safetensors")
    if os.path.isfile(export):
        return _read_safetensors(export)
    raise CheckpointError(f"{path} is a folder without meta.json or backbone.safetensors; pass a "
                          f"checkpoints/step-* folder, a run folder or a checkpoint file")


def _read_safetensors(path: str) -> tuple[dict, dict]:
    """Our backbone export (arch/stem in its metadata) or any safetensors state dict."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)}); "
                              "is it truncated?") from None
    return _safetensors_file(path), read_export_metadata(metadata, path)


def _safetensors_file(path: str) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)}); "
                              "is it truncated?") from None


def _looks_like_torch_save(path: str) -> bool:
    """torch.save's zip archive, or its legacy format, which opens with a pickle protocol 2+ header
    (0x80, version). Unreadable files pass, for torch.load to report."""
    try:
        if zipfile.is_zipfile(path):
            return True
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return True
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _read_torch(path: str) -> tuple[dict, dict]:
    """A .pth/.pth.tar file read with weights_only=True: tensors, numbers and strings only."""
    if not _looks_like_torch_save(path):
        raise CheckpointError(f"{path} is not a checkpoint (torch.save writes a zip archive or a pickle, and this "
                              "file is neither); pass a .pth/.pth.tar from torch.save, a .safetensors file or a run "
                              "folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(f"{path} contains Python objects that weights-only loading refuses (loading them "
                                  f"could run code); re-save it with tensors, numbers and strings only") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} cannot be read ({_first_line(e)}); "
                              "is it truncated or not a checkpoint?") from None
    info = {}
    if isinstance(obj, dict) and isinstance(obj.get("arch"), str):  # main_moco.py saves its --arch as "arch"
        if obj["arch"] not in ARCHS:
            raise CheckpointError(f"{path} holds a {obj['arch']}; probe.py evaluates {', '.join(ARCHS)}")
        info["arch"] = obj["arch"]
    if isinstance(obj, dict) and isinstance(obj.get("epoch"), int):
        info["epoch"] = obj["epoch"]
    for key in ("state_dict", "model"):  # MoCo v3 / DINO / MAE wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict (expected name -> tensor, under 'state_dict' or at the top)")
    return obj, info


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def guess_arch_stem(state: dict) -> tuple[str | None, str]:
    """(arch, stem) read off a torchvision-keyed ResNet state; arch None if not one of ARCHS.

    The stem is in conv1's kernel (7x7 imagenet, 3x3 small); the arch in the block counts of
    layer1-4 and whether blocks are bottlenecks (conv3).
    """
    stem = "small" if state["conv1.weight"].shape[-1] == 3 else "imagenet"
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in state
    known = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34", (True, (3, 4, 6, 3)): "resnet50"}
    return known.get((bottleneck, blocks)), stem


def guess_architecture(state: dict) -> dict:
    """What the tensors say: {"arch", "stem"} for a ResNet, {"arch", "patch_size", "image_size"}
    for a ViT (its position embedding fixes the token grid); arch None if unknown."""
    if "conv_proj.weight" in state:
        try:
            return vit_config_from_state(state)
        except ValueError:
            return {"arch": None}
    if "conv1.weight" in state:
        arch, stem = guess_arch_stem(state)
        return {"arch": arch, "stem": stem}
    return {"arch": None}


def linear_head(feature_dim: int, num_classes: int, bn: bool = False) -> nn.Module:
    """The probe's classifier, [N, C] -> [N, num_classes]: weight ~ N(0, 0.01²), bias 0 (MoCo v3).

    bn=True puts a parameter-free BatchNorm in front (MoCo v3 authors' suggestion, used by MAE's
    linear probe), which makes the lr less sensitive to the scale of the features.
    """
    linear = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(linear.weight, mean=0.0, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6), linear) if bn else linear


def head_name(model: nn.Module) -> str:
    """Where torchvision keeps the classifier: `fc` in a ResNet, `heads` in a VisionTransformer."""
    return "heads" if isinstance(model, VisionTransformer) else "fc"


def set_head(model: nn.Module, head: nn.Module) -> None:
    """Put `head` where torchvision's own classifier goes (a ViT's as heads.head), so that the
    state dict of the whole classifier loads into torchvision's model of the same arch."""
    if isinstance(model, VisionTransformer):
        model.heads = nn.Sequential(OrderedDict(head=head))
    else:
        model.fc = head


def probe_model(arch: str, stem: str, state: dict, num_classes: int, bn_head: bool = False, image_size: int = 224,
                patch_size: int = 16, freeze_backbone: bool = True) -> nn.Module:
    """Fresh build_backbone(...) with a linear head, backbone weights loaded, frozen unless
    freeze_backbone=False (fine-tuning).

    Keys are torchvision's, so loading must leave exactly the head's tensors missing (fc.weight
    and fc.bias, or heads.head.*; plus the BN buffers with bn_head) and nothing unexpected, as
    MoCo v3's main_lincls.py asserts. A checkpoint of another arch or stem fails in one line.
    """
    if arch not in ARCHS or stem not in STEMS:
        raise CheckpointError(f"unknown arch/stem {arch}/{stem}; choose from {', '.join(ARCHS)} / {', '.join(STEMS)}")
    model = build_backbone(arch, stem, image_size=image_size, patch_size=patch_size, stop_grad_conv1=False)
    set_head(model, linear_head(model.feature_dim, num_classes, bn_head))
    head = head_name(model) + "."
    expected = model.state_dict()
    head_keys = {k for k in expected if k.startswith(head)}
    wrong_shape = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state and k not in head_keys]
    if wrong_shape or unexpected or missing:
        guess = guess_architecture(state)
        looks = "an unsupported arch" if guess["arch"] is None else \
            f"{guess['arch']}, patch {guess['patch_size']}, {guess['image_size']} px" if "patch_size" in guess else \
            f"{guess['arch']} with the {guess['stem']} stem"
        problems = [f"{len(wrong_shape)} shapes differ (e.g. {wrong_shape[0]}: "
                    f"checkpoint {list(state[wrong_shape[0]].shape)}, "
                    f"model {list(expected[wrong_shape[0]].shape)})" if wrong_shape else "",
                    f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                    f"{len(missing)} missing (e.g. {missing[0]})" if missing else ""]
        built = f"{arch}, patch {patch_size}, {image_size} px" if is_vit(arch) else f"{arch} with the {stem} stem"
        raise CheckpointError(f"checkpoint does not fit {built}: {', '.join(p for p in problems if p)}; "
                              f"it looks like {looks}; pass --arch/--stem/--patch-size/--image-size to match")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # BatchNorm fills in an absent num_batches_tracked itself instead of reporting it missing.
    assert set(missing) == {k for k in head_keys if not k.endswith("num_batches_tracked")} and not unexpected, \
        f"loading left {missing} missing and {unexpected} unexpected; only the head may be missing"
    if freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(head)
    return model


def backbone_tensors(model: nn.Module) -> dict:
    """Copies of every backbone tensor of a probe model, BN buffers included (all but the head)."""
    head = head_name(model) + "."
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith(head)}


def assert_backbone_unchanged(model: nn.Module, reference: dict) -> None:
    """Raise AssertionError naming the first backbone tensor that differs from `reference`.

    The linear protocol must never move the backbone: not by a gradient, weight decay or
    BatchNorm statistics. MoCo v3's main_lincls.py checked this; the BatchFormer fork had
    disabled the check.
    """
    current = model.state_dict()
    assert set(reference) <= set(current), f"backbone tensors missing: {sorted(set(reference) - set(current))[:3]}"
    for key, value in reference.items():
        if not torch.equal(current[key].detach().cpu(), value):
            raise AssertionError(f"backbone tensor {key} changed during the linear probe; it must stay frozen")


def describe(info: dict) -> str:
    """One line for the printed config: 'bfcl backbone export, step 1200, resnet18/small'."""
    parts = [info["source"]] + [f"{k} {info[k]}" for k in ("step", "epoch") if info.get(k) is not None]
    if info.get("ignored"):
        parts.append(f"ignored {', '.join(info['ignored'])}")
    return "; ".join(parts)


if __name__ == "__main__":  # python -m bfcl.pretrained FILE: what probe.py would load
    import sys

    state, info = load_backbone_state(sys.argv[1])
    print(json.dumps({**info, "tensors": len(state), "guess": guess_architecture(state)}, indent=1))
