"""How good is a pretrained backbone? MoCo v3's linear classification protocol, and faster checks.

    accelerate launch probe.py --pretrained runs/pretrain/backbone.safetensors --data DIR
    accelerate launch probe.py --pretrained checkpoint_0099.pth.tar --data DIR --mode knn
    accelerate launch probe.py --random-init -a resnet50 --data DIR --mode all   # the baseline to beat
    torchrun --nproc_per_node 2 probe.py --pretrained ... --data DIR              # two CPU processes (gloo)

DIR holds train/<class>/<image> and val/<class>/<image> with the same class folders.
--pretrained takes a training checkpoint folder (checkpoints/step-*), a run folder or its
backbone.safetensors, an original MoCo v3 / BatchFormer .pth.tar, or a torchvision state dict
(.pth or .safetensors); nothing is unpickled beyond tensors, numbers and strings.

Modes (--mode):
  linear       the protocol (method.md §3): frozen backbone in eval mode, linear head
               N(0, 0.01²), SGD momentum 0.9, no weight decay, lr 0.1 x batch/256 on a per-epoch
               cosine, 90 epochs, batch 1024, RandomResizedCrop + flip; val Resize + CenterCrop.
               Reports top-1/top-5 of the best and of the last epoch, and asserts at the end that
               no backbone tensor (BN buffers included) moved.
  knn          weighted kNN (k 20 and 200, T 0.07) on L2-normalised centre-crop features,
               train features as the bank. Minutes instead of days.
  fast-linear  a linear head on cached centre-crop features, standardised with train
               statistics, no augmentation. A quick check on a CPU, NOT the protocol.
  all          knn and fast-linear (sharing one feature pass), then linear.

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
                     "last": {same keys}, "history": [{same keys}, one per epoch]}}}
top-5 is capped at the class count (100 % with 5 classes or fewer). "best" is picked on the
val set, so it is optimistic; MoCo v3's main_lincls.py tracked it as best_acc1. Say which one
you report.
"""

import argparse
import copy
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset

from bfcl.checkpoint import CheckpointError
from bfcl.data import DataError, check_image_folder, eval_transform, image_folder, probe_train_transform
from bfcl.knn import extract_features, knn_scores, topk_accuracy
from bfcl.model import ARCHS, STEMS, build_backbone
from bfcl.pretrained import (assert_backbone_unchanged, backbone_tensors, describe, guess_arch_stem, linear_head,
                             load_backbone_state, probe_model)

MODES = ("linear", "knn", "fast-linear", "all")
FAST_LINEAR_BATCH, FAST_LINEAR_LR = 256, 0.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=type("F", (argparse.RawDescriptionHelpFormatter,
                                                           argparse.ArgumentDefaultsHelpFormatter), {}))
    a = p.add_argument_group("what to evaluate")
    w = a.add_mutually_exclusive_group(required=True)
    w.add_argument("--pretrained", help="checkpoint folder, backbone.safetensors, MoCo v3 .pth.tar, or torchvision state dict")
    w.add_argument("--random-init", action="store_true", help="a randomly initialised backbone: the baseline every result must beat")
    a.add_argument("-a", "--arch", choices=ARCHS, default=None,
                   help="backbone; default: what the checkpoint records, else read off its tensor shapes (resnet50 for --random-init)")
    a.add_argument("--stem", choices=STEMS, default=None,
                   help="'small' (3x3 conv, no max-pool) for 32-96 px images; default: as --arch")
    a.add_argument("--mode", choices=MODES, default="linear", help="linear is the protocol; knn and fast-linear are quick checks")
    a = p.add_argument_group("data")
    a.add_argument("--data", required=True, help="folder with train/ and val/, one subfolder per class, the same classes in both")
    a.add_argument("--image-size", type=int, default=None,
                   help="crop side; default: the pretraining size if recorded, else the data's image side with the "
                        "small stem, else 224 (val: Resize 256 + CenterCrop 224, no resize below 96 px)")
    a.add_argument("--max-train-samples", type=int, default=0, help="use a seeded random subset of train/ this large (0: all)")
    a.add_argument("--workers", type=int, default=8, help="data-loading processes per process")
    a = p.add_argument_group("linear protocol")
    a.add_argument("-b", "--batch-size", type=int, default=1024, help="GLOBAL batch over all processes (also the feature-pass batch)")
    a.add_argument("--lr", type=float, default=0.1, help="base lr; the lr used is lr x batch-size / 256")
    a.add_argument("--epochs", type=int, default=90, help="epochs of the cosine schedule")
    a.add_argument("--bn-head", action="store_true",
                   help="parameter-free BatchNorm before the linear head (MoCo v3 authors: makes the lr less sensitive)")
    a = p.add_argument_group("quick checks")
    a.add_argument("--knn-k", type=int, nargs="+", default=[20, 200], help="neighbour counts")
    a.add_argument("--knn-t", type=float, default=0.07, help="temperature of the exp(cos / T) vote weights")
    a.add_argument("--fast-epochs", type=int, default=100,
                   help=f"epochs of fast-linear (batch {FAST_LINEAR_BATCH}, lr {FAST_LINEAR_LR}, cosine)")
    a.add_argument("--save-features", action="store_true", help="write the centre-crop features to --output-dir/features.safetensors")
    a = p.add_argument_group("run")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--output-dir", default="runs/probe", help="results.json (and features.safetensors) go here")
    return p.parse_args(argv)


def fail(message: str) -> None:
    """Stop with a one-line error."""
    sys.exit(f"error: {message}")


def backbone_source(args) -> tuple[dict, dict, str, str]:
    """(backbone state, info, arch, stem). Flags win over what the file records, which wins over
    what its tensor shapes say; probe_model then refuses a checkpoint that does not fit."""
    if args.random_init:
        arch, stem = args.arch or "resnet50", args.stem or "imagenet"
        set_seed(args.seed)
        state = {k: v for k, v in build_backbone(arch, stem).state_dict().items() if not k.startswith("fc.")}
        return state, {"source": "random init"}, arch, stem
    state, info = load_backbone_state(args.pretrained)
    guessed_arch, guessed_stem = guess_arch_stem(state)
    arch = args.arch or info.get("arch") or guessed_arch
    if arch is None:
        fail(f"cannot tell the arch of {args.pretrained}; pass --arch ({', '.join(ARCHS)})")
    return state, info, arch, args.stem or info.get("stem") or guessed_stem


def default_image_size(args, info: dict, stem: str, train_root: str) -> tuple[int, str]:
    """(crop side, why): --image-size, else the pretraining's, else the data's (small stem), else 224."""
    if args.image_size:
        return args.image_size, "--image-size"
    if info.get("image_size"):
        return int(info["image_size"]), "recorded in the checkpoint"
    if stem == "small":  # 32-96 px data; probing it at 224 would cost ~50x for nothing
        with Image.open(image_folder(train_root).samples[0][0]) as img:
            return min(img.size), "side of the first training image (small stem)"
    return 224, "ImageNet default"


def datasets(args, image_size: int) -> dict:
    """train/ with the probe's augmentation and with the centre crop, val/ with the centre crop."""
    train_root, val_root = os.path.join(args.data, "train"), os.path.join(args.data, "val")
    train_classes, val_classes = check_image_folder(train_root), check_image_folder(val_root)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:3]
        only_val = sorted(set(val_classes) - set(train_classes))[:3]
        raise DataError(f"train/ and val/ have different classes (only in train: {only_train}, only in val: "
                        f"{only_val}); give both the same class folders")
    train = image_folder(train_root, eval_transform(image_size))
    train_aug = copy.copy(train)  # shares the file list: ImageNet's is scanned once
    train_aug.transform = probe_train_transform(image_size)
    sets = {"train_aug": train_aug, "train": train, "val": image_folder(val_root, eval_transform(image_size))}
    if args.max_train_samples and args.max_train_samples < len(sets["train"]):
        g = torch.Generator().manual_seed(args.seed)
        keep = torch.randperm(len(sets["train"]), generator=g)[:args.max_train_samples].sort().values.tolist()
        sets["train_aug"], sets["train"] = Subset(sets["train_aug"], keep), Subset(sets["train"], keep)
    sets["classes"] = train_classes
    return sets


def shard(num_samples: int, batch: int, rank: int, world: int) -> list[int]:
    """This process's dataset indices: batches rank, rank + world, ... of the plain order, no padding.

    Each batch is the one a single process with the same batch size would see, so features match
    a one-process run exactly; the last batches may leave some processes with fewer samples.
    """
    return [i for start in range(rank * batch, num_samples, world * batch) for i in range(start, min(start + batch, num_samples))]


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


def features(model, dataset, batch: int, args, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of the whole dataset, split over the processes: ([M, C] fp32, [M] labels)."""
    indices = shard(len(dataset), batch, accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch, num_workers=args.workers)
    if indices:
        with accelerator.autocast():
            local, labels = extract_features(model, loader, accelerator.device)
    else:  # more processes than batches
        local, labels = torch.zeros(0, model.feature_dim), torch.zeros(0, dtype=torch.long)
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
        optimizer.param_groups[0]["lr"] = FAST_LINEAR_LR * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for batch in torch.randperm(len(train_x), generator=g).to(train_x.device).split(FAST_LINEAR_BATCH):
            loss = F.cross_entropy(head(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return {"protocol": False, "epochs": epochs, **topk_accuracy(head(val_x), val_y)}


@torch.no_grad()
def evaluate(model, dataset, num_classes: int, batch: int, args, accelerator) -> dict:
    """Top-1/top-5 of the probe model on the whole val set, each image counted once."""
    indices = shard(len(dataset), batch, accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch, num_workers=args.workers)
    scores, labels = [torch.zeros(0, num_classes)], [torch.zeros(0, dtype=torch.long)]  # a process may get none
    with accelerator.autocast():
        for images, targets in loader:
            scores.append(model(images.to(accelerator.device)).float().cpu())
            labels.append(targets)
    scores, labels = gather_in_order(accelerator, indices, len(dataset), torch.cat(scores), torch.cat(labels))
    return topk_accuracy(scores, labels)


def linear_probe(args, state: dict, arch: str, stem: str, sets: dict, accelerator) -> dict:
    """The linear classification protocol of MoCo v3 (method.md §3); returns best/last/history."""
    world, device = accelerator.num_processes, accelerator.device
    local_batch, peak_lr = args.batch_size // world, args.lr * args.batch_size / 256
    set_seed(args.seed)  # the same head on every process
    model = probe_model(arch, stem, state, len(sets["classes"]), args.bn_head)
    reference = backbone_tensors(model)
    head = model.fc
    optimizer = torch.optim.SGD(head.parameters(), lr=peak_lr, momentum=0.9, weight_decay=0.0)
    train_loader = DataLoader(sets["train_aug"], batch_size=local_batch, shuffle=True, num_workers=args.workers,
                              pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    ddp_model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    history = []
    for epoch in range(args.epochs):
        lr = peak_lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))  # per epoch, no warmup
        optimizer.param_groups[0]["lr"] = lr
        ddp_model.eval()  # the backbone's BN statistics must never move ...
        head.train()      # ... only the head (and --bn-head's statistics) learns
        loss_sum, steps = torch.zeros((), device=device), 0
        for images, labels in train_loader:
            loss = F.cross_entropy(ddp_model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            loss_sum += loss.detach().float()
            steps += 1
        model.eval()
        # Evaluate the plain module: DDP syncs buffers on forward, and processes may hold
        # different numbers of val batches.
        top = evaluate(model, sets["val"], len(sets["classes"]), local_batch, args, accelerator)
        loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(steps, 1)
        history.append({"epoch": epoch + 1, "lr": lr, "loss": loss, **top})
        accelerator.print(f"linear epoch {epoch + 1}/{args.epochs} | lr {lr:.4g} | loss {loss:.4f} | "
                          f"top1 {top['top1']:.2f} | top5 {top['top5']:.2f}")
    assert_backbone_unchanged(model, reference)
    best = max(history, key=lambda h: h["top1"])
    return {"protocol": True, "bn_head": args.bn_head, "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": peak_lr, "best": best, "last": history[-1], "history": history}


def quick_checks(args, modes, state: dict, arch: str, stem: str, sets: dict, accelerator) -> dict:
    """kNN and/or fast-linear on one centre-crop feature pass over train/ and val/."""
    model = probe_model(arch, stem, state, len(sets["classes"]))
    model.fc = torch.nn.Identity()  # features, not class scores
    model.to(accelerator.device).eval()
    local_batch = args.batch_size // accelerator.num_processes
    train_x, train_y = features(model, sets["train"], local_batch, args, accelerator)
    val_x, val_y = features(model, sets["val"], local_batch, args, accelerator)
    results = {}
    if accelerator.is_main_process:  # every process holds all features; one computes on them
        on_device = [t.to(accelerator.device) for t in (train_x, train_y, val_x, val_y)]
        if "knn" in modes:
            results["knn"] = knn_eval(*on_device, len(sets["classes"]), args.knn_k, args.knn_t)
        if "fast-linear" in modes:
            results["fast_linear"] = fast_linear(*on_device, len(sets["classes"]), args.fast_epochs, args.seed)
        if args.save_features:
            save_file({"train_features": train_x, "train_labels": train_y, "val_features": val_x, "val_labels": val_y},
                      os.path.join(args.output_dir, "features.safetensors"), {"arch": arch, "stem": stem})
    return results


def results_table(results: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("evaluation", "top-1 %", "top-5 %", "note"):
        table.add_column(column, justify="right" if "%" in column else "left")
    for name, r in results.get("knn", {}).items():
        if name.startswith("k") and isinstance(r, dict):
            table.add_row(f"kNN {name[1:]}-NN", f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"T {results['knn']['temperature']}")
    if "fast_linear" in results:
        r = results["fast_linear"]
        table.add_row("fast linear", f"{r['top1']:.2f}", f"{r['top5']:.2f}", "cached centre crops: NOT the protocol")
    if "linear" in results:
        for which in ("best", "last"):
            r = results["linear"][which]
            table.add_row(f"linear, {which} epoch", f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"protocol, epoch {r['epoch']}")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    # torchrun without GPUs: Accelerate starts gloo only when told the processes are CPU ones.
    accelerator = Accelerator(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    world = accelerator.num_processes
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes; use a multiple of {world}")
    if min(args.epochs, args.fast_epochs, *args.knn_k) < 1:
        fail("--epochs, --fast-epochs and --knn-k must be at least 1")
    os.makedirs(args.output_dir, exist_ok=True)
    if not os.access(args.output_dir, os.W_OK):
        fail(f"--output-dir {args.output_dir} is not writable; choose another folder")
    try:
        state, info, arch, stem = backbone_source(args)
        image_size, size_reason = default_image_size(args, info, stem, os.path.join(args.data, "train"))
        sets = datasets(args, image_size)
        probe_model(arch, stem, state, len(sets["classes"]))  # fail now, in one line, if it does not fit
    except (CheckpointError, DataError) as e:
        fail(str(e))
    modes = ("knn", "fast-linear", "linear") if args.mode == "all" else (args.mode,)
    local_batch = args.batch_size // world
    summary = {
        "pretrained": args.pretrained or "random-init", "source": describe(info), "arch": arch, "stem": stem,
        "image size": f"{image_size}, {size_reason}", "classes": len(sets["classes"]),
        "train / val images": f"{len(sets['train'])} / {len(sets['val'])}", "modes": ", ".join(modes),
        "processes": world, "device": str(accelerator.device), "precision": accelerator.mixed_precision,
        "batch per process": local_batch, "global batch": args.batch_size,
    }
    if "linear" in modes:
        summary.update({"linear lr (scaled)": args.lr * args.batch_size / 256, "linear epochs": args.epochs,
                        "BN head": args.bn_head})
        if args.batch_size > len(sets["train"]):
            summary["note"] = f"batch {args.batch_size} exceeds the {len(sets['train'])} train images: one step per epoch"
    accelerator.print("\n".join(f"{k:>20}: {v}" for k, v in summary.items()))

    results = quick_checks(args, modes, state, arch, stem, sets, accelerator) if modes != ("linear",) else {}
    if "linear" in modes:
        results["linear"] = linear_probe(args, state, arch, stem, sets, accelerator)

    if accelerator.is_main_process:
        record = {"pretrained": args.pretrained or "random-init", "source": info["source"], "arch": arch, "stem": stem,
                  "step": info.get("step"), "image_size": image_size, "num_classes": len(sets["classes"]),
                  "train_samples": len(sets["train"]), "val_samples": len(sets["val"]), "processes": world,
                  "config": vars(args), "results": results}
        path = os.path.join(args.output_dir, "results.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        Console().print(results_table(results, f"{arch}/{stem}: {args.pretrained or 'random init'}"))
        accelerator.print(f"results in {path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
