"""What the evaluations share: the backbone they evaluate and the labelled data they take, passes
over a data set split across processes so that each image is counted exactly once, and the table
of results.

Several processes split every pass into whole batches without padding (shard), so the features
equal a one-process run with the same per-process batch; gather_in_order puts the rows of every
process back in data-set order.
"""

import copy
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.table import Table
from torch.utils.data import DataLoader, Subset

from bfcl.errors import CheckpointError, ConfigError, DataError
from bfcl.folders import check_train_val
from bfcl.images import DEFAULT_MAX_PIXELS, LabelledImages, image_folder, read_image, scan_image_folder
from bfcl.knn import extract_features, topk_accuracy
from bfcl.longtail import class_counts, longtail_metrics
from bfcl.model import ARCHS, build_backbone, is_vit
from bfcl.pretrained import guess_architecture, head_name, load_backbone_state, probe_model
from bfcl.subsets import LabelSubset, label_subset, random_subset
from bfcl.views import eval_transform, probe_train_transform


@dataclass(frozen=True)
class Backbone:
    """What to build and load: the architecture, and the pretrained tensors (torchvision keys)."""

    arch: str
    stem: str
    patch_size: int
    state: dict
    info: dict

    def model(self, num_classes: int, bn_head: bool = False, image_size: int = 224, freeze: bool = True):
        return probe_model(self.arch, self.stem, self.state, num_classes, bn_head, image_size, self.patch_size, freeze)


def load_backbone(pretrained: str | None = None, arch: str | None = None, stem: str | None = None,
                  patch_size: int | None = None, image_size: int | None = None, seed: int = 0) -> Backbone:
    """The backbone to evaluate: `pretrained` is anything probe.py's --pretrained reads (a run
    folder, a checkpoint folder, backbone.safetensors, a MoCo v3 .pth.tar, a torchvision state
    dict); None or "random" is a random init seeded by `seed` (resnet50 unless `arch` says).
    Arguments given win over what the file records, which wins over what its tensor shapes say;
    Backbone.model then refuses a checkpoint that does not fit. CheckpointError if unreadable."""
    if pretrained is None or pretrained == "random":
        arch = arch or "resnet50"
        set_seed(seed)
        size = image_size or 224
        model = build_backbone(arch, stem or "imagenet", image_size=size, patch_size=patch_size or 16)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(head_name(model) + ".")}
        info = {"source": "random init", "image_size": size if is_vit(arch) else None}
        return Backbone(arch, stem or "imagenet", patch_size or 16, state, info)
    state, info = load_backbone_state(pretrained)
    guess = guess_architecture(state)
    arch = arch or info.get("arch") or guess["arch"]
    if arch is None:
        raise CheckpointError(f"cannot tell the arch of {pretrained}; pass --arch ({', '.join(ARCHS)})")
    if is_vit(arch) and guess.get("image_size"):  # the position embedding fixes the token grid
        info = {**info, "image_size": guess["image_size"]}
    stem = stem or info.get("stem") or guess.get("stem") or "imagenet"
    return Backbone(arch, stem, patch_size or info.get("patch_size") or guess.get("patch_size") or 16, state, info)


def default_image_size(backbone: Backbone, train_root: str, image_size: int | None = None,
                       max_image_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, str]:
    """(crop side, why): image_size (--image-size), else the pretraining's, else the data's
    (small stem), else 224."""
    if image_size:
        return image_size, "--image-size"
    if backbone.info.get("image_size"):
        return int(backbone.info["image_size"]), "recorded in the checkpoint" if not is_vit(backbone.arch) \
            else "the ViT's position embedding"
    if backbone.stem == "small":  # 32-96 px data; probing it at 224 would cost ~50x for nothing
        first = scan_image_folder(train_root).path(0)
        return min(read_image(first, max_image_pixels).size), "side of the first training image (small stem)"
    return 224, "ImageNet default"


@dataclass(frozen=True)
class ProbeData:
    """train/ (or its labelled subset) with the probe's augmentation and with the centre crop, val/
    with the centre crop; items are (image [3, S, S], label, failed_reads) with S = image_size."""

    train_aug: LabelledImages
    train: LabelledImages
    val: LabelledImages
    classes: list[str]
    image_size: int
    subset: LabelSubset | None = None  # the labelled subset of train/ in use, if any (bfcl/subsets.py)


def labelled_data(root: str, image_size: int | None = None, backbone: Backbone | None = None, *,
                  labels_per_class: int | None = None, label_fraction: float | None = None,
                  train_list: str | None = None, subset_seed: int = 0, max_train_samples: int = 0, seed: int = 0,
                  max_image_pixels: int = DEFAULT_MAX_PIXELS, imbalance: float | None = None) -> ProbeData:
    """The labelled ImageFolder `root` (train/<class>/ and val/<class>/, the same classes) as probes
    and fine-tuning take it. image_size None: default_image_size(backbone, ...) (224 without one).

    Few labels: labels_per_class N or label_fraction F train on a class-balanced subset of train/
    drawn from subset_seed alone, train_list on the images a file lists (bfcl/subsets.py);
    otherwise max_train_samples > 0 keeps a random subset of that size drawn from seed.
    Long tails: imbalance R keeps the CIFAR-LT protocol's long-tailed subset (bfcl/longtail.py),
    class order and images from subset_seed, alone or with labels_per_class as the head's count;
    val/ stays as it is (balanced)."""
    if imbalance is not None and max_train_samples:
        raise ConfigError("--imbalance draws its own subset; drop --max-train-samples (or use --labels-per-class N "
                          "to set the head class's count)")
    train_root, val_root = os.path.join(root, "train"), os.path.join(root, "val")
    classes = check_train_val(root)
    if image_size is None:
        image_size = default_image_size(backbone, train_root, None, max_image_pixels)[0] if backbone else 224
    train = image_folder(train_root, eval_transform(image_size), max_pixels=max_image_pixels)
    subset = label_subset(train, train_root, subset_seed, labels_per_class, label_fraction, train_list, imbalance)
    if subset is not None:
        train = train.subset(subset.indices)
    elif max_train_samples and max_train_samples < len(train):
        train = train.subset(random_subset(len(train), max_train_samples, seed))
    train_aug = copy.copy(train)  # shares the file list: ImageNet's is scanned once
    train_aug.transform = probe_train_transform(image_size)
    val = image_folder(val_root, eval_transform(image_size), max_pixels=max_image_pixels)
    return ProbeData(train_aug, train, val, classes, image_size, subset)


def shard(num_samples: int, batch: int, rank: int, world: int) -> list[int]:
    """This process's data-set indices: batches rank, rank + world, ... of the plain order, no padding.

    Each batch is the one a single process with the same batch size would see, so features match
    a one-process run exactly; the last batches may leave some processes with fewer samples.
    """
    return [i for start in range(rank * batch, num_samples, world * batch)
            for i in range(start, min(start + batch, num_samples))]


def gather_in_order(accelerator: Accelerator, indices: list[int], num_samples: int, *tensors) -> list[torch.Tensor]:
    """Rows [m_rank, ...] of every process, back in data-set order: [num_samples, ...] on the CPU.

    Processes hold different row counts, so rows are padded to the largest count, gathered, and
    the padding (index -1) dropped; the check below proves each sample came back exactly once.
    """
    device = accelerator.device
    index = accelerator.gather(accelerator.pad_across_processes(torch.tensor(indices, dtype=torch.long, device=device),
                                                                pad_index=-1))
    real = index >= 0
    order = index[real].argsort()
    assert torch.equal(index[real][order].cpu(), torch.arange(num_samples)), "a sample was lost or counted twice"
    return [accelerator.gather(accelerator.pad_across_processes(t.to(device)))[real][order].cpu() for t in tensors]


def sharded_loader(dataset, batch: int, accelerator: Accelerator, workers: int) -> tuple[list[int], DataLoader]:
    """This process's share of `dataset` (shard) in plain order, and a loader over it."""
    indices = shard(len(dataset), batch, accelerator.process_index, accelerator.num_processes)
    return indices, DataLoader(Subset(dataset, indices), batch_size=batch, num_workers=workers)


def summed(accelerator: Accelerator, count: int) -> int:
    """A host count summed over the processes."""
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum"))


def check_failed_reads(failed: int, total: int, max_bad_image_share: float) -> None:
    """The probe's side of the unreadable-image policy: replaced and counted; too many raise DataError."""
    if failed > max_bad_image_share * total:
        raise DataError(f"{failed} of {total} image reads failed, more than --max-bad-image-share "
                        f"{max_bad_image_share}; check the data folder")


def features(model, dataset, batch: int, accelerator: Accelerator, workers: int = 0,
             max_bad_image_share: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of `model` on the whole data set, split over the processes (`batch` images per
    process and step): ([M, C] fp32, [M] labels) on the CPU, in data-set order, on every process."""
    indices, loader = sharded_loader(dataset, batch, accelerator, workers)
    if indices:
        with accelerator.autocast():
            local, labels, failed = extract_features(model, loader, accelerator.device)
    else:  # more processes than batches
        local, labels, failed = torch.zeros(0, model.feature_dim), torch.zeros(0, dtype=torch.long), 0
    check_failed_reads(summed(accelerator, failed), len(dataset), max_bad_image_share)
    return gather_in_order(accelerator, indices, len(dataset), local, labels)


def evaluate(model, dataset, num_classes: int, batch: int, accelerator: Accelerator, workers: int = 0,
             max_bad_image_share: float = 0.01) -> dict:
    """Top-1/top-5 of a classifier on the whole val set, each image counted once."""
    return topk_accuracy(*class_scores(model, dataset, num_classes, batch, accelerator, workers, max_bad_image_share))


def longtail_of(scores: torch.Tensor, labels: torch.Tensor, data: ProbeData) -> dict:
    """results.json's "longtail" block (bfcl/longtail.py) of val scores, with data.train's class sizes."""
    return longtail_metrics(scores, labels, class_counts(data.train.targets, len(data.classes)), data.classes)


@torch.no_grad()
def class_scores(model, dataset, num_classes: int, batch: int, accelerator: Accelerator, workers: int = 0,
                 max_bad_image_share: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [M, K], labels [M]) of a classifier on the whole data set, in data-set order, on every process."""
    indices, loader = sharded_loader(dataset, batch, accelerator, workers)
    scores, labels = [torch.zeros(0, num_classes)], [torch.zeros(0, dtype=torch.long)]  # a process may get none
    failed = 0
    with accelerator.autocast():
        for images, targets, failed_reads in loader:
            scores.append(model(images.to(accelerator.device)).float().cpu())
            labels.append(targets)
            failed += int(failed_reads.sum())
    check_failed_reads(summed(accelerator, failed), len(dataset), max_bad_image_share)
    scores, labels = gather_in_order(accelerator, indices, len(dataset), torch.cat(scores), torch.cat(labels))
    return scores, labels


def groups_note(block: dict | None) -> str:
    """', many / medium / few top-1 a / b / c' of a "longtail" block with groups (bfcl/longtail.py), else ''."""
    groups = (block or {}).get("groups")
    if not groups:
        return ""
    values = [groups[g]["top1"] for g in ("many", "medium", "few")]
    return ", many / medium / few top-1 " + " / ".join("–" if v is None else f"{v:.1f}" for v in values)


def results_table(results: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("evaluation", "top-1 %", "top-5 %", "note"):
        table.add_column(column, justify="right" if "%" in column else "left")
    for name, r in results.get("knn", {}).items():
        if name.startswith("k") and isinstance(r, dict):
            table.add_row(f"kNN {name[1:]}-NN", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                          f"T {results['knn']['temperature']}{groups_note(r.get('longtail'))}")
    if "fast_linear" in results:
        r = results["fast_linear"]
        table.add_row("fast linear", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                      f"cached centre crops: NOT the protocol{groups_note(r.get('longtail'))}")
    for mode, unit in (("linear", "epoch"), ("finetune", "step")):
        for which in ("best", "last") if mode in results else ():
            r = results[mode][which]
            table.add_row(f"{mode}, {which} {unit}", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                          f"{'protocol, ' if mode == 'linear' else 'end to end, '}{unit} {r[unit]}"
                          + (groups_note(results[mode].get("longtail")) if which == "last" else ""))
    return table
