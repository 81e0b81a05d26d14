"""Long-tailed data (docs/longtail.md): the long-tailed subsets of probe.py --imbalance, the
per-class and many / medium / few metrics every classifying probe mode reports, and Balanced
Softmax (--loss balanced-softmax).

Subsets. The CIFAR-10-LT / CIFAR-100-LT protocol of Cao et al. (LDAM, NeurIPS 2019): with C
classes and imbalance ratio R, the i-th class (i = 0 the head) keeps
    n_i = int(n_max * R ** (-i / (C - 1)))          (LDAM's get_img_num_per_cls), at least 1,
so CIFAR-10 (n_max 5,000) at R = 100 keeps 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50:
12,406 images. n_max is the smallest class's image count (5,000 in CIFAR-10; every class can then
give its n_i), or --labels-per-class N where that is smaller. Which class is the i-th is a
permutation of the class indices drawn from --subset-seed (torch.randperm on a generator seeded
with it); the images kept within a class are the first n_i by SHA-256(seed, relative path), the
draw of the balanced subsets (bfcl/subsets.py), so the same seed gives the same images in every
mode and process, and a class's images at R are a subset of its images at any smaller R.

Groups. The literature's split by training images per class, many (> 100), medium (20-100) and
few (< 20), leaves the few group empty on CIFAR-10-LT at R = 100 (its smallest class has 50).
The groups reported (`groups`) are therefore thirds by class size: the round(C/3) largest classes
are many, the round(C/3) smallest few, the rest medium (ties by class index); on CIFAR-10-LT
at R = 100: many 5000-1796, medium 1077-232, few 139-50 (3, 4 and 3 classes). The literature
split is reported beside it (`literature`), an empty group as null. A group's top-1 is the mean
of its classes' top-1 (per-class accuracy averaged, as the long-tail papers report it). With
fewer than 3 classes, or every class the same size, there are no groups (null).

Balanced Softmax (Ren et al., NeurIPS 2020): training minimises cross-entropy of
logits + log(prior), the prior being the training set's class frequencies; evaluation uses the
logits unchanged. It works with soft (Mixup / CutMix) targets and with --bf-head's [x ; BF(x)].
"""

import hashlib
import math
from collections import Counter

import torch

from bfcl.errors import ConfigError

LOSSES = ("ce", "balanced-softmax")
GROUP_RULE = ("thirds by class size: the round(C/3) largest classes are many, the round(C/3) smallest few, the "
              "rest medium (ties by class index)")
LITERATURE_RULE = "training images per class: many > 100, medium 20-100, few < 20 (an empty group is null)"


def longtail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Images of the i-th class, head first: int(n_max * imbalance ** (-i / (C - 1))), at least 1
    (LDAM's get_img_num_per_cls). One class keeps n_max."""
    if imbalance < 1:
        raise ConfigError(f"--imbalance {imbalance:g} must be at least 1 (the head class over the tail class); "
                          "pass e.g. 100 or 10")
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * imbalance ** (-i / (num_classes - 1)))) for i in range(num_classes)]


def class_order(num_classes: int, seed: int) -> list[int]:
    """Class indices from head to tail: a permutation drawn from the subset seed alone."""
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()


def first_by_hash(indices: list[int], paths: list[str], seed: int, count: int) -> list[int]:
    """The `count` of `indices` whose SHA-256 of (seed, relative path) is smallest: the balanced
    subsets' draw (bfcl.subsets.balanced_subset), shared here."""
    return sorted(indices, key=lambda i: hashlib.sha256(f"{seed}/{paths[i]}".encode()).digest())[:count]


def longtail_subset(targets, paths: list[str], seed: int, imbalance: float, num_classes: int,
                    n_max: int | None = None) -> tuple[list[int], list[int], dict[int, int]]:
    """(ascending indices, class order head first, {class: images kept}) of the long-tailed subset.
    n_max None: the smallest class's image count; a given n_max is capped by it. A class with no
    images keeps none (ConfigError: the protocol needs every class)."""
    members: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for i, label in enumerate(targets):
        members[int(label)].append(i)
    empty = [c for c, m in members.items() if not m]
    if empty:
        raise ConfigError(f"--imbalance needs images of every class; class index {empty[0]} has none in train/")
    smallest = min(len(m) for m in members.values())
    n_max = smallest if n_max is None else min(n_max, smallest)
    order = class_order(num_classes, seed)
    counts = dict(zip(order, longtail_counts(n_max, num_classes, imbalance)))
    keep = [i for c in order for i in first_by_hash(members[c], paths, seed, counts[c])]
    return sorted(keep), order, counts


# ---- metrics -------------------------------------------------------------------------------------

def rank_groups(train_counts: list[int]) -> dict[str, list[int]] | None:
    """{"many", "medium", "few": class indices} by the thirds rule (GROUP_RULE), or None with fewer
    than 3 classes or all of one size."""
    c = len(train_counts)
    if c < 3 or len(set(train_counts)) == 1:
        return None
    ranked = sorted(range(c), key=lambda k: (-train_counts[k], k))
    third = round(c / 3)
    return {"many": sorted(ranked[:third]), "medium": sorted(ranked[third:c - third]),
            "few": sorted(ranked[c - third:])}


def literature_groups(train_counts: list[int]) -> dict[str, list[int]]:
    """{"many": > 100, "medium": 20-100, "few": < 20 training images}: class indices, maybe empty."""
    return {"many": [k for k, n in enumerate(train_counts) if n > 100],
            "medium": [k for k, n in enumerate(train_counts) if 20 <= n <= 100],
            "few": [k for k, n in enumerate(train_counts) if n < 20]}


def per_class_top1(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[list, list[int]]:
    """(top-1 % of each class, val images of each class); None for a class with no val image."""
    hits = scores.argmax(dim=1) == labels
    totals = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels[hits], minlength=num_classes)
    return [100.0 * int(k) / int(n) if n else None for k, n in zip(correct, totals)], totals.tolist()


def _group(classes: list[int], top1: list, train_counts: list[int]) -> dict | None:
    scored = [top1[k] for k in classes if top1[k] is not None]
    if not classes:
        return None
    return {"classes": len(classes), "train": [min(train_counts[k] for k in classes),
                                               max(train_counts[k] for k in classes)],
            "top1": sum(scored) / len(scored) if scored else None}


def longtail_metrics(scores: torch.Tensor, labels: torch.Tensor, train_counts: list[int],
                     class_names: list[str]) -> dict:
    """results.json's "longtail" block of one evaluation: scores [M, C] and labels [M] on val,
    train_counts[k] the training images of class k. Per class: train and val images and top-1; the
    thirds groups (rank_groups) and the literature's split, each group's top-1 the mean of its classes'."""
    top1, val = per_class_top1(scores.float().cpu(), labels.cpu(), len(class_names))
    groups = rank_groups(train_counts)
    return {"per_class": {name: {"train": train_counts[k], "val": val[k], "top1": top1[k]}
                          for k, name in enumerate(class_names)},
            "group_rule": GROUP_RULE,
            "groups": None if groups is None else {g: _group(ks, top1, train_counts) for g, ks in groups.items()},
            "literature_rule": LITERATURE_RULE,
            "literature": {g: _group(ks, top1, train_counts) for g, ks in literature_groups(train_counts).items()}}


def class_counts(targets, num_classes: int) -> list[int]:
    """Training images of each class index."""
    counts = Counter(int(t) for t in targets)
    return [counts.get(k, 0) for k in range(num_classes)]


# ---- Balanced Softmax ----------------------------------------------------------------------------

def log_prior(train_counts: list[int]) -> torch.Tensor:
    """log of the training set's class frequencies [C]; ConfigError for a class with no training image
    (its log prior would be -inf)."""
    empty = [k for k, n in enumerate(train_counts) if n == 0]
    if empty:
        raise ConfigError(f"--loss balanced-softmax needs training images of every class; class index {empty[0]} "
                          "has none: use --loss ce, or a subset with every class")
    total = sum(train_counts)
    return torch.tensor([math.log(n / total) for n in train_counts], dtype=torch.float32)


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return loss


def training_logits(logits: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """The logits the training loss sees: logits + log(prior) under Balanced Softmax (prior: log_prior's
    tensor), the logits themselves under cross-entropy (prior None). Never used at evaluation."""
    return logits if prior is None else logits + prior.to(device=logits.device, dtype=logits.dtype)
