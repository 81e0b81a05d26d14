"""The backbone export: what train.py leaves for probe.py and for anyone with torchvision.

    <output-dir>/backbone.safetensors   the base encoder's backbone, torchvision key names, no head

Its safetensors metadata records how to rebuild the model without flags:
    format      BACKBONE_FORMAT
    arch        resnet18 | resnet34 | resnet50 | vit_tiny | vit_small | vit_base
    stem        imagenet | small                (ResNets)
    patch_size  16, 8, 4, ...                   (ViTs)
    image_size  the pretraining crop side
    step        the training step it was taken at

Metadata is input too: read_export_metadata checks every field's type and range, so a crafted
file cannot make the probe build a 100000-pixel model.
"""

from bfcl.checkpoint import CheckpointError, save_file_atomic
from bfcl.model import ARCHS, STEMS, VIT_ARCHS, is_vit

BACKBONE_FORMAT = "bfcl-backbone-1"
LEGACY_FORMATS = ("torchvision-resnet-backbone",)  # ResNet exports of bfcl 0.1.0
BACKBONE_PREFIX = "base_encoder.backbone."  # where the backbone sits in MoCo's state dict
MAX_IMAGE_SIZE = 4096


def backbone_state(model_state: dict) -> dict:
    """The base backbone's tensors from a MoCo state dict, with torchvision key names."""
    return {k[len(BACKBONE_PREFIX):]: v for k, v in model_state.items() if k.startswith(BACKBONE_PREFIX)}


def export_backbone(model_state: dict, path: str, *, arch: str, image_size: int, step: int,
                    stem: str | None = None, patch_size: int | None = None) -> None:
    """Write the base backbone of a MoCo state dict to `path` atomically, with its metadata."""
    metadata = {"format": BACKBONE_FORMAT, "arch": arch, "image_size": str(image_size), "step": str(step)}
    if is_vit(arch):
        metadata["patch_size"] = str(patch_size)
    else:
        metadata["stem"] = stem
    save_file_atomic(backbone_state(model_state), path, metadata)


def _int_field(metadata: dict, key: str, low: int, high: int, path: str) -> int:
    value = metadata[key]
    if not (isinstance(value, str) and value.isdigit() and low <= int(value) <= high):
        raise CheckpointError(f"{path}: metadata {key}={value!r} is not an integer in [{low}, {high}]; "
                              f"the file is damaged or was not written by bfcl, pass --arch/--image-size yourself")
    return int(value)


def read_export_metadata(metadata: dict, path: str) -> dict:
    """The checked fields of a safetensors file's metadata: {} for a file that is not a bfcl
    export; for one that is, arch and image_size and step, plus stem or patch_size.
    Raises CheckpointError in one line for any field of the wrong type or out of range."""
    fmt = metadata.get("format")
    if fmt != BACKBONE_FORMAT and fmt not in LEGACY_FORMATS:
        return {k: v for k, v in metadata.items() if k == "arch" and v in ARCHS + VIT_ARCHS}
    info = {"source": "bfcl backbone export"}
    arch = metadata.get("arch")
    if arch not in ARCHS + VIT_ARCHS:
        raise CheckpointError(f"{path}: metadata arch={arch!r} is not one of {', '.join(ARCHS + VIT_ARCHS)}; "
                              "the file is damaged, pass --arch yourself")
    info["arch"] = arch
    if is_vit(arch):
        info["patch_size"] = _int_field(metadata, "patch_size", 1, MAX_IMAGE_SIZE, path) if "patch_size" in metadata \
            else None
    elif "stem" in metadata:
        if metadata["stem"] not in STEMS:
            raise CheckpointError(f"{path}: metadata stem={metadata['stem']!r} is not one of {', '.join(STEMS)}; "
                                  "the file is damaged, pass --stem yourself")
        info["stem"] = metadata["stem"]
    if "image_size" in metadata:
        info["image_size"] = _int_field(metadata, "image_size", 8, MAX_IMAGE_SIZE, path)
    if "step" in metadata:
        info["step"] = _int_field(metadata, "step", 0, 10**12, path)
    return info


if __name__ == "__main__":  # python -m bfcl.export --format timm IN OUT: bfcl/timm_export.py
    from bfcl.timm_export import main

    raise SystemExit(main())
