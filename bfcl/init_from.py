"""Continued pretraining: train.py --init-from WEIGHTS starts MoCo v3 from an existing backbone.

WEIGHTS is anything probe.py --pretrained reads (bfcl/pretrained.py: a run folder or its
backbone.safetensors, a checkpoints/step-* folder, a MoCo v3 / BatchFormer .pth.tar, a torchvision
or timm state dict), or "torchvision": torchvision's ImageNet weights for the arch, read through
torchvision's weights API (torch hub's cache). Only the backbone is taken, into both encoders
(MoCo.base_encoder.backbone and momentum_encoder.backbone hold the same tensors at step 0, as in a
fresh MoCo); projector, predictor and BatchFormer keep their seeded fresh init, and the optimizer
and the lr and momentum schedules start at step 0 (Reed et al., "Self-Supervised Pretraining
Improves Self-Supervised Pretraining", WACV 2022, continue the same way). docs/init-from.md.

Keys are strict: the only tensors of WEIGHTS left out are the classifier's (fc, heads, or MoCo v3's
projector under base_encoder.fc/head) and the parts of a MoCo checkpoint that are not the backbone
(momentum encoder, predictor, projector, BatchFormer); anything else is an InitError naming the keys.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn

from bfcl.checkpoint import CheckpointError, _sha256
from bfcl.model import is_vit
from bfcl.pretrained import guess_architecture, load_backbone_state

TORCHVISION = "torchvision"
# bfcl arch -> torchvision's model name with ImageNet weights (same architecture and key names).
TORCHVISION_MODELS = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50", "vit_base": "vit_b_16"}
# Top-level modules of a checkpoint that may be left out: classifiers and MoCo's non-backbone parts.
NOT_BACKBONE = {"fc", "head", "heads", "projector", "predictor", "momentum_encoder", "batchformer"}


class InitError(CheckpointError):
    """WEIGHTS cannot start this run: unreadable, another architecture, or unexpected keys."""


@dataclass(frozen=True)
class InitWeights:
    """A backbone state with torchvision key names and where it came from."""

    state: dict
    source: str  # what the file is (bfcl export, MoCo v3 original, torchvision ImageNet weights, ...)
    path: str  # the file read (the tensor file inside a folder)
    sha256: str

    def describe(self) -> str:
        return f"{self.source} from {self.path} (sha256 {self.sha256})"


def torchvision_weights_file(arch: str) -> tuple[object, str]:
    """(torchvision's DEFAULT weights enum for arch, the path torch hub caches its file at)."""
    import torchvision

    if arch not in TORCHVISION_MODELS:
        raise InitError(f"torchvision has no ImageNet weights for {arch}; --init-from torchvision takes "
                        f"{', '.join(TORCHVISION_MODELS)}")
    weights = torchvision.models.get_model_weights(TORCHVISION_MODELS[arch]).DEFAULT
    return weights, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def read_torchvision(arch: str, stem: str, patch_size: int, image_size: int) -> InitWeights:
    """torchvision's ImageNet weights for arch (downloaded into torch hub's cache once)."""
    weights, cached = torchvision_weights_file(arch)
    if not is_vit(arch) and stem != "imagenet":
        raise InitError(f"torchvision's {arch} weights have the imagenet stem, not --stem {stem}; pass --stem imagenet")
    if is_vit(arch) and (patch_size, image_size) != (16, 224):
        raise InitError(f"torchvision's {TORCHVISION_MODELS[arch]} has patch 16 at 224 px, not patch {patch_size} at "
                        f"{image_size} px; pass --patch-size 16 --image-size 224")
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as e:  # offline: URLError, OSError, ...; a damaged cache file: RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InitError(f"cannot get torchvision's {weights} ({first}); download {weights.url} and put it at "
                        f"{cached}, or pass a weights file to --init-from") from None
    state = {k: v for k, v in state.items() if k.split(".")[0] not in NOT_BACKBONE}
    return InitWeights(state, f"torchvision {weights}", cached, _sha256(cached))


def tensor_file(path: str) -> str:
    """The file whose bytes a folder's weights come from (for the SHA-256 in the summary)."""
    if not os.path.isdir(path):
        return path
    for name in ("model.safetensors", "backbone.safetensors"):  # checkpoint folder, run folder
        if os.path.isfile(os.path.join(path, "meta.json" if name == "model.safetensors" else name)):
            return os.path.join(path, name)
    return path


def read_init_weights(source: str, arch: str, stem: str, patch_size: int, image_size: int) -> InitWeights:
    """The backbone of WEIGHTS checked against the run's architecture, or InitError in one line."""
    if source == TORCHVISION:
        init = read_torchvision(arch, stem, patch_size, image_size)
    else:
        try:
            state, info = load_backbone_state(source)
        except CheckpointError as e:
            raise InitError(f"--init-from: {e}") from None
        extra = [group for group in info["ignored"] if group.split(".")[-1] not in NOT_BACKBONE]
        if extra:
            raise InitError(f"--init-from {source}: unexpected tensors {', '.join(extra[:5])}"
                            f"{' ...' if len(extra) > 5 else ''} (only the classifier, projector, predictor, momentum "
                            "encoder and BatchFormer may be left out); pass a backbone of the same architecture")
        path = tensor_file(source)
        init = InitWeights(state, info["source"], path, _sha256(path))
    check_architecture(init.state, source, arch, stem, patch_size, image_size)
    return init


def check_architecture(state: dict, source: str, arch: str, stem: str, patch_size: int, image_size: int) -> None:
    """One line when the tensors are another arch, stem, patch size or image size than the run's."""
    found = guess_architecture(state)
    if is_vit(arch):
        want = {"arch": arch, "patch_size": patch_size, "image_size": image_size}
        flags = f"-a {found.get('arch')} --patch-size {found.get('patch_size')} --image-size {found.get('image_size')}"
    else:
        want = {"arch": arch, "stem": stem}
        flags = f"-a {found.get('arch')} --stem {found.get('stem')}"
    if found.get("arch") is None:
        raise InitError(f"--init-from {source} is not a backbone bfcl builds (neither a known ResNet nor ViT); "
                        f"pass weights of -a {arch}")
    differ = [k for k in want if found.get(k) != want[k]]
    if differ:
        got = ", ".join(f"{k} {found.get(k)}" for k in differ)
        run = ", ".join(f"{k} {want[k]}" for k in differ)
        raise InitError(f"--init-from {source} holds {got}, but this run has {run}; pass {flags} or other weights")


def load_into_both_encoders(moco: nn.Module, state: dict) -> None:
    """Copy the backbone tensors into base_encoder.backbone and momentum_encoder.backbone in place
    (the optimizer keeps its references), strictly: every backbone tensor must be given, nothing else."""
    own = moco.base_encoder.backbone.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = [f"missing {', '.join(missing[:5])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
                 f"shape of {shapes[0]} {list(state[shapes[0]].shape)} vs {list(own[shapes[0]].shape)}" if shapes
                 else ""]
        raise InitError(f"--init-from weights do not fit the backbone: {'; '.join(p for p in parts if p)}; "
                        "pass weights of the same architecture")
    for encoder in (moco.base_encoder, moco.momentum_encoder):
        encoder.backbone.load_state_dict(state, strict=True)
