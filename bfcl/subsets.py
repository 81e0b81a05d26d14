"""Labelled subsets of train/: evaluating with few labels, as SimCLR, BYOL, SwAV and Barlow Twins
do with their ImageNet 1 % and 10 % lists, in every probe mode.

A subset is written as a list of image paths relative to train/, one a line ('class/file.jpg'),
in train/'s order; its SHA-256 tells whether two runs used the same labels. A list is read back
by bfcl.lists.read_list, train.py's reader too (one set of rules for both scripts); its lines
may also be bare file names as in SimCLR's published lists ('n01440764_10026.JPEG',
found in train/n01440764/): the class is the part before the first '_'.

Class-balanced subsets rank the images of each class by SHA-256(seed, relative path) and keep
the first ones. The draw depends only on the file names and the seed, never on any process's
random state, so every process, every mode, and the pretrained and random-init runs get the same
images; with one seed a smaller subset lies inside a larger one. A class with n images keeps:
    labels_per_class N:  min(N, n), all of its images when it has fewer than N;
    fraction F:          F x n rounded half up, at least 1 (no class loses all its labels), so
                         the total is within half an image per class of F x the train images.
Long-tailed subsets (imbalance R, alone or with labels_per_class N as the head's count) are
bfcl/longtail.py's: the same draw within each class, class sizes from the LDAM protocol.
"""

import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass

import torch

from bfcl.errors import ConfigError
from bfcl.images import DataError
from bfcl.lists import read_list
from bfcl.longtail import first_by_hash, longtail_subset
from bfcl.paths import printable

LIST_NAME = "train_list.txt"


@dataclass(frozen=True)
class LabelSubset:
    """The chosen train/ indices (ascending), the list file's bytes, and what results.json records."""

    indices: list[int]
    text: bytes
    record: dict

    def write(self, folder: str) -> str:
        """Write the list file into `folder`; returns its path."""
        path = os.path.join(folder, LIST_NAME)
        with open(path, "wb") as f:
            f.write(self.text)
        return path


def relative_paths(images, root: str) -> list[str]:
    """Each sample's path relative to `root` with '/' separators: the names a list file holds."""
    prefix = os.path.join(root, "")
    return [(p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root)).replace(os.sep, "/")
            for p in map(images.path, range(len(images)))]


def per_class_count(fraction: float, available: int) -> int:
    """Images a class of `available` keeps at `fraction`: rounded half up, at least 1."""
    return max(1, min(available, math.floor(fraction * available + 0.5)))


def random_subset(available: int, size: int, seed: int) -> list[int]:
    """Ascending indices of `size` of `available` samples from a seeded permutation (--max-train-samples:
    not class-balanced, kept as it was)."""
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:size].sort().values.tolist()


def balanced_subset(targets, paths: list[str], seed: int, labels_per_class: int | None = None,
                    fraction: float | None = None) -> list[int]:
    """Ascending indices of a class-balanced subset: in each class the images that rank first by
    SHA-256 of (seed, relative path), labels_per_class of them or `fraction` (per_class_count)."""
    if (labels_per_class is None) == (fraction is None):
        raise ValueError("pass exactly one of labels_per_class and fraction")
    members: dict[int, list[int]] = {}
    for i, label in enumerate(targets):
        members.setdefault(int(label), []).append(i)
    keep = []
    for indices in members.values():
        count = min(labels_per_class, len(indices)) if labels_per_class is not None \
            else per_class_count(fraction, len(indices))
        keep += first_by_hash(indices, paths, seed, count)
    return sorted(keep)


def read_train_list(list_path: str, paths: list[str], root: str) -> list[int]:
    """Ascending indices of the images a list file names (relative to `root` and inside it, read by
    bfcl.lists.read_list as train.py reads its list, or SimCLR's bare names); a line that names no
    image, or an image named twice, is a DataError naming the line."""
    where = {p: i for i, p in enumerate(paths)}
    by_name = None  # bare name -> indices, built only if a bare name is not under its prefix's class
    chosen: dict[int, int] = {}
    for number, name in read_list(list_path, root):
        index = where.get(name)
        if index is None and "/" not in name:
            index = where.get(f"{name.split('_')[0]}/{name}")
            if index is None:
                by_name = by_name or _bare_names(paths)
                found = by_name.get(name, [])
                index = found[0] if len(found) == 1 else None
        if index is None:
            raise DataError(f"--train-list {printable(list_path)} line {number}: {printable(name)} matches no image "
                            f"in {printable(root)}; list paths relative to train/ ('class/file.jpg') or SimCLR's "
                            "bare names")
        if index in chosen:
            raise DataError(f"--train-list {printable(list_path)} line {number}: {printable(name)} is already on "
                            f"line {chosen[index]}; list each image once")
        chosen[index] = number
    return sorted(chosen)


def _bare_names(paths: list[str]) -> dict[str, list[int]]:
    names: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        names.setdefault(p.rsplit("/", 1)[-1], []).append(i)
    return names


def label_subset(images, root: str, seed: int, labels_per_class: int | None = None, fraction: float | None = None,
                 train_list: str | None = None, imbalance: float | None = None) -> LabelSubset | None:
    """The subset of `images` (LabelledImages of `root`) that one of the three options picks, or
    None when none is given. record: how it was chosen, its size, per-class counts and the SHA-256
    of its list file. imbalance R: the long-tailed subset (bfcl/longtail.py), with labels_per_class
    as the head class's count if given; not with fraction or train_list (ConfigError); its record
    adds "imbalance" and "class_order" (class names, head first)."""
    if labels_per_class is None and fraction is None and train_list is None and imbalance is None:
        return None
    paths = relative_paths(images, root)
    order = None
    if imbalance is not None:
        if fraction is not None or train_list is not None:
            raise ConfigError(f"--imbalance takes the head class's count from the data or --labels-per-class, not "
                              f"from --{'label-fraction' if fraction is not None else 'train-list'}; drop one of them "
                              "(a --train-list written by an --imbalance run is already long-tailed)")
        indices, order, _ = longtail_subset(images.targets, paths, seed, imbalance, len(images.classes),
                                            labels_per_class)
        rule = f"--imbalance {imbalance:g}" + (f" --labels-per-class {labels_per_class}"
                                               if labels_per_class is not None else "")
    elif train_list is not None:
        indices, rule = read_train_list(train_list, paths, root), f"--train-list {train_list}"
    else:
        indices = balanced_subset(images.targets, paths, seed, labels_per_class, fraction)
        rule = f"--labels-per-class {labels_per_class}" if labels_per_class is not None \
            else f"--label-fraction {fraction:g}"
    text = "".join(paths[i] + "\n" for i in indices).encode("utf-8")
    counts = Counter(int(images.targets[i]) for i in indices)
    record = {"rule": rule, "seed": None if train_list is not None else seed, "size": len(indices),
              "available": len(images),
              "per_class": {c: counts.get(k, 0) for c, k in sorted(images.class_to_idx.items(), key=lambda x: x[1])},
              "sha256": hashlib.sha256(text).hexdigest(), "list": LIST_NAME}
    if order is not None:
        record.update(imbalance=imbalance, class_order=[images.classes[c] for c in order])
    return LabelSubset(indices, text, record)


def describe_subset(record: dict | None) -> str:
    """One line for the start-up summary: size, rule, seed, per-class range, list file and SHA-256."""
    if record is None:
        return "every train/ image"
    seed = "" if record["seed"] is None else f", seed {record['seed']}"
    counts = record["per_class"].values()
    return (f"{record['size']} of {record['available']} train images ({record['rule']}{seed}), {min(counts)} to "
            f"{max(counts)} a class; {record['list']} sha256 {record['sha256'][:16]}")
