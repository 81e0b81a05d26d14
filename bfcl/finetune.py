"""End-to-end fine-tuning (method.md §6): the whole backbone and a new head train together, with
a recipe from bfcl/finetune_recipe.py, exact resume and a SIGTERM checkpoint.

probe.py --mode finetune picks the backbone and the data, then calls finetune_recipe and finetune.
The result is OUTPUT/finetuned.safetensors, a torchvision classifier (head included).
"""

import contextlib
import copy
import dataclasses
import os

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from bfcl.batchformer import dropout_seed
from bfcl.bf_head import BatchFormerClassifier, param_groups_with_bf, targets_for
from bfcl.checkpoint import (CheckpointError, load_model_state, load_optimizer_state, optimizer_state_tensors,
                             resume_checkpoint, save_checkpoint, save_file_atomic)
from bfcl.cli import EXIT_PREEMPTED, StopSignal, code_version, fail, format_summary
from bfcl.evaluation import Backbone, ProbeData, check_failed_reads, evaluate
from bfcl.finetune_recipe import (FinetuneRecipe, MixupCutmix, add_drop_path, lr_at, param_groups, recipe_for,
                                  recipe_reason, soft_target_cross_entropy, train_transform)
from bfcl.loop import Window, batches
from bfcl.model import is_vit
from bfcl.progress import ProgressLog
from bfcl.tracking import tracker_log
from bfcl.runlock import RunLockError, take_lock
from bfcl.views import IMAGENET_MEAN, IMAGENET_STD, SeededImages

# Options that may change when a fine-tuning run resumes; any other difference is refused.
FINETUNE_RESUMABLE = {"workers", "output_dir", "resume", "force_resume", "log_every", "save_every", "keep", "max_steps",
                      "eval_every", "eval_epoch_ends", "max_bad_image_share", "max_image_pixels", "knn_k", "knn_t",
                      "fast_epochs", "save_features", "report_to"}
# probe.py's flag -> the FinetuneRecipe field it overrides
RECIPE_FLAGS = {"epochs": "epochs", "lr": "base_lr", "wd": "weight_decay", "warmup_epochs": "warmup_epochs",
                "min_lr": "min_lr", "label_smoothing": "label_smoothing", "mixup": "mixup", "cutmix": "cutmix",
                "randaugment": "randaugment", "reprob": "random_erasing", "drop_path": "drop_path",
                "layer_decay": "layer_decay"}


def finetune_recipe(args, arch: str) -> tuple[FinetuneRecipe, str | None]:
    """The backbone family's recipe (bfcl/finetune_recipe.py) with every flag given applied, and a
    note for the summary when the warm-up was scaled.

    --epochs shorter than the recipe's without --warmup-epochs keeps the recipe's warm-up share
    (5 of 90 epochs for ResNets, 5 of 150 for ViTs) instead of its 5 epochs."""
    recipe = recipe_for("vit" if is_vit(arch) else "resnet", pretrained=not args.random_init)
    given = {field: getattr(args, flag) for flag, field in RECIPE_FLAGS.items() if getattr(args, flag) is not None}
    if not is_vit(arch) and given.get("layer_decay") is not None:
        fail("--layer-decay applies to ViTs only; drop it for a ResNet")
    note = None
    if "epochs" in given and "warmup_epochs" not in given and given["epochs"] < recipe.epochs and recipe.warmup_epochs:
        given["warmup_epochs"] = recipe.warmup_epochs * given["epochs"] / recipe.epochs
        note = (f"{given['warmup_epochs']:g} epochs: the {recipe.name} recipe's {recipe.warmup_epochs:g} of "
                f"{recipe.epochs:g}, scaled to --epochs {given['epochs']:g} (pass --warmup-epochs to set it)")
    recipe = dataclasses.replace(recipe, **given)
    if recipe.warmup_epochs >= recipe.epochs:
        fail(f"--warmup-epochs {recipe.warmup_epochs:g} must be shorter than --epochs {recipe.epochs:g} "
             f"({recipe.name} recipe); pass both")
    return recipe, note


@contextlib.contextmanager
def run_lock(output_dir: str, accelerator: Accelerator):
    """One fine-tuning run per output folder, as it writes checkpoints there: the main process
    holds OUTPUT/.lock while the body runs; a second run gets a one-line error."""
    try:
        lock = take_lock(output_dir, accelerator.is_main_process, lambda m: broadcast_object_list([m])[0])
    except RunLockError as e:
        fail(str(e))
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def finetune_model(backbone: Backbone, recipe: FinetuneRecipe, num_classes: int, image_size: int, world: int,
                   device, add_bf: bool = False) -> torch.nn.Module:
    """The whole classifier, every tensor trainable: MoCo v3 fine-tunes its ViTs through DeiT, where
    the patch projection and position embedding train too. Drop path on ViT blocks; BatchNorm
    trains (SyncBatchNorm on several GPUs). add_bf: wrapped in a BatchFormerClassifier
    (bfcl/bf_head.py), a trainable BatchFormer before the shared head."""
    model = backbone.model(num_classes, image_size=image_size, freeze=False)
    model.requires_grad_(True)
    if is_vit(backbone.arch):
        add_drop_path(model, recipe.drop_path)
    elif world > 1 and device.type == "cuda":  # gloo (CPU) rejects SyncBatchNorm
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return BatchFormerClassifier(model) if add_bf else model


def finetune(args, backbone: Backbone, data: ProbeData, image_size: int, recipe: FinetuneRecipe,
             accelerator: Accelerator):
    """End-to-end fine-tuning (method.md §6) with exact resume; returns the results, or
    EXIT_PREEMPTED after a checkpoint when a stop signal came.

    Per step: lr (warm-up, cosine to min_lr) -> Mixup/CutMix -> forward -> soft-target loss ->
    backward -> optimizer step; at sync points: log, evaluate, checkpoint, stop."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    family = "vit" if is_vit(backbone.arch) else "resnet"
    set_seed(args.seed)  # the same head on every process
    model = finetune_model(backbone, recipe, len(data.classes), image_size, world, device, bool(args.add_bf))
    groups_of = param_groups_with_bf if args.add_bf else param_groups
    groups, param_names = groups_of(model, family, recipe.weight_decay, recipe.layer_decay)
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=recipe.momentum, nesterov=recipe.nesterov) \
        if recipe.optimizer == "sgd" else torch.optim.AdamW(groups, lr=0.0)
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
    if data.subset is not None:  # a --train-list file may change under the same name
        config["subset_sha256"] = data.subset.record["sha256"]
    try:
        path, resumed = resume_checkpoint(args.output_dir, args.resume, config, FINETUNE_RESUMABLE,
                                          args.force_resume, total_steps, added={"subset_seed": 0})
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
        "recipe": recipe.name, "chosen for": recipe_reason(family, not args.random_init), "source": recipe.source,
        "optimizer": f"{recipe.optimizer}{', nesterov' if recipe.nesterov else ''}", "lr (scaled)": peak_lr,
        "min lr (scaled)": min_lr, "weight decay": recipe.weight_decay, "epochs": recipe.epochs,
        "steps": f"{total_steps} ({steps_per_epoch} per epoch, {warmup_steps} warm-up)",
        "augmentation": f"mixup {recipe.mixup}, cutmix {recipe.cutmix}, randaugment {recipe.randaugment}, "
                        f"erasing {recipe.random_erasing}, smoothing {recipe.label_smoothing}",
        "drop path / layer decay": f"{recipe.drop_path if family == 'vit' else '-'} / {recipe.layer_decay}",
        "BatchFormer in the classifier": "[x ; BF(x)] through the shared head, labels twice; removed at evaluation "
                                         "and in the export" if args.add_bf else "no",
        "resumed from": f"{path} (step {start})" if resumed else "scratch"}))

    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    log = ProgressLog(metrics_path, last_step, start, tracker=tracker_log(accelerator, metrics_path)) \
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
        logits = ddp_model(images).float()  # [N, K], or [2N, K] with BatchFormer: the targets twice
        loss = soft_target_cross_entropy(logits, targets_for(logits, targets), recipe.label_smoothing)
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
    if accelerator.is_main_process:  # the fine-tuned classifier, torchvision keys, head included, no BatchFormer
        state = model.classifier_state() if args.add_bf else model.state_dict()
        save_file_atomic(state, path, classifier_metadata(backbone, image_size, len(data.classes), final))
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
