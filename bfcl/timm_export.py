"""ViT backbones for timm: bfcl's export (torchvision's VisionTransformer keys) renamed to timm's.

    python -m bfcl.export --format timm runs/pretrain/backbone.safetensors backbone-timm.safetensors
    train.py ... --export-format timm     # also writes <output-dir>/backbone-timm.safetensors

The file loads with strict=True into the timm model named in its metadata, and gives the same
features as bfcl's backbone (the cls token after the final LayerNorm, what probe.py uses):

    import json, timm
    from safetensors import safe_open
    from safetensors.torch import load_file
    meta = safe_open(path, "pt").metadata()
    model = timm.create_model(meta["timm_model"], num_classes=0, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(path), strict=True)

timm_kwargs holds img_size and patch_size (any bfcl trained at) and num_heads: MoCo v3's ViT-Small
has 12 heads where timm's vit_small has 6 (bfcl/vit.py VIT_SIZES). The head count does not change
any tensor's shape, so the file also loads strictly without it, but only with it are the features
bfcl's. ResNet exports need no conversion: torchvision's and timm's ResNet keys are the same.
"""

import json
import re

from bfcl.checkpoint import CheckpointError, save_file_atomic
from bfcl.vit import VIT_SIZES, _BLOCK_KEYS, _TOP_KEYS

TIMM_FORMAT = "bfcl-timm-vit-1"
TIMM_FILE = "backbone-timm.safetensors"  # beside backbone.safetensors in --output-dir
_TV_BLOCK = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)")
_TOP_TO_TIMM = {tv: timm for timm, tv in _TOP_KEYS.items()}
_BLOCK_TO_TIMM = {tv: timm for timm, tv in _BLOCK_KEYS.items()}


def timm_key(key: str) -> str:
    """One torchvision VisionTransformer key -> timm's name (the inverse of bfcl.vit.timm_to_torchvision)."""
    if key in _TOP_TO_TIMM:
        return _TOP_TO_TIMM[key]
    match = _TV_BLOCK.fullmatch(key)
    if match:
        index, rest = match.groups()
        for tv, timm in _BLOCK_TO_TIMM.items():
            if rest == tv or rest.startswith(tv + "."):
                return f"blocks.{index}.{timm}{rest[len(tv):]}"
    raise ValueError(f"unexpected key {key!r} in a torchvision ViT state dict; it has no timm name")


def torchvision_to_timm(state: dict) -> dict:
    """Rename a torchvision VisionTransformer backbone state (no heads) to timm's ViT keys; tensors
    unchanged (cls [1, 1, D], pos [1, 1 + G², D], qkv [3D, D] in q, k, v order in both)."""
    return {timm_key(k): v for k, v in state.items()}


def timm_model(arch: str, patch_size: int, image_size: int) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) for a bfcl ViT of this size, patch and image size."""
    if arch not in VIT_SIZES:
        raise ValueError(f"{arch} is not a ViT; timm export is for {', '.join(VIT_SIZES)} (ResNet exports already "
                         "load into timm: the key names are the same)")
    return f"{arch}_patch16_224", {"img_size": image_size, "patch_size": patch_size, "num_heads": VIT_SIZES[arch][2]}


def export_timm(state: dict, path: str, *, arch: str, patch_size: int, image_size: int, step: int) -> None:
    """Write a torchvision-keyed ViT backbone state to `path` with timm's keys and, in the
    metadata, the timm model name and create_model kwargs that rebuild it."""
    name, kwargs = timm_model(arch, patch_size, image_size)
    metadata = {"format": TIMM_FORMAT, "arch": arch, "timm_model": name, "timm_kwargs": json.dumps(kwargs),
                "step": str(step)}
    save_file_atomic(torchvision_to_timm(state), path, metadata)


def convert_export(source: str, out: str) -> str:
    """Convert an existing bfcl ViT export (a file or run folder probe.py reads) into a timm file;
    returns the timm model line for the user. CheckpointError / ValueError in one line."""
    from bfcl.pretrained import guess_architecture, load_backbone_state

    state, info = load_backbone_state(source)
    found = guess_architecture(state)
    if "patch_size" not in found:
        raise ValueError(f"{source} holds a {found.get('arch') or 'non-ViT'} backbone; --format timm converts ViT "
                         "exports (ResNet exports load into timm as they are)")
    if found["arch"] is None:
        raise CheckpointError(f"{source} is a ViT of a size bfcl does not build; nothing to convert")
    export_timm(state, out, arch=found["arch"], patch_size=found["patch_size"], image_size=found["image_size"],
                step=info.get("step", 0))
    name, kwargs = timm_model(found["arch"], found["patch_size"], found["image_size"])
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return f'{out}: timm.create_model("{name}", num_classes=0, {args})'


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m bfcl.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--format", required=True, choices=("timm",), help="the key names to write")
    p.add_argument("source", help="a bfcl ViT export: backbone.safetensors, a run folder or a checkpoint folder")
    p.add_argument("out", help="the .safetensors file to write")
    args = p.parse_args(argv)
    try:
        print(convert_export(args.source, args.out))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
