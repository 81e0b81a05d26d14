"""End-to-end fine-tuning (docs/method.md#fine-tuning): the whole backbone and a new head train
together, with a recipe from bfcl/finetune_recipe.py, exact resume and a SIGTERM checkpoint.

probe.py --mode finetune (or bfcl.finetune in a notebook) picks the backbone and the data, then
calls finetune_recipe and finetune. The result is OUTPUT/finetuned.safetensors, a torchvision
classifier (head included).
"""

import copy
import dataclasses
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from bfcl.batchformer import dropout_seed
from bfcl.bf_head import BatchFormerClassifier, targets_for
from bfcl.checkpoint import (load_model_state, load_optimizer_state, optimizer_state_tensors, resume_checkpoint,
                             save_checkpoint, save_file_atomic)
from bfcl.errors import ConfigError, TrainingError
from bfcl.evaluation import Backbone, ProbeData, check_failed_reads, class_scores, longtail_of
from bfcl.finetune_recipe import (FinetuneRecipe, MixupCutmix, add_drop_path, lr_at, recipe_for,
                                  recipe_reason, soft_target_cross_entropy, train_transform)
from bfcl.knn import topk_accuracy
from bfcl.longtail import check_loss, class_counts, log_prior, training_logits
from bfcl.loop import Window, batches
from bfcl.model import is_vit
from bfcl.optim import param_groups
from bfcl.progress import ProgressLog
from bfcl.runs import (EXIT_PREEMPTED, StopSignal, check_finite_weights, code_version, format_summary, mark_stopped,
                       scaled_warmup)
from bfcl.tracking import tracker_log
from bfcl.views import IMAGENET_MEAN, IMAGENET_STD, SeededImages

# Options that may change when a fine-tuning run resumes; any other difference is refused.
FINETUNE_RESUMABLE = {"workers", "output_dir", "resume", "force_resume", "log_every", "save_every", "keep", "max_steps",
                      "eval_every", "eval_epoch_ends", "max_bad_image_share", "max_image_pixels", "knn_k", "knn_t",
                      "fast_epochs", "save_features", "report_to"}
# The default evaluation schedule (evaluation_steps): at most this many evaluations on val/, costing at
# most a tenth of the training, where a training image costs 3 forward passes (forward + backward).
MAX_EVAL_POINTS, EVAL_SHARE_TENTHS, TRAIN_PASSES = 10, 1, 3
# probe.py's flag -> the FinetuneRecipe field it overrides
RECIPE_FLAGS = {"epochs": "epochs", "lr": "base_lr", "wd": "weight_decay", "warmup_epochs": "warmup_epochs",
                "min_lr": "min_lr", "label_smoothing": "label_smoothing", "mixup": "mixup", "cutmix": "cutmix",
                "randaugment": "randaugment", "reprob": "random_erasing", "drop_path": "drop_path",
                "layer_decay": "layer_decay"}


def finetune_recipe(arch: str, pretrained: bool, **given) -> tuple[FinetuneRecipe, str | None]:
    """The backbone family's recipe (bfcl/finetune_recipe.py) with every FinetuneRecipe field given
    (not None) applied, and a note for the summary when the warm-up was scaled. ConfigError for
    settings that do not fit.

    epochs shorter than the recipe's without warmup_epochs keeps the recipe's warm-up share
    (5 of 90 epochs for ResNets, 5 of 150 for ViTs) instead of its 5 epochs (bfcl.runs.scaled_warmup)."""
    recipe = recipe_for("vit" if is_vit(arch) else "resnet", pretrained=pretrained)
    unknown = set(given) - {f.name for f in dataclasses.fields(FinetuneRecipe)}
    if unknown:
        raise ConfigError(f"unknown fine-tuning setting(s) {', '.join(sorted(unknown))}; choose among the fields "
                          "of bfcl.finetune_recipe.FinetuneRecipe")
    given = {field: value for field, value in given.items() if value is not None}
    if not is_vit(arch) and given.get("layer_decay") is not None:
        raise ConfigError("--layer-decay applies to ViTs only; drop it for a ResNet")
    note = None
    warmup = scaled_warmup(recipe.epochs, recipe.warmup_epochs, given.get("epochs"), given.get("warmup_epochs"))
    if warmup is not None:
        given["warmup_epochs"] = warmup
        note = (f"{given['warmup_epochs']:g} epochs: the {recipe.name} recipe's {recipe.warmup_epochs:g} of "
                f"{recipe.epochs:g}, scaled to --epochs {given['epochs']:g} (pass --warmup-epochs to set it)")
    recipe = dataclasses.replace(recipe, **given)
    if recipe.warmup_epochs >= recipe.epochs:
        raise ConfigError(f"--warmup-epochs {recipe.warmup_epochs:g} must be shorter than --epochs "
                          f"{recipe.epochs:g} ({recipe.name} recipe); pass both")
    return recipe, note


@dataclass(frozen=True)
class FinetuneRun:
    """How a fine-tuning run goes, besides its recipe: where it writes, its batch and seed, when it
    logs, evaluates and checkpoints (probe.py's flags of the same names)."""

    output_dir: str
    batch_size: int  # global, over all processes
    pretrained: bool = True  # only for the summary's "chosen for" line: the recipe is already chosen
    bf_head: bool = False  # a trainable BatchFormer before the shared head (bfcl/bf_head.py)
    seed: int = 0
    workers: int = 0
    resume: str = "auto"  # 'auto', 'none' or a checkpoint folder
    force_resume: bool = False
    max_steps: int = 0  # 0: all epochs
    save_every: int = 1000
    keep: int = 2
    log_every: int = 10
    eval_every: int = 0
    eval_epoch_ends: bool | None = None  # None: evaluation_steps' bounded default
    max_bad_image_share: float = 0.01
    loss: str = "ce"  # or "balanced-softmax": the training subset's log prior added to the loss's logits


def evaluation_steps(total_steps: int, steps_per_epoch: int, batch_size: int, val_size: int,
                     every_epoch: bool | None) -> list[int]:
    """The steps after which fine-tuning evaluates on val/ (besides --eval-every), ascending, the
    schedule's last step always. every_epoch True: each epoch end; False: the end only; None: as many
    evenly spread epoch ends as keep evaluation within a tenth of the training's cost (a training image
    counts TRAIN_PASSES forward passes, a val image one), at most MAX_EVAL_POINTS, the end included.
    A pure function of the run's settings, so a resumed run evaluates at the same steps."""
    epochs = total_steps // steps_per_epoch
    if every_epoch:
        return sorted({e * steps_per_epoch for e in range(1, epochs + 1)} | {total_steps})
    affordable = EVAL_SHARE_TENTHS * TRAIN_PASSES * total_steps * batch_size // (10 * max(val_size, 1))
    points = 1 if every_epoch is False else max(1, min(MAX_EVAL_POINTS, epochs, affordable))
    return sorted({round(i * epochs / points) * steps_per_epoch for i in range(1, points)} | {total_steps})


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


def finetune(backbone: Backbone, data: ProbeData, recipe: FinetuneRecipe, run: FinetuneRun,
             accelerator: Accelerator, record: dict | None = None):
    """End-to-end fine-tuning (docs/method.md#fine-tuning) with exact resume; returns the results
    (results.json's "finetune"), or EXIT_PREEMPTED after a checkpoint when a stop signal came.
    The caller holds the output folder's run lock (bfcl.runs.run_lock).

    record: the settings stored in every checkpoint and compared on resume (probe.py: its parsed
    flags; default: `run` itself). Per step: lr (warm-up, cosine to min_lr) -> Mixup/CutMix ->
    forward -> soft-target loss (of logits + log prior under run.loss "balanced-softmax", Balanced
    Softmax; evaluation sees the plain logits) -> backward -> optimizer step; at sync points: log,
    evaluate, checkpoint, stop. "longtail": the final evaluation's per-class and group top-1
    (bfcl/longtail.py). ConfigError, DataError, CheckpointError or TrainingError when it cannot."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    family = "vit" if is_vit(backbone.arch) else "resnet"
    image_size = data.image_size
    prior = log_prior(class_counts(data.train.targets, len(data.classes))).to(device) \
        if check_loss(run.loss) == "balanced-softmax" else None
    set_seed(run.seed)  # the same head on every process
    model = finetune_model(backbone, recipe, len(data.classes), image_size, world, device, run.bf_head)
    if run.bf_head:  # BatchFormer's tensors after the classifier's, in groups of their own at the head's lr
        with model.plain_classifier() as classifier:
            groups, param_names = param_groups(classifier, family, recipe.weight_decay, recipe.layer_decay,
                                               batchformer=model.batchformer)
    else:
        groups, param_names = param_groups(model, family, recipe.weight_decay, recipe.layer_decay)
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=recipe.momentum, nesterov=recipe.nesterov) \
        if recipe.optimizer == "sgd" else torch.optim.AdamW(groups, lr=0.0)
    train_set = SeededImages(copy.copy(data.train))  # fine-tuning's own augmentation, seeded per sample
    train_set.images.transform = train_transform(recipe, image_size, IMAGENET_MEAN, IMAGENET_STD)
    steps_per_epoch = len(train_set) // run.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training images do not fill one global batch of {run.batch_size}; "
                          "lower -b")
    total_steps = max(1, round(steps_per_epoch * recipe.epochs))
    last_step = min(total_steps, run.max_steps) if run.max_steps else total_steps
    warmup_steps = round(steps_per_epoch * recipe.warmup_epochs)
    peak_lr, min_lr = recipe.scaled_lr(run.batch_size), recipe.min_lr  # DeiT scales the peak, not the floor
    eval_steps = evaluation_steps(total_steps, steps_per_epoch, run.batch_size, len(data.val), run.eval_epoch_ends)

    record = dataclasses.asdict(run) if record is None else record
    config = {**record, "recipe": dataclasses.asdict(recipe), "image_size": image_size}
    if data.subset is not None:  # a --train-list file may change under the same name
        config["subset_sha256"] = data.subset.record["sha256"]
    path, resumed = resume_checkpoint(run.output_dir, run.resume, config, FINETUNE_RESUMABLE, run.force_resume,
                                      total_steps, added={"subset_seed": 0, "loss": "ce", "imbalance": None})
    if resumed is not None:
        load_model_state(model, resumed["model"], path)
        load_optimizer_state(optimizer, param_names, resumed["optimizer"])
    start = resumed["meta"]["step"] if resumed else 0
    history = resumed["meta"].get("history", []) if resumed else []
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None and accelerator.scaler is not None and resumed["meta"].get("scaler"):
        accelerator.scaler.load_state_dict(resumed["meta"]["scaler"])  # fp16: the loss scale goes on
    mix = MixupCutmix(len(data.classes), recipe.mixup, recipe.cutmix, recipe.mix_switch_prob)
    accelerator.print(format_summary({
        "recipe": recipe.name, "chosen for": recipe_reason(family, run.pretrained), "source": recipe.source,
        "optimizer": f"{recipe.optimizer}{', nesterov' if recipe.nesterov else ''}", "lr (scaled)": peak_lr,
        "min lr (scaled)": min_lr, "weight decay": recipe.weight_decay, "epochs": recipe.epochs,
        "steps": f"{total_steps} ({steps_per_epoch} per epoch, {warmup_steps} warm-up)",
        "augmentation": f"mixup {recipe.mixup}, cutmix {recipe.cutmix}, randaugment {recipe.randaugment}, "
                        f"erasing {recipe.random_erasing}, smoothing {recipe.label_smoothing}",
        "drop path / layer decay": f"{recipe.drop_path if family == 'vit' else '-'} / {recipe.layer_decay}",
        "loss": "Balanced Softmax (log class prior added to the training logits)" if prior is not None
                else "cross-entropy",
        "BatchFormer in the classifier": "[x ; BF(x)] through the shared head, labels twice; removed at evaluation "
                                         "and in the export" if run.bf_head else "no",
        "evaluation on val/": f"after steps {', '.join(map(str, eval_steps))}"
                              + (f" and every {run.eval_every}" if run.eval_every else "") + " ("
                              + {True: "every epoch end", False: "the end only"}.get(
                                  run.eval_epoch_ends, "within a tenth of the training's cost; --eval-epoch-ends: "
                                                       "every epoch") + ")",
        "resumed from": f"{path} (step {start})" if resumed else "scratch"}))

    metrics_path = os.path.join(run.output_dir, "metrics.jsonl")
    log = ProgressLog(metrics_path, last_step, start, tracker=tracker_log(accelerator, metrics_path)) \
        if accelerator.is_main_process else None
    stop, window, bad = StopSignal(), Window(device), 0
    steps = batches(train_set, run.batch_size, rank, world, run.seed, start, last_step, run.workers,
                    pin_memory=device.type == "cuda")

    last_scores = []  # the latest evaluation's (scores, labels), for the long-tail metrics

    def evaluate_val() -> dict:
        last_scores[:] = class_scores(model, data.val, len(data.classes), run.batch_size // world, accelerator,
                                      run.workers, run.max_bad_image_share)
        return topk_accuracy(*last_scores)

    for step, (images, labels, failed) in steps:
        window.data_arrived()
        lr = lr_at(step, total_steps, warmup_steps, peak_lr, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        torch.manual_seed(dropout_seed(run.seed, step, rank))  # Mixup/CutMix and drop path
        images, targets = mix(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        logits = ddp_model(images).float()  # [N, K], or [2N, K] with BatchFormer: the targets twice
        loss = soft_target_cross_entropy(training_logits(logits, prior), targets_for(logits, targets),
                                         recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        window.add(loss, failed, stop.requested)

        done = step + 1
        end_of_epoch = done % steps_per_epoch == 0
        evaluate_now = done in eval_steps or done == last_step or \
            (run.eval_every and done % run.eval_every == 0)
        save_now = done % run.save_every == 0 or end_of_epoch or done == last_step
        if done % run.log_every and not (evaluate_now or save_now):
            continue
        sums = window.read(lambda t: accelerator.reduce(t, reduction="sum"), world)
        bad += sums["bad"]
        if sums["nonfinite"]:
            raise TrainingError(f"non-finite loss by step {done} (lr {lr:.4g}); the last good checkpoint is kept "
                                f"in {run.output_dir}; lower --lr")
        check_failed_reads(bad, done * run.batch_size, run.max_bad_image_share)
        metrics = {"epoch": round(done / steps_per_epoch, 3), "loss": sums["loss"],
                   "lr": lr, "img_per_s": round(sums["steps"] * run.batch_size / sums["elapsed"], 1)}
        if evaluate_now:
            model.eval()
            metrics.update(evaluate_val())
            model.train()
            history.append({"step": done, **metrics})
        if log is not None:
            log.log(done, metrics)
        if save_now or sums["stop"]:
            save_finetune(run, accelerator, model, optimizer, param_names, done, config, history, lr)
        if sums["stop"]:
            if log is not None:
                log.print(f"stopped by a signal at step {done}; checkpoint written; run the same command to resume")
                log.close()
                mark_stopped(run.output_dir, done)
            return EXIT_PREEMPTED
    if log is not None:
        log.close()
    final = max(start, last_step)
    if not history or history[-1]["step"] != final:  # resumed from a checkpoint saved between evaluations
        model.eval()
        history.append({"step": final, **evaluate_val()})
    elif not last_scores:  # resumed after the final evaluation: score the final model again for the per-class top-1
        model.eval()
        evaluate_val()
    path = os.path.join(run.output_dir, "finetuned.safetensors")
    if accelerator.is_main_process:  # the fine-tuned classifier, torchvision keys, head included, no BatchFormer
        state = model.classifier_state() if run.bf_head else model.state_dict()
        save_file_atomic(state, path, classifier_metadata(backbone, image_size, len(data.classes), final))
    accelerator.wait_for_everyone()
    best = max(history, key=lambda h: h["top1"])
    return {"recipe": dataclasses.asdict(recipe), "steps": final, "batch_size": run.batch_size, "lr": peak_lr,
            "criterion": run.loss, "best": best, "last": history[-1], "history": history, "model": path,
            "longtail": longtail_of(*last_scores, data)}


def classifier_metadata(backbone: Backbone, image_size: int, num_classes: int, step: int) -> dict:
    metadata = {"format": "bfcl-classifier-1", "arch": backbone.arch, "image_size": str(image_size),
                "num_classes": str(num_classes), "step": str(step)}
    metadata.update({"patch_size": str(backbone.patch_size)} if is_vit(backbone.arch) else {"stem": backbone.stem})
    return metadata


def save_finetune(run: FinetuneRun, accelerator, model, optimizer, param_names, step: int, config: dict,
                  history: list, lr: float) -> None:
    """A fine-tuning checkpoint (bfcl/checkpoint.py): model, optimizer, config and the evaluations
    so far. The main process writes; the others wait. Non-finite weights: TrainingError, nothing written."""
    check_finite_weights(model.state_dict(), accelerator, step, lr, run.output_dir)
    if accelerator.is_main_process:
        meta = {"version": code_version(), "config": config, "history": history,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": "derived from (seed, step, process index): nothing to restore"}
        save_checkpoint(run.output_dir, step, model.state_dict(), optimizer_state_tensors(optimizer.optimizer,
                        param_names), meta, run.keep)
    accelerator.wait_for_everyone()
