"""The linear and feature-based probes of a frozen backbone: MoCo v3's linear classification
protocol (method.md §3, §5), weighted kNN and a fast linear head on cached features.

probe.py picks the backbone and the data and calls linear_probe or quick_checks; both split
their passes over the processes with bfcl/evaluation.py.
"""

import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from bfcl.bf_head import BatchFormerClassifier, targets_for
from bfcl.cli import fail
from bfcl.evaluation import Backbone, ProbeData, check_failed_reads, evaluate, features, summed
from bfcl.knn import knn_scores, topk_accuracy
from bfcl.pretrained import assert_backbone_unchanged, backbone_tensors, head_name, linear_head, set_head
from bfcl.schedules import learning_rate

FAST_LINEAR_BATCH, FAST_LINEAR_LR = 256, 0.1
LINEAR_LR = {"resnet": 0.1, "vit": 3.0}  # base lr of the linear protocol: MoCo v3's main_lincls.py commands


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


def quick_checks(args, modes, backbone: Backbone, data: ProbeData, image_size: int, accelerator: Accelerator) -> dict:
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


def linear_epochs(args) -> int:
    """--epochs for the linear protocol: 90 by default, and a whole number."""
    if args.epochs is None:
        return 90
    if not float(args.epochs).is_integer():
        fail(f"--epochs {args.epochs:g}: the linear protocol runs whole epochs; pass an integer")
    return int(args.epochs)


def linear_probe(args, backbone: Backbone, data: ProbeData, image_size: int, peak_lr: float,
                 accelerator: Accelerator) -> dict:
    """The linear classification protocol of MoCo v3 (method.md §3); returns best/last/history.

    --add_bf 1: a trainable BatchFormer before the head (bfcl/bf_head.py) trains with it on
    [x ; BF(x)], the labels twice; the backbone stays frozen, and evaluation uses the head alone."""
    world, device = accelerator.num_processes, accelerator.device
    local_batch = args.batch_size // world
    set_seed(args.seed)  # the same head on every process
    model = backbone.model(len(data.classes), args.bn_head, image_size)
    reference = backbone_tensors(model)
    if args.add_bf:
        model = BatchFormerClassifier(model)
    trained = (model.head, model.batchformer) if args.add_bf else (getattr(model, head_name(model)),)
    optimizer = torch.optim.SGD([p for m in trained for p in m.parameters()], lr=peak_lr, momentum=0.9,
                                weight_decay=0.0)
    train_loader = DataLoader(data.train_aug, batch_size=local_batch, shuffle=True, num_workers=args.workers,
                              pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    ddp_model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    history, failed = [], 0
    epochs = linear_epochs(args)
    for epoch in range(epochs):
        lr = learning_rate(epoch, epochs, 0, peak_lr)  # per epoch, no warmup
        optimizer.param_groups[0]["lr"] = lr
        ddp_model.eval()  # the backbone's BN statistics must never move ...
        for module in trained:  # ... only the head (and --bn-head's statistics, and BatchFormer) learns
            module.train()
        loss_sum, steps = torch.zeros((), device=device), 0
        for images, labels, failed_reads in train_loader:
            logits = ddp_model(images)  # [N, K], or [2N, K] with BatchFormer: the labels twice
            loss = F.cross_entropy(logits, targets_for(logits, labels))
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
    assert_backbone_unchanged(model.backbone if args.add_bf else model, reference)
    best = max(history, key=lambda h: h["top1"])
    return {"protocol": True, "bn_head": args.bn_head, "epochs": epochs, "batch_size": args.batch_size,
            "lr": peak_lr, "best": best, "last": history[-1], "history": history}
