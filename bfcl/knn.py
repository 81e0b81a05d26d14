"""Weighted k-nearest-neighbour classification on frozen features (Wu et al., 2018).

Each of the k nearest bank features votes for its label with weight exp(cos / T); the
standard self-supervised monitor (k = 20 or 200, T = 0.07). KnnMonitor is train.py's online
version of it, on fixed subsets of labelled images.
"""

import copy
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from bfcl.errors import DataError, TrainingError
from bfcl.folders import check_image_folder, check_train_val
from bfcl.images import LabelledImages, image_folder
from bfcl.index import find_layout
from bfcl.views import eval_transform


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Backbone features of every (image, label, failed reads) batch: ([M, C] fp32 on CPU, [M]
    labels, the number of unreadable images that were replaced by readable ones)."""
    features, labels, failed = [], [], 0
    for images, targets, failed_reads in loader:
        features.append(backbone(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
        failed += int(failed_reads.sum())
    return torch.cat(features), torch.cat(labels), failed


@torch.no_grad()
def knn_scores(features, bank, bank_labels, num_classes: int, k: int = 200,
               temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [M, num_classes] for queries [M, C] against a bank [B, C] with labels [B].

    Features are L2-normalised here. Queries go in chunks to bound the [chunk, B] similarity.
    """
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, features.shape[0], chunk):
        q = F.normalize(features[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(q.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """{"top1": %, "top5": %} of scores [M, K] against labels [M]; k is capped at the class count.

    No number from nothing: NaN scores rank arbitrarily (a NaN head once scored "top-1 25.00"), and
    the mean over no samples is NaN, so both refuse (TrainingError, DataError) instead."""
    if scores.shape[0] == 0:
        raise DataError("no samples to evaluate: an accuracy over no images is undefined; add images to val/")
    bad = int((~torch.isfinite(scores)).any(dim=1).sum())
    if bad:
        raise TrainingError(f"{bad} of {scores.shape[0]} rows of class scores are not finite (NaN or inf): no "
                            "accuracy is reported; the backbone or head gives non-finite outputs (check the "
                            "checkpoint, or lower the lr)")
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def knn_source(data: str, train_list: str | None, knn_every: int, knn_data: str | None) -> tuple[str, str | None]:
    """Where train.py's online kNN monitor (--knn-every) takes labelled images from, and the
    start-up summary's line: 'knn-data' (knn_data's train/ bank, val/ queries), 'train+val' (an
    ImageFolder `data` with val/), 'val-halves' (DIR/val/<class>/ beside unlabelled images: two
    disjoint halves, bank and queries) or 'off'."""
    if not knn_every:
        return "off", None
    if knn_data:
        return "knn-data", f"{knn_data}/train as the bank, {knn_data}/val as queries"
    val = os.path.join(data, "val")
    if not os.path.isdir(val):
        return "off", f"off: --knn-every needs labelled images, in {val}/<class>/ or from --knn-data DIR"
    if find_layout(data, train_list)[0] == "imagefolder":
        return "train+val", "train/ as the bank, val/ as queries"
    return "val-halves", f"two halves of {val}, one the bank, one the queries"


def check_knn_source(source: str, data: str, knn_data: str | None) -> None:
    """DataError, before any work, where the labelled images knn_source named are not there: one
    line naming the folder and the way out."""
    try:
        if source == "knn-data":
            check_train_val(knn_data)
        elif source == "train+val":
            check_train_val(data)
        elif source == "val-halves":
            check_image_folder(os.path.join(data, "val"))
    except DataError as e:
        raise DataError({
            "knn-data": f"--knn-data {knn_data} is not an ImageFolder with train/ and val/ ({e})",
            "train+val": f"--knn-every needs the same class folders in train/ and val/ ({e}); or pass --knn-every 0",
            "val-halves": f"--knn-every takes labels from {data}/val/<class>/ ({e}); or pass --knn-every 0"
        }[source]) from None


def knn_monitor(source: str, data: str, knn_data: str | None, images: LabelledImages, image_size: int,
                samples: int, seed: int, workers: int, max_pixels: int) -> "KnnMonitor | None":
    """The monitor knn_source named (None for 'off'); `images` (the training images) are the bank
    of an ImageFolder `data`, so that train/ is not walked a second time."""
    if source == "off":
        return None
    read = lambda folder: image_folder(folder, max_pixels=max_pixels)  # noqa: E731
    if source == "knn-data":
        bank, queries = read(os.path.join(knn_data, "train")), read(os.path.join(knn_data, "val"))
    elif source == "train+val":
        bank, queries = images, read(os.path.join(data, "val"))
    else:
        bank, queries = read(os.path.join(data, "val")), None
    return KnnMonitor(bank, queries, image_size, samples, seed, workers)


class KnnMonitor:
    """kNN top-1 (k 200) of a backbone on fixed seeded subsets: `samples` bank images, `samples`
    query images. With queries=None both come from `bank`, as two disjoint halves of one seeded
    permutation (a labelled val/ beside unlabelled training images). A few seconds a pass at 32 px;
    used by train.py's --knn-every. Unreadable images are replaced as in training and counted in
    `failed_reads`."""

    def __init__(self, bank: LabelledImages, queries: LabelledImages | None, image_size: int, samples: int,
                 seed: int, workers: int):
        bank = copy.copy(bank)
        bank.transform = eval_transform(image_size)
        g = torch.Generator().manual_seed(seed)
        if queries is None:
            order = torch.randperm(len(bank), generator=g).tolist()
            half = len(order) // 2
            bank_part, query_part = Subset(bank, order[:half][:samples]), Subset(bank, order[half:][:samples])
        else:
            queries = copy.copy(queries)
            queries.transform = bank.transform
            pick = lambda ds: Subset(ds, torch.randperm(len(ds), generator=g)[:samples].tolist())  # noqa: E731
            bank_part, query_part = pick(bank), pick(queries)
        self.bank_loader = DataLoader(bank_part, batch_size=256, num_workers=workers)
        self.query_loader = DataLoader(query_part, batch_size=256, num_workers=workers)
        self.num_classes, self.failed_reads = len(bank.classes), 0

    def top1(self, backbone: torch.nn.Module, device) -> float:
        was_training = backbone.training
        backbone.eval()
        bank, bank_labels, failed_bank = extract_features(backbone, self.bank_loader, device)
        queries, labels, failed_queries = extract_features(backbone, self.query_loader, device)
        backbone.train(was_training)
        self.failed_reads += failed_bank + failed_queries
        return topk_accuracy(knn_scores(queries, bank, bank_labels, self.num_classes, k=200), labels)["top1"]
