"""A small labelled image set, generated, for smoke tests and tests: no download needed.

Class c is a stripe pattern at orientation c·90°/C with random frequency, phase and colours
and pixel noise. Orientations stay within [0°, 90°) so a horizontal flip (which maps θ to
180° - θ) never turns one class into another; crops and colour jitter keep the orientation,
so the classes are learnable by a self-supervised model and checkable by kNN.

    python -m bfcl.synthetic OUT_DIR [--classes 4] [--train-per-class 64] [--val-per-class 16] [--size 32]
"""

import argparse
import math
import os

import torch
from PIL import Image


def stripes(label: int, num_classes: int, size: int, g: torch.Generator) -> torch.Tensor:
    """One uint8 image [size, size, 3] of class `label`."""
    theta = math.pi / 2 * label / num_classes
    freq = (2.0 + 2.0 * torch.rand((), generator=g).item()) / size  # 2-4 periods per image
    phase = 2 * math.pi * torch.rand((), generator=g).item()
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    wave = torch.sin(2 * math.pi * freq * (x * math.cos(theta) + y * math.sin(theta)) + phase)
    colours = torch.rand(2, 3, generator=g) * 255
    mix = ((wave + 1) / 2)[..., None]  # soft stripes, [size, size, 1]
    img = mix * colours[0] + (1 - mix) * colours[1] + 12 * torch.randn(size, size, 3, generator=g)
    return img.clamp(0, 255).to(torch.uint8)


def make_image_folder(root: str, classes: int = 4, train_per_class: int = 64, val_per_class: int = 16,
                      size: int = 32, seed: int = 0) -> str:
    """Write root/{train,val}/class_<c>/<i>.jpg and return root. Deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                Image.fromarray(stripes(c, classes, size, g).numpy()).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return root


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--train-per-class", type=int, default=64)
    p.add_argument("--val-per-class", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make_image_folder(a.root, a.classes, a.train_per_class, a.val_per_class, a.size, a.seed)
    print(f"wrote {a.root}/train and {a.root}/val")
