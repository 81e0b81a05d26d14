"""A small labelled image set, generated, for smoke tests and tests: no download needed.

Class c draws pattern family c % 4 (horizontal stripes, vertical stripes, a checkerboard,
concentric rings) at frequency band c // 4, with random phase, random colours and pixel
noise. Every family is its own mirror image, so a horizontal flip never turns one class into
another, and random crops and colour jitter keep the family: the classes are learnable by a
self-supervised model and checkable by kNN, while colour alone says nothing about the class.

    python -m bfcl.synthetic OUT_DIR [--classes 4] [--train-per-class 64] [--val-per-class 16] [--size 32]
    python -m bfcl.synthetic OUT_DIR --unlabelled [...]   # OUT_DIR/<year>/<month>/IMG_*.jpg, no classes, no val/
"""

import argparse
import math
import os

import torch
from PIL import Image

FAMILIES = ("horizontal", "vertical", "checkerboard", "rings")


def pattern_image(label: int, num_classes: int, size: int, g: torch.Generator) -> torch.Tensor:
    """One uint8 image [size, size, 3] of class `label`: horizontal stripes, vertical stripes, a
    checkerboard or concentric rings (FAMILIES[label % 4]) at frequency band label // 4, in two random
    colours with pixel noise. num_classes is kept for callers; the class alone fixes the pattern."""
    family, band = FAMILIES[label % 4], label // 4
    periods = (2.0 + band * 2.5 + 1.5 * torch.rand((), generator=g).item())  # periods across the image
    phase = 2 * math.pi * torch.rand((), generator=g).item()
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    w = 2 * math.pi * periods
    if family == "horizontal":
        wave = torch.sin(w * y + phase)
    elif family == "vertical":
        wave = torch.sin(w * x + phase)
    elif family == "checkerboard":
        wave = torch.sin(w * x + phase) * torch.sin(w * y + phase)
    else:
        cy, cx = 0.5 + 0.2 * (torch.rand(2, generator=g) - 0.5)
        wave = torch.sin(w * ((x - cx) ** 2 + (y - cy) ** 2).sqrt() + phase)
    colours = torch.rand(2, 3, generator=g) * 255
    mix = ((wave.sign() + 1) / 2)[..., None]  # hard edges, [size, size, 1]
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
                Image.fromarray(pattern_image(c, classes, size, g).numpy()).save(os.path.join(folder, f"{i:05d}.jpg"),
                                                                           quality=90)
    return root


def make_unlabelled_folder(root: str, classes: int = 4, images: int = 256, size: int = 32, seed: int = 0) -> str:
    """Write `images` images of the same patterns, class unnamed, nested like a photo dump:
    root/<year>/<month>/IMG_<i>.jpg over 6 month folders (and a hidden file and a text file, which
    the index leaves out). Deterministic in `seed`; returns root."""
    g = torch.Generator().manual_seed(seed)
    for i in range(images):
        folder = os.path.join(root, str(2020 + i % 2), f"{1 + i % 3:02d}")
        os.makedirs(folder, exist_ok=True)
        label = int(torch.randint(classes, (), generator=g))
        Image.fromarray(pattern_image(label, classes, size, g).numpy()).save(os.path.join(folder, f"IMG_{i:05d}.jpg"),
                                                                       quality=90)
    open(os.path.join(root, ".DS_Store"), "w").close()
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("unlabelled synthetic images\n")
    return root


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--train-per-class", type=int, default=64)
    p.add_argument("--val-per-class", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unlabelled", action="store_true",
                   help="nested date folders without classes: classes x train-per-class images, no val/")
    a = p.parse_args()
    if a.unlabelled:
        make_unlabelled_folder(a.root, a.classes, a.classes * a.train_per_class, a.size, a.seed)
        print(f"wrote {a.classes * a.train_per_class} unlabelled images under {a.root}")
    else:
        make_image_folder(a.root, a.classes, a.train_per_class, a.val_per_class, a.size, a.seed)
        print(f"wrote {a.root}/train and {a.root}/val")
