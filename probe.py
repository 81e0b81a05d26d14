"""How good is a pretrained ResNet or ViT? MoCo v3's linear classification protocol, and faster checks.

    accelerate launch probe.py --pretrained runs/pretrain/backbone.safetensors --data DIR
    accelerate launch probe.py --pretrained checkpoint_0099.pth.tar --data DIR --mode knn
    accelerate launch probe.py --random-init -a resnet50 --data DIR --mode all   # the baseline to beat
    accelerate launch probe.py --pretrained runs/pretrain --data DIR --mode finetune -b 256
    torchrun --nproc_per_node 2 probe.py --pretrained ... --data DIR              # two CPU processes (gloo)

DIR holds train/<class>/<image> and val/<class>/<image> with the same class folders.
--pretrained takes a training checkpoint folder (checkpoints/step-*), a run folder or its
backbone.safetensors, an original MoCo v3 / BatchFormer .pth.tar, or a torchvision state dict
(.pth or .safetensors); nothing is unpickled beyond tensors, numbers and strings.

Modes (--mode):
  linear       the protocol (method.md §3, §5): frozen backbone in eval mode, linear head
               N(0, 0.01²) on the pooled feature (ResNet) or the cls token (ViT), SGD momentum
               0.9, no weight decay, lr 0.1 (ResNet) or 3 (ViT) x batch/256 on a per-epoch
               cosine, 90 epochs, batch 1024, RandomResizedCrop + flip; val Resize + CenterCrop.
               Reports top-1/top-5 of the best and of the last epoch, and asserts at the end that
               no backbone tensor (BN buffers included) moved.
  knn          weighted kNN (k 20 and 200, T 0.07) on L2-normalised centre-crop features,
               train features as the bank. Minutes instead of days.
  fast-linear  a linear head on cached centre-crop features, standardised with train
               statistics, no augmentation. A quick check on a CPU, NOT the protocol.
  quick        knn and fast-linear, sharing one feature pass (what bench/quality.py scores with).
  all          quick, then linear.
  finetune     end to end: the whole backbone and a new head train (method.md §6), with the
               torchvision reference recipe (ResNets) or DeiT's (ViTs), each field overridable
               by its flag; exact resume, SIGTERM checkpoint, OUTPUT/finetuned.safetensors.

Measured on 2 shared CPU cores, on `make smoke-test`'s data (4 classes, 384 / 128 images of
32 px) with a random-init resnet18/small, the baseline a pretrained backbone must beat:
kNN k200 top-1 21.1, fast-linear top-1 41.4 (chance 25), about 20 s per mode with start-up.

Several processes split every feature pass into whole batches without padding, so each image
is counted exactly once and the features equal a one-process run with the same per-process
batch (-b divided by the process count).

results.json in --output-dir (only the modes that ran appear under "results"):
  {"pretrained": PATH or "random-init", "source": layout read, "arch": "resnet50",
   "stem": "imagenet", "step": int or null, "image_size": 224, "num_classes": 1000,
   "train_samples": int, "val_samples": int, "processes": int, "config": {parsed options},
   "results": {
     "knn":         {"temperature": 0.07, "k20": {"top1": %, "top5": %}, "k200": {...}},
     "fast_linear": {"protocol": false, "epochs": 100, "top1": %, "top5": %},
     "linear":      {"protocol": true, "bn_head": false, "epochs": 90, "batch_size": 1024, "lr": 0.4,
                     "best": {"epoch": int, "top1": %, "top5": %, "loss": float, "lr": float},
                     "last": {same keys}, "history": [{same keys}, one per epoch]},
     "finetune":    {"recipe": {...}, "steps": int, "batch_size": int, "lr": float,
                     "best": {"step": int, "top1": %, "top5": %, "loss": float, ...}, "last": {...},
                     "history": [one per evaluation], "model": "OUTPUT/finetuned.safetensors"}}}
top-5 is capped at the class count (100 % with 5 classes or fewer). "best" is picked on the
val set, so it is optimistic; MoCo v3's main_lincls.py tracked it as best_acc1. Say which one
you report.
"""

import argparse
import copy
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset

from bfcl.batchformer import dropout_seed
from bfcl.checkpoint import (CheckpointError, load_model_state, load_optimizer_state, optimizer_state_tensors,
                             resume_checkpoint, save_checkpoint, save_file_atomic)
from bfcl.cli import (EXIT_PREEMPTED, HelpFormatter, StopSignal, check_output_dir, check_ranges, code_version, fail,
                      format_summary)
from bfcl.finetune import (FinetuneRecipe, MixupCutmix, add_drop_path, lr_at, recipe_for,
                           soft_target_cross_entropy, train_transform)
from bfcl.finetune import param_groups as finetune_param_groups
from bfcl.loop import Window, batches
from bfcl.progress import ProgressLog
from bfcl.runlock import RunLockError, take_lock
from bfcl.images import (DEFAULT_MAX_PIXELS, DataError, LabelledImages, check_train_val, image_folder, read_image,
                         scan_image_folder)
from bfcl.views import IMAGENET_MEAN, IMAGENET_STD, SeededImages, eval_transform, probe_train_transform
from bfcl.knn import extract_features, knn_scores, topk_accuracy
from bfcl.model import ARCHS, STEMS, build_backbone, is_vit
from bfcl.pretrained import (assert_backbone_unchanged, backbone_tensors, describe, guess_architecture, head_name,
                             linear_head, load_backbone_state, probe_model, set_head)
from bfcl.schedules import learning_rate

MODES = ("linear", "knn", "fast-linear", "quick", "all", "finetune")
FAST_LINEAR_BATCH, FAST_LINEAR_LR = 256, 0.1
LINEAR_LR = {"resnet": 0.1, "vit": 3.0}  # base lr of the linear protocol: MoCo v3's main_lincls.py commands

INF = None
FLAG_RANGES = {  # (low, high, low inclusive, high inclusive), checked before any work
    "image_size": (8, 4096, True, True), "patch_size": (1, 4096, True, True), "max_train_samples": (0, INF, True, True),
    "workers": (0, 256, True, True), "batch_size": (1, INF, True, True), "lr": (0, INF, False, True),
    "epochs": (0, INF, False, True), "knn_k": (1, INF, True, True), "knn_t": (0, INF, False, True),
    "fast_epochs": (1, INF, True, True), "seed": (0, 2**31 - 1, True, True), "max_image_pixels": (1, INF, True, True),
    "max_bad_image_share": (0, 1, True, True), "wd": (0, INF, True, True), "warmup_epochs": (0, INF, True, True),
    "min_lr": (0, INF, True, True), "label_smoothing": (0, 1, True, False), "mixup": (0, INF, True, True),
    "cutmix": (0, INF, True, True), "reprob": (0, 1, True, True), "drop_path": (0, 1, True, False),
    "layer_decay": (0, 1, False, True), "save_every": (1, INF, True, True), "keep": (0, INF, True, True),
    "log_every": (1, INF, True, True), "max_steps": (0, INF, True, True), "eval_every": (0, INF, True, True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    a = p.add_argument_group("what to evaluate")
    w = a.add_mutually_exclusive_group(required=True)
    w.add_argument("--pretrained",
                   help="checkpoint folder, backbone.safetensors, MoCo v3 .pth.tar, or torchvision state dict")
    w.add_argument("--random-init", action="store_true",
                   help="a randomly initialised backbone: the baseline every result must beat")
    a.add_argument("-a", "--arch", choices=ARCHS, default=None,
                   help="backbone; default: what the checkpoint records, else read off its tensor shapes (resnet50 for "
                        "--random-init)")
    a.add_argument("--stem", choices=STEMS, default=None,
                   help="ResNets: 'small' (3x3 conv, no max-pool) for 32-96 px images; default: as --arch")
    a.add_argument("--patch-size", type=int, default=None,
                   help="ViTs: patch side; default: what the checkpoint records or its tensors say (16 for "
                        "--random-init)")
    a.add_argument("--mode", choices=MODES, default="linear",
                   help="linear is the protocol; knn and fast-linear are quick checks")
    a = p.add_argument_group("data")
    a.add_argument("--data", required=True,
                   help="folder with train/ and val/, one subfolder per class, the same classes in both")
    a.add_argument("--image-size", type=int, default=None,
                   help="crop side; default: the pretraining size if recorded (a ViT's is fixed by its position "
                        "embedding), else the data's image side with the small stem, else 224 (val: Resize 256 + "
                        "CenterCrop 224, no resize below 96 px)")
    a.add_argument("--max-train-samples", type=int, default=0,
                   help="use a seeded random subset of train/ this large (0: all)")
    a.add_argument("--workers", type=int, default=8, help="data-loading processes per process")
    a.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels are treated as unreadable (decompression-bomb guard)")
    a.add_argument("--max-bad-image-share", type=float, default=0.01,
                   help="stop if more than this share of image reads fail (each is replaced by the next readable "
                        "image)")
    a = p.add_argument_group("linear protocol and fine-tuning")
    a.add_argument("-b", "--batch-size", type=int, default=1024,
                   help="GLOBAL batch over all processes (also the feature-pass batch)")
    a.add_argument("--lr", type=float, default=None,
                   help="base lr. linear: the lr used is lr x batch-size / 256 (default: 0.1 ResNets, 3 ViTs, as "
                        "MoCo v3); finetune: the recipe's (default 0.1 x batch/256 ResNets, 5e-4 x batch/512 ViTs)")
    a.add_argument("--epochs", type=float, default=None,
                   help="epochs of the cosine schedule (default: 90 linear; finetune: the recipe's, 90 ResNets, "
                        "150 ViTs)")
    a.add_argument("--bn-head", action="store_true",
                   help="parameter-free BatchNorm before the linear head (MoCo v3 authors: makes the lr less "
                        "sensitive)")
    a = p.add_argument_group("fine-tuning (--mode finetune; each flag overrides the recipe, see bfcl/finetune.py)")
    a.add_argument("--wd", type=float, default=None, help="weight decay (1e-4 ResNets, 0.05 ViTs)")
    a.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up from 0 (5)")
    a.add_argument("--min-lr", type=float, default=None, help="where the cosine ends, not scaled (0 / 1e-5)")
    a.add_argument("--label-smoothing", type=float, default=None, help="(0.1)")
    a.add_argument("--mixup", type=float, default=None, help="Mixup alpha, 0 off (0 ResNets, 0.8 ViTs)")
    a.add_argument("--cutmix", type=float, default=None, help="CutMix alpha, 0 off (0 / 1.0)")
    a.add_argument("--randaugment", action=argparse.BooleanOptionalAction, default=None,
                   help="RandAugment, 2 ops at magnitude 9 (off / on)")
    a.add_argument("--reprob", type=float, default=None, help="random erasing probability (0 / 0.25)")
    a.add_argument("--drop-path", type=float, default=None, help="ViTs: stochastic depth of the last block (0.1)")
    a.add_argument("--layer-decay", type=float, default=None,
                   help="ViTs: layer-wise lr decay (off, as DeiT and MoCo v3; MAE uses 0.65-0.75)")
    a.add_argument("--resume", default="auto",
                   help="'auto': newest valid checkpoint in --output-dir, if any; 'none'; or a checkpoint directory")
    a.add_argument("--force-resume", action="store_true", help="resume although settings that matter changed")
    a.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at each epoch end)")
    a.add_argument("--keep", type=int, default=2, help="checkpoints kept (0: all)")
    a.add_argument("--log-every", type=int, default=10, help="log and check for stop signals every N steps")
    a.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many steps in total (0: all epochs); the schedule still spans --epochs")
    a.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate on val/ every N steps (0: at epoch ends and at the end only)")
    a.add_argument("--eval-epoch-ends", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate at every epoch end (--no-eval-epoch-ends: at the end and --eval-every only, "
                        "for runs on a wall-clock budget)")
    a = p.add_argument_group("quick checks")
    a.add_argument("--knn-k", type=int, nargs="+", default=[20, 200], help="neighbour counts")
    a.add_argument("--knn-t", type=float, default=0.07, help="temperature of the exp(cos / T) vote weights")
    a.add_argument("--fast-epochs", type=int, default=100,
                   help=f"epochs of fast-linear (batch {FAST_LINEAR_BATCH}, lr {FAST_LINEAR_LR}, cosine)")
    a.add_argument("--save-features", action="store_true",
                   help="write the centre-crop features to --output-dir/features.safetensors")
    a = p.add_argument_group("run")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--output-dir", default="runs/probe", help="results.json (and features.safetensors) go here")
    a.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="overrides accelerate launch's setting (default: theirs; the way to set it under torchrun)")
    return p.parse_args(argv)


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


def backbone_source(args) -> Backbone:
    """Flags win over what the file records, which wins over what its tensor shapes say;
    probe_model then refuses a checkpoint that does not fit."""
    if args.random_init:
        arch = args.arch or "resnet50"
        set_seed(args.seed)
        size = args.image_size or 224
        model = build_backbone(arch, args.stem or "imagenet", image_size=size, patch_size=args.patch_size or 16)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(head_name(model) + ".")}
        info = {"source": "random init", "image_size": size if is_vit(arch) else None}
        return Backbone(arch, args.stem or "imagenet", args.patch_size or 16, state, info)
    state, info = load_backbone_state(args.pretrained)
    guess = guess_architecture(state)
    arch = args.arch or info.get("arch") or guess["arch"]
    if arch is None:
        fail(f"cannot tell the arch of {args.pretrained}; pass --arch ({', '.join(ARCHS)})")
    if is_vit(arch) and guess.get("image_size"):  # the position embedding fixes the token grid
        info = {**info, "image_size": guess["image_size"]}
    stem = args.stem or info.get("stem") or guess.get("stem") or "imagenet"
    return Backbone(arch, stem, args.patch_size or info.get("patch_size") or guess.get("patch_size") or 16, state, info)


def default_image_size(args, backbone: Backbone, train_root: str) -> tuple[int, str]:
    """(crop side, why): --image-size, else the pretraining's, else the data's (small stem), else 224."""
    if args.image_size:
        return args.image_size, "--image-size"
    if backbone.info.get("image_size"):
        return int(backbone.info["image_size"]), "recorded in the checkpoint" if not is_vit(backbone.arch) \
            else "the ViT's position embedding"
    if backbone.stem == "small":  # 32-96 px data; probing it at 224 would cost ~50x for nothing
        first = scan_image_folder(train_root).samples[0][0]
        return min(read_image(first, args.max_image_pixels).size), "side of the first training image (small stem)"
    return 224, "ImageNet default"


@dataclass(frozen=True)
class ProbeData:
    """train/ with the probe's augmentation and with the centre crop, val/ with the centre crop."""

    train_aug: LabelledImages
    train: LabelledImages
    val: LabelledImages
    classes: list[str]


def datasets(args, image_size: int) -> ProbeData:
    train_root, val_root = os.path.join(args.data, "train"), os.path.join(args.data, "val")
    train_classes = check_train_val(args.data)
    train = image_folder(train_root, eval_transform(image_size), max_pixels=args.max_image_pixels)
    if args.max_train_samples and args.max_train_samples < len(train):
        g = torch.Generator().manual_seed(args.seed)
        keep = torch.randperm(len(train), generator=g)[:args.max_train_samples].sort().values.tolist()
        train.samples = [train.samples[i] for i in keep]
        train.targets = [label for _, label in train.samples]
    train_aug = copy.copy(train)  # shares the file list: ImageNet's is scanned once
    train_aug.transform = probe_train_transform(image_size)
    val = image_folder(val_root, eval_transform(image_size), max_pixels=args.max_image_pixels)
    return ProbeData(train_aug, train, val, train_classes)


def shard(num_samples: int, batch: int, rank: int, world: int) -> list[int]:
    """This process's dataset indices: batches rank, rank + world, ... of the plain order, no padding.

    Each batch is the one a single process with the same batch size would see, so features match
    a one-process run exactly; the last batches may leave some processes with fewer samples.
    """
    return [i for start in range(rank * batch, num_samples, world * batch)
            for i in range(start, min(start + batch, num_samples))]


def gather_in_order(accelerator, indices: list[int], num_samples: int, *tensors) -> list[torch.Tensor]:
    """Rows [m_rank, ...] of every process, back in dataset order: [num_samples, ...] on the CPU.

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


def sharded_loader(dataset, batch: int, args, accelerator) -> tuple[list[int], DataLoader]:
    """This process's share of `dataset` (shard) in plain order, and a loader over it."""
    indices = shard(len(dataset), batch, accelerator.process_index, accelerator.num_processes)
    return indices, DataLoader(Subset(dataset, indices), batch_size=batch, num_workers=args.workers)


def summed(accelerator, count: int) -> int:
    """A host count summed over the processes."""
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum"))


def check_failed_reads(failed: int, total: int, args) -> None:
    """The probe's side of the unreadable-image policy: replaced and counted; too many stop."""
    if failed > args.max_bad_image_share * total:
        fail(f"{failed} of {total} image reads failed, more than --max-bad-image-share {args.max_bad_image_share}; "
             "check the data folder")


def features(model, dataset, batch: int, args, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of the whole dataset, split over the processes: ([M, C] fp32, [M] labels)."""
    indices, loader = sharded_loader(dataset, batch, args, accelerator)
    if indices:
        with accelerator.autocast():
            local, labels, failed = extract_features(model, loader, accelerator.device)
    else:  # more processes than batches
        local, labels, failed = torch.zeros(0, model.feature_dim), torch.zeros(0, dtype=torch.long), 0
    check_failed_reads(summed(accelerator, failed), len(dataset), args)
    return gather_in_order(accelerator, indices, len(dataset), local, labels)


def knn_eval(bank, bank_labels, queries, labels, num_classes: int, ks, temperature: float) -> dict:
    """Weighted kNN top-1/top-5 of queries [M, C] against the train bank [N, C], for each k."""
    results = {"temperature": temperature}
    for k in ks:
        scores = knn_scores(queries, bank, bank_labels, num_classes, k=k, temperature=temperature)
        results[f"k{k}"] = topk_accuracy(scores, labels)
    return results


def fast_linear(train_x, train_y, val_x, val_y, num_classes: int, epochs: int, seed: int) -> dict:
    """A linear head on fixed features [N, C] -> top-1/top-5 on [M, C]. Not the protocol: no augmentation.

    Features are standardised with train statistics, as --bn-head does, so that one lr fits every
    backbone. The variance floor (1 % of the mean variance) keeps near-constant dimensions, common
    in random or collapsed backbones, from being blown up into noise on small sets.
    N(0, 0.01²) init, SGD momentum 0.9, no weight decay, per-epoch cosine.
    """
    mean, var = train_x.mean(0), train_x.var(0)
    std = (var + 0.01 * var.mean()).sqrt()
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    head = linear_head(train_x.shape[1], num_classes).to(train_x.device)
    optimizer = torch.optim.SGD(head.parameters(), lr=FAST_LINEAR_LR, momentum=0.9, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        optimizer.param_groups[0]["lr"] = learning_rate(epoch, epochs, 0, FAST_LINEAR_LR)
        for batch in torch.randperm(len(train_x), generator=g).to(train_x.device).split(FAST_LINEAR_BATCH):
            loss = F.cross_entropy(head(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return {"protocol": False, "epochs": epochs, **topk_accuracy(head(val_x), val_y)}


@torch.no_grad()
def evaluate(model, dataset, num_classes: int, batch: int, args, accelerator) -> dict:
    """Top-1/top-5 of a classifier on the whole val set, each image counted once."""
    indices, loader = sharded_loader(dataset, batch, args, accelerator)
    scores, labels = [torch.zeros(0, num_classes)], [torch.zeros(0, dtype=torch.long)]  # a process may get none
    failed = 0
    with accelerator.autocast():
        for images, targets, failed_reads in loader:
            scores.append(model(images.to(accelerator.device)).float().cpu())
            labels.append(targets)
            failed += int(failed_reads.sum())
    check_failed_reads(summed(accelerator, failed), len(dataset), args)
    scores, labels = gather_in_order(accelerator, indices, len(dataset), torch.cat(scores), torch.cat(labels))
    return topk_accuracy(scores, labels)


def linear_epochs(args) -> int:
    """--epochs for the linear protocol: 90 by default, and a whole number."""
    if args.epochs is None:
        return 90
    if not float(args.epochs).is_integer():
        fail(f"--epochs {args.epochs:g}: the linear protocol runs whole epochs; pass an integer")
    return int(args.epochs)


def linear_probe(args, backbone: Backbone, data: ProbeData, image_size: int, peak_lr: float, accelerator) -> dict:
    """The linear classification protocol of MoCo v3 (method.md §3); returns best/last/history."""
    world, device = accelerator.num_processes, accelerator.device
    local_batch = args.batch_size // world
    set_seed(args.seed)  # the same head on every process
    model = backbone.model(len(data.classes), args.bn_head, image_size)
    reference = backbone_tensors(model)
    head = getattr(model, head_name(model))
    optimizer = torch.optim.SGD(head.parameters(), lr=peak_lr, momentum=0.9, weight_decay=0.0)
    train_loader = DataLoader(data.train_aug, batch_size=local_batch, shuffle=True, num_workers=args.workers,
                              pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    ddp_model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    history, failed = [], 0
    epochs = linear_epochs(args)
    for epoch in range(epochs):
        lr = learning_rate(epoch, epochs, 0, peak_lr)  # per epoch, no warmup
        optimizer.param_groups[0]["lr"] = lr
        ddp_model.eval()  # the backbone's BN statistics must never move ...
        head.train()      # ... only the head (and --bn-head's statistics) learns
        loss_sum, steps = torch.zeros((), device=device), 0
        for images, labels, failed_reads in train_loader:
            loss = F.cross_entropy(ddp_model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            loss_sum += loss.detach().float()
            failed += int(failed_reads.sum())
            steps += 1
        check_failed_reads(summed(accelerator, failed), (epoch + 1) * len(data.train_aug), args)
        model.eval()
        # Evaluate the plain module: DDP syncs buffers on forward, and processes may hold
        # different numbers of val batches.
        top = evaluate(model, data.val, len(data.classes), local_batch, args, accelerator)
        loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(steps, 1)
        history.append({"epoch": epoch + 1, "lr": lr, "loss": loss, **top})
        accelerator.print(f"linear epoch {epoch + 1}/{epochs} | lr {lr:.4g} | loss {loss:.4f} | "
                          f"top1 {top['top1']:.2f} | top5 {top['top5']:.2f}")
    assert_backbone_unchanged(model, reference)
    best = max(history, key=lambda h: h["top1"])
    return {"protocol": True, "bn_head": args.bn_head, "epochs": epochs, "batch_size": args.batch_size,
            "lr": peak_lr, "best": best, "last": history[-1], "history": history}


# Options that may change when a fine-tuning run resumes; any other difference is refused.
FINETUNE_RESUMABLE = {"workers", "output_dir", "resume", "force_resume", "log_every", "save_every", "keep", "max_steps",
                      "eval_every", "eval_epoch_ends", "max_bad_image_share", "max_image_pixels", "knn_k", "knn_t",
                      "fast_epochs", "save_features"}
RECIPE_FLAGS = {"epochs": "epochs", "lr": "base_lr", "wd": "weight_decay", "warmup_epochs": "warmup_epochs",
                "min_lr": "min_lr", "label_smoothing": "label_smoothing", "mixup": "mixup", "cutmix": "cutmix",
                "randaugment": "randaugment", "reprob": "random_erasing", "drop_path": "drop_path",
                "layer_decay": "layer_decay"}


def finetune_recipe(args, backbone: Backbone) -> FinetuneRecipe:
    """The backbone family's recipe (bfcl/finetune.py) with every flag given applied."""
    recipe = recipe_for("vit" if is_vit(backbone.arch) else "resnet")
    given = {field: getattr(args, flag) for flag, field in RECIPE_FLAGS.items() if getattr(args, flag) is not None}
    if not is_vit(backbone.arch) and given.get("layer_decay") is not None:
        fail("--layer-decay applies to ViTs only; drop it for a ResNet")
    recipe = dataclasses.replace(recipe, **given)
    if recipe.warmup_epochs >= recipe.epochs:
        fail(f"--warmup-epochs {recipe.warmup_epochs:g} must be shorter than --epochs {recipe.epochs:g} "
             f"({recipe.name} recipe); pass both")
    return recipe


def finetune_model(backbone: Backbone, recipe: FinetuneRecipe, num_classes: int, image_size: int, world: int,
                   device) -> torch.nn.Module:
    """The whole classifier, every tensor trainable: MoCo v3 fine-tunes its ViTs through DeiT, where
    the patch projection and position embedding train too. Drop path on ViT blocks; BatchNorm
    trains (SyncBatchNorm on several GPUs)."""
    model = backbone.model(num_classes, image_size=image_size, freeze=False)
    model.requires_grad_(True)
    if is_vit(backbone.arch):
        add_drop_path(model, recipe.drop_path)
    elif world > 1 and device.type == "cuda":  # gloo (CPU) rejects SyncBatchNorm
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def finetune(args, backbone: Backbone, data: ProbeData, image_size: int, recipe: FinetuneRecipe, accelerator):
    """End-to-end fine-tuning (method.md §6) with exact resume; returns the results, or
    EXIT_PREEMPTED after a checkpoint when a stop signal came.

    Per step: lr (warm-up, cosine to min_lr) -> Mixup/CutMix -> forward -> soft-target loss ->
    backward -> optimizer step; at sync points: log, evaluate, checkpoint, stop."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    family = "vit" if is_vit(backbone.arch) else "resnet"
    set_seed(args.seed)  # the same head on every process
    model = finetune_model(backbone, recipe, len(data.classes), image_size, world, device)
    groups, param_names = finetune_param_groups(model, family, recipe.weight_decay, recipe.layer_decay)
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=recipe.momentum) if recipe.optimizer == "sgd" \
        else torch.optim.AdamW(groups, lr=0.0)
    train_set = SeededImages(copy.copy(data.train))  # fine-tuning's own augmentation, seeded per sample
    train_set.images.transform = train_transform(recipe, image_size, IMAGENET_MEAN, IMAGENET_STD)
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        fail(f"{len(train_set)} training images do not fill one global batch of {args.batch_size}; lower -b")
    total_steps = max(1, round(steps_per_epoch * recipe.epochs))
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    warmup_steps = round(steps_per_epoch * recipe.warmup_epochs)
    peak_lr, min_lr = recipe.scaled_lr(args.batch_size), recipe.min_lr  # DeiT scales the peak, not the floor

    config = {**vars(args), "recipe": dataclasses.asdict(recipe), "image_size": image_size}
    try:
        path, resumed = resume_checkpoint(args.output_dir, args.resume, config, FINETUNE_RESUMABLE,
                                          args.force_resume, total_steps)
        if resumed is not None:
            load_model_state(model, resumed["model"], path)
            load_optimizer_state(optimizer, param_names, resumed["optimizer"])
    except CheckpointError as e:
        fail(str(e))
    start = resumed["meta"]["step"] if resumed else 0
    history = resumed["meta"].get("history", []) if resumed else []
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None and accelerator.scaler is not None and resumed["meta"].get("scaler"):
        accelerator.scaler.load_state_dict(resumed["meta"]["scaler"])  # fp16: the loss scale goes on
    mix = MixupCutmix(len(data.classes), recipe.mixup, recipe.cutmix, recipe.mix_switch_prob)
    accelerator.print(format_summary({
        "recipe": recipe.name, "source": recipe.source, "optimizer": recipe.optimizer, "lr (scaled)": peak_lr,
        "min lr (scaled)": min_lr, "weight decay": recipe.weight_decay, "epochs": recipe.epochs,
        "steps": f"{total_steps} ({steps_per_epoch} per epoch, {warmup_steps} warm-up)",
        "augmentation": f"mixup {recipe.mixup}, cutmix {recipe.cutmix}, randaugment {recipe.randaugment}, "
                        f"erasing {recipe.random_erasing}, smoothing {recipe.label_smoothing}",
        "drop path / layer decay": f"{recipe.drop_path if family == 'vit' else '-'} / {recipe.layer_decay}",
        "resumed from": f"{path} (step {start})" if resumed else "scratch"}))

    log = ProgressLog(os.path.join(args.output_dir, "metrics.jsonl"), last_step, start) \
        if accelerator.is_main_process else None
    stop, window, bad = StopSignal(), Window(device), 0
    steps = batches(train_set, args.batch_size, rank, world, args.seed, start, last_step, args.workers,
                    pin_memory=device.type == "cuda")
    for step, (images, labels, failed) in steps:
        window.data_arrived()
        lr = lr_at(step, total_steps, warmup_steps, peak_lr, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        torch.manual_seed(dropout_seed(args.seed, step, rank))  # Mixup/CutMix and drop path
        images, targets = mix(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        loss = soft_target_cross_entropy(ddp_model(images).float(), targets, recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        window.add(loss, failed, stop.requested)

        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0
        evaluate_now = (end_of_epoch and args.eval_epoch_ends) or done == last_step or \
            (args.eval_every and done % args.eval_every == 0)
        save_now = done % args.save_every == 0 or end_of_epoch or done == last_step
        if done % args.log_every and not (evaluate_now or save_now):
            continue
        sums = window.read(lambda t: accelerator.reduce(t, reduction="sum"), world)
        bad += sums["bad"]
        if sums["nonfinite"]:
            fail(f"non-finite loss by step {done} (lr {lr:.4g}); the last good checkpoint is kept in "
                 f"{args.output_dir}; lower --lr")
        check_failed_reads(bad, done * args.batch_size, args)
        record = {"epoch": round(done / steps_per_epoch, 3), "loss": sums["loss"],
                  "lr": lr, "img_per_s": round(sums["steps"] * args.batch_size / sums["elapsed"], 1)}
        if evaluate_now:
            model.eval()
            record.update(evaluate(model, data.val, len(data.classes), args.batch_size // world, args, accelerator))
            model.train()
            history.append({"step": done, **record})
        if log is not None:
            log.log(done, record)
        if save_now or sums["stop"]:
            save_finetune(args, accelerator, model, optimizer, param_names, done, config, history)
        if sums["stop"]:
            if log is not None:
                log.print(f"stopped by a signal at step {done}; checkpoint written; run the same command to resume")
                log.close()
            return EXIT_PREEMPTED
    if log is not None:
        log.close()
    final = max(start, last_step)
    if not history or history[-1]["step"] != final:  # resumed from a checkpoint saved between evaluations
        model.eval()
        history.append({"step": final, **evaluate(model, data.val, len(data.classes), args.batch_size // world, args,
                                                  accelerator)})
    path = os.path.join(args.output_dir, "finetuned.safetensors")
    if accelerator.is_main_process:  # the fine-tuned classifier, torchvision keys, head included
        save_file_atomic(model.state_dict(), path, classifier_metadata(backbone, image_size, len(data.classes), final))
    accelerator.wait_for_everyone()
    best = max(history, key=lambda h: h["top1"])
    return {"recipe": dataclasses.asdict(recipe), "steps": final, "batch_size": args.batch_size, "lr": peak_lr,
            "best": best, "last": history[-1], "history": history, "model": path}


def classifier_metadata(backbone: Backbone, image_size: int, num_classes: int, step: int) -> dict:
    metadata = {"format": "bfcl-classifier-1", "arch": backbone.arch, "image_size": str(image_size),
                "num_classes": str(num_classes), "step": str(step)}
    metadata.update({"patch_size": str(backbone.patch_size)} if is_vit(backbone.arch) else {"stem": backbone.stem})
    return metadata


def save_finetune(args, accelerator, model, optimizer, param_names, step: int, config: dict, history: list) -> None:
    """A fine-tuning checkpoint (bfcl/checkpoint.py): model, optimizer, config and the evaluations
    so far. The main process writes; the others wait."""
    if accelerator.is_main_process:
        meta = {"version": code_version(), "config": config, "history": history,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": "derived from (seed, step, process index): nothing to restore"}
        save_checkpoint(args.output_dir, step, model.state_dict(), optimizer_state_tensors(optimizer.optimizer,
                        param_names), meta, args.keep)
    accelerator.wait_for_everyone()


def quick_checks(args, modes, backbone: Backbone, data: ProbeData, image_size: int, accelerator) -> dict:
    """kNN and/or fast-linear on one centre-crop feature pass over train/ and val/."""
    model = backbone.model(len(data.classes), image_size=image_size)
    set_head(model, torch.nn.Identity())  # features, not class scores
    model.to(accelerator.device).eval()
    local_batch = args.batch_size // accelerator.num_processes
    train_x, train_y = features(model, data.train, local_batch, args, accelerator)
    val_x, val_y = features(model, data.val, local_batch, args, accelerator)
    results = {}
    if accelerator.is_main_process:  # every process holds all features; one computes on them
        on_device = [t.to(accelerator.device) for t in (train_x, train_y, val_x, val_y)]
        if "knn" in modes:
            results["knn"] = knn_eval(*on_device, len(data.classes), args.knn_k, args.knn_t)
        if "fast-linear" in modes:
            results["fast_linear"] = fast_linear(*on_device, len(data.classes), args.fast_epochs, args.seed)
        if args.save_features:
            save_file({"train_features": train_x, "train_labels": train_y, "val_features": val_x, "val_labels": val_y},
                      os.path.join(args.output_dir, "features.safetensors"),
                      {"arch": backbone.arch, "stem": backbone.stem})
    return results


def results_table(results: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("evaluation", "top-1 %", "top-5 %", "note"):
        table.add_column(column, justify="right" if "%" in column else "left")
    for name, r in results.get("knn", {}).items():
        if name.startswith("k") and isinstance(r, dict):
            table.add_row(f"kNN {name[1:]}-NN", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                          f"T {results['knn']['temperature']}")
    if "fast_linear" in results:
        r = results["fast_linear"]
        table.add_row("fast linear", f"{r['top1']:.2f}", f"{r['top5']:.2f}", "cached centre crops: NOT the protocol")
    for mode, unit in (("linear", "epoch"), ("finetune", "step")):
        for which in ("best", "last") if mode in results else ():
            r = results[mode][which]
            table.add_row(f"{mode}, {which} {unit}", f"{r['top1']:.2f}", f"{r['top5']:.2f}",
                          f"{'protocol, ' if mode == 'linear' else 'end to end, '}{unit} {r[unit]}")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    check_ranges(args, FLAG_RANGES)
    # torchrun without GPUs: Accelerate starts gloo only when told the processes are CPU ones.
    accelerator = Accelerator(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available(),
                              mixed_precision=args.mixed_precision)
    world = accelerator.num_processes
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes; use a multiple of {world}")
    check_output_dir(args.output_dir, args.data)
    try:
        backbone = backbone_source(args)
        image_size, size_reason = default_image_size(args, backbone, os.path.join(args.data, "train"))
        data = datasets(args, image_size)
        backbone.model(len(data.classes), image_size=image_size)  # fail now, in one line, if it does not fit
    except (CheckpointError, DataError) as e:
        fail(str(e))
    except ValueError as e:  # a ViT whose image size is not a multiple of its patch
        fail(str(e))
    modes = {"quick": ("knn", "fast-linear"), "all": ("knn", "fast-linear", "linear")}.get(args.mode, (args.mode,))
    if "finetune" in modes:
        recipe = finetune_recipe(args, backbone)
    base_lr = args.lr if args.lr is not None else LINEAR_LR["vit" if is_vit(backbone.arch) else "resnet"]
    peak_lr = base_lr * args.batch_size / 256
    summary = {
        "pretrained": args.pretrained or "random-init", "source": describe(backbone.info), "arch": backbone.arch,
        "stem / patch": f"patch {backbone.patch_size}" if is_vit(backbone.arch) else backbone.stem,
        "image size": f"{image_size}, {size_reason}", "classes": len(data.classes),
        "train / val images": f"{len(data.train)} / {len(data.val)}", "modes": ", ".join(modes),
        "processes": world, "device": str(accelerator.device), "precision": accelerator.mixed_precision,
        "batch per process": args.batch_size // world, "global batch": args.batch_size,
    }
    if "linear" in modes:
        summary.update({"linear lr (scaled)": peak_lr, "linear epochs": linear_epochs(args), "BN head": args.bn_head})
        if args.batch_size > len(data.train):
            summary["note"] = f"batch {args.batch_size} exceeds the {len(data.train)} train images: one step per epoch"
    accelerator.print(format_summary(summary))

    results = quick_checks(args, modes, backbone, data, image_size, accelerator) \
        if {"knn", "fast-linear"} & set(modes) else {}
    if "linear" in modes:
        results["linear"] = linear_probe(args, backbone, data, image_size, peak_lr, accelerator)
    if "finetune" in modes:  # it writes checkpoints: one run per output folder
        try:
            lock = take_lock(args.output_dir, accelerator.is_main_process, lambda m: broadcast_object_list([m])[0])
        except RunLockError as e:
            fail(str(e))
        try:
            outcome = finetune(args, backbone, data, image_size, recipe, accelerator)
        finally:
            if lock is not None:
                lock.release()
        if outcome == EXIT_PREEMPTED:
            return EXIT_PREEMPTED
        results["finetune"] = outcome

    if accelerator.is_main_process:
        record = {"pretrained": args.pretrained or "random-init", "source": backbone.info["source"],
                  "arch": backbone.arch, "stem": backbone.stem,
                  "patch_size": backbone.patch_size if is_vit(backbone.arch)
                  else None, "step": backbone.info.get("step"), "image_size": image_size,
                  "num_classes": len(data.classes), "train_samples": len(data.train), "val_samples": len(data.val),
                  "processes": world, "config": vars(args), "results": results}
        path = os.path.join(args.output_dir, "results.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        Console().print(results_table(results, f"{backbone.arch}: {args.pretrained or 'random init'}"))
        accelerator.print(f"results in {path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
