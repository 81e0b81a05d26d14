"""The linear and feature-based probes of a frozen backbone: MoCo v3's linear classification
protocol (docs/method.md#linear-protocol), weighted kNN (docs/method.md#knn) and a fast linear
head on cached features.

probe.py (or a notebook, through bfcl/api.py) picks the backbone and the data and calls
linear_probe or quick_checks; both split their passes over the processes with bfcl/evaluation.py.
"""

import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from bfcl.bf_head import BatchFormerClassifier, targets_for
from bfcl.errors import ConfigError, DataError, TrainingError
from bfcl.evaluation import Backbone, ProbeData, check_failed_reads, class_scores, features, longtail_of, summed
from bfcl.knn import knn_scores, topk_accuracy
from bfcl.longtail import check_loss, class_counts, log_prior, longtail_metrics, training_logits
from bfcl.model import is_vit
from bfcl.pretrained import assert_backbone_unchanged, backbone_tensors, head_name, linear_head, set_head
from bfcl.schedules import learning_rate

FAST_LINEAR_BATCH, FAST_LINEAR_LR = 256, 0.1
LINEAR_LR = {"resnet": 0.1, "vit": 3.0}  # base lr of the linear protocol: MoCo v3's main_lincls.py commands


def knn_eval(bank, bank_labels, queries, labels, num_classes: int, ks, temperature: float,
             class_names: list[str] | None = None) -> dict:
    """Weighted kNN top-1/top-5 of queries [M, C] against the train bank [N, C], for each k; with
    class_names, each k's "longtail" block too (bfcl/longtail.py; the bank's labels give the class sizes)."""
    results = {"temperature": temperature}
    for k in ks:
        scores = knn_scores(queries, bank, bank_labels, num_classes, k=k, temperature=temperature)
        results[f"k{k}"] = topk_accuracy(scores, labels)
        if class_names is not None:
            results[f"k{k}"]["longtail"] = longtail_metrics(scores, labels, class_counts(bank_labels.tolist(),
                                                                                         num_classes), class_names)
    return results


def fast_linear(train_x, train_y, val_x, val_y, num_classes: int, epochs: int, seed: int, loss: str = "ce",
                class_names: list[str] | None = None) -> dict:
    """A linear head on fixed features [N, C] -> top-1/top-5 on [M, C]. Not the protocol: no augmentation.

    Features are standardised with train statistics, as --bn-head does, so that one lr fits every
    backbone. The variance floor (1 % of the mean variance) keeps near-constant dimensions, common
    in random or collapsed backbones, from being blown up into noise on small sets.
    N(0, 0.01²) init, SGD momentum 0.9, no weight decay, per-epoch cosine; init and batch order
    drawn from `seed` alone, so the same features and seed give the same result. loss
    "balanced-softmax": the train labels' log prior is added to the logits of the loss (bfcl/longtail.py).
    class_names: a "longtail" block too.
    """
    if len(train_x) < 2:  # the variance of one sample is NaN, and every standardised feature with it
        raise DataError(f"fast-linear standardises features with their train variance, which needs at least 2 "
                        f"train images; got {len(train_x)}: pass more labels (--labels-per-class, "
                        "--label-fraction or a longer --train-list)")
    mean, var = train_x.mean(0), train_x.var(0)
    std = (var + 0.01 * var.mean()).sqrt()
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise TrainingError("the train features' mean or variance is not finite (NaN or inf): the backbone gives "
                            "non-finite features; check the checkpoint (or its precision)")
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    with torch.random.fork_rng(devices=[]):  # the head's init from `seed` too, leaving the global RNG as it was
        torch.manual_seed(seed)
        head = linear_head(train_x.shape[1], num_classes).to(train_x.device)
    optimizer = torch.optim.SGD(head.parameters(), lr=FAST_LINEAR_LR, momentum=0.9, weight_decay=0.0)
    prior = log_prior(class_counts(train_y.tolist(), num_classes)) if check_loss(loss) == "balanced-softmax" else None
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        optimizer.param_groups[0]["lr"] = learning_rate(epoch, epochs, 0, FAST_LINEAR_LR)
        for batch in torch.randperm(len(train_x), generator=g).to(train_x.device).split(FAST_LINEAR_BATCH):
            value = F.cross_entropy(training_logits(head(train_x[batch]), prior), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
    with torch.no_grad():
        scores = head(val_x)
        out = {"protocol": False, "epochs": epochs, "criterion": loss, **topk_accuracy(scores, val_y)}
        if class_names is not None:
            out["longtail"] = longtail_metrics(scores, val_y, class_counts(train_y.tolist(), num_classes), class_names)
        return out


def feature_model(backbone: Backbone, num_classes: int, image_size: int, accelerator: Accelerator) -> torch.nn.Module:
    """The backbone without its head, in eval mode on the accelerator's device: images -> [N, C]."""
    model = backbone.model(num_classes, image_size=image_size)
    set_head(model, torch.nn.Identity())  # features, not class scores
    return model.to(accelerator.device).eval()


def quick_checks(backbone: Backbone, data: ProbeData, accelerator: Accelerator, *, knn_ks=(20, 200),
                 knn_t: float = 0.07, fast_epochs: int | None = 100, seed: int = 0, batch_size: int = 256,
                 workers: int = 0, max_bad_image_share: float = 0.01, features_file: str | None = None,
                 loss: str = "ce") -> dict:
    """kNN (knn_ks; None: skip) and/or fast-linear (fast_epochs; None: skip, loss: its training loss)
    on one centre-crop feature pass over train/ and val/ (batch_size: global). The results on the
    main process, {} on the others, each with its "longtail" block; features_file: also save the
    features there (safetensors)."""
    model = feature_model(backbone, len(data.classes), data.image_size, accelerator)
    local_batch = batch_size // accelerator.num_processes
    train_x, train_y = features(model, data.train, local_batch, accelerator, workers, max_bad_image_share)
    val_x, val_y = features(model, data.val, local_batch, accelerator, workers, max_bad_image_share)
    results = {}
    if accelerator.is_main_process:  # every process holds all features; one computes on them
        on_device = [t.to(accelerator.device) for t in (train_x, train_y, val_x, val_y)]
        if knn_ks is not None:
            results["knn"] = knn_eval(*on_device, len(data.classes), knn_ks, knn_t, data.classes)
        if fast_epochs is not None:
            results["fast_linear"] = fast_linear(*on_device, len(data.classes), fast_epochs, seed, loss, data.classes)
        if features_file is not None:
            save_file({"train_features": train_x, "train_labels": train_y, "val_features": val_x, "val_labels": val_y},
                      features_file, {"arch": backbone.arch, "stem": backbone.stem})
    return results


def linear_epochs(epochs: float | None) -> int:
    """--epochs for the linear protocol: 90 by default, and a whole number (else ConfigError)."""
    if epochs is None:
        return 90
    if not float(epochs).is_integer():
        raise ConfigError(f"--epochs {epochs:g}: the linear protocol runs whole epochs; pass an integer")
    return int(epochs)


def linear_peak_lr(arch: str, lr: float | None, batch_size: int) -> float:
    """The lr the linear protocol uses: base lr (default 0.1 ResNets, 3 ViTs) x global batch / 256."""
    base_lr = lr if lr is not None else LINEAR_LR["vit" if is_vit(arch) else "resnet"]
    return base_lr * batch_size / 256


def linear_probe(backbone: Backbone, data: ProbeData, accelerator: Accelerator, *, epochs: float | None = None,
                 batch_size: int = 1024, lr: float | None = None, bn_head: bool = False, bf_head: bool = False,
                 seed: int = 0, workers: int = 0, max_bad_image_share: float = 0.01, loss: str = "ce") -> dict:
    """The linear classification protocol of MoCo v3 (docs/method.md#linear-protocol) on
    data.train_aug, evaluated on data.val; returns best/last/history as results.json's "linear".

    epochs: whole epochs (None: 90); batch_size: global; lr: base lr, scaled by batch_size / 256
    (linear_peak_lr). bf_head: a trainable BatchFormer before the head (bfcl/bf_head.py) trains with
    it on [x ; BF(x)], the labels twice; the backbone stays frozen, and evaluation uses the head alone.
    loss "balanced-softmax": Balanced Softmax, the training subset's log class prior added to the
    logits of the loss only (bfcl/longtail.py). "longtail": the last epoch's per-class and group top-1."""
    prior = log_prior(class_counts(data.train.targets, len(data.classes))).to(accelerator.device) \
        if check_loss(loss) == "balanced-softmax" else None
    world, device = accelerator.num_processes, accelerator.device
    local_batch = batch_size // world
    peak_lr = linear_peak_lr(backbone.arch, lr, batch_size)
    epochs = linear_epochs(epochs)
    set_seed(seed)  # the same head on every process
    model = backbone.model(len(data.classes), bn_head, data.image_size)
    reference = backbone_tensors(model)
    if bf_head:
        model = BatchFormerClassifier(model)
    trained = (model.head, model.batchformer) if bf_head else (getattr(model, head_name(model)),)
    optimizer = torch.optim.SGD([p for m in trained for p in m.parameters()], lr=peak_lr, momentum=0.9,
                                weight_decay=0.0)
    train_loader = DataLoader(data.train_aug, batch_size=local_batch, shuffle=True, num_workers=workers,
                              pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    ddp_model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    history, failed = [], 0
    for epoch in range(epochs):
        lr = learning_rate(epoch, epochs, 0, peak_lr)  # per epoch, no warmup
        optimizer.param_groups[0]["lr"] = lr
        ddp_model.eval()  # the backbone's BN statistics must never move ...
        for module in trained:  # ... only the head (and --bn-head's statistics, and BatchFormer) learns
            module.train()
        loss_sum, steps = torch.zeros((), device=device), 0
        for images, labels, failed_reads in train_loader:
            logits = ddp_model(images)  # [N, K], or [2N, K] with BatchFormer: the labels twice
            value = F.cross_entropy(training_logits(logits, prior), targets_for(logits, labels))
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(value)
            optimizer.step()
            loss_sum += value.detach().float()
            failed += int(failed_reads.sum())
            steps += 1
        check_failed_reads(summed(accelerator, failed), (epoch + 1) * len(data.train_aug), max_bad_image_share)
        model.eval()
        # Evaluate the plain module: DDP syncs buffers on forward, and processes may hold
        # different numbers of val batches.
        scores, val_labels = class_scores(model, data.val, len(data.classes), local_batch, accelerator, workers,
                                          max_bad_image_share)
        mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(steps, 1)
        if not math.isfinite(mean_loss):  # a head trained on a NaN loss scores NaNs: refuse, write no result
            raise TrainingError(f"non-finite linear-protocol loss in epoch {epoch + 1} (lr {lr:.4g}); "
                                "lower --lr, or check the checkpoint")
        top = topk_accuracy(scores, val_labels)
        history.append({"epoch": epoch + 1, "lr": lr, "loss": mean_loss, **top})
        accelerator.print(f"linear epoch {epoch + 1}/{epochs} | lr {lr:.4g} | loss {mean_loss:.4f} | "
                          f"top1 {top['top1']:.2f} | top5 {top['top5']:.2f}")
    assert_backbone_unchanged(model.backbone if bf_head else model, reference)
    best = max(history, key=lambda h: h["top1"])
    return {"protocol": True, "bn_head": bn_head, "epochs": epochs, "batch_size": batch_size,
            "lr": peak_lr, "criterion": loss, "best": best, "last": history[-1], "history": history,
            "longtail": longtail_of(scores, val_labels, data)}
