"""MoCo v3 self-supervised pretraining of a ResNet or a ViT, optionally with BatchFormer.

One handwritten loop; Accelerate only launches processes, places tensors and handles mixed
precision. The same command runs on a CPU, one GPU, several GPUs or several nodes:

    accelerate launch --config_file accelerate_configs/cpu.yaml train.py --data DIR ...
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train.py --data DIR --add_bf 1
    torchrun --nproc_per_node 2 train.py --data DIR ...      # two CPU processes (gloo)

DIR is an ImageFolder (train/<class>/<image>), any folder of images (searched recursively, no
labels needed) or, with --train-list FILE, the root of the paths listed in FILE; see docs/data.md.
The image index is built once and saved in --output-dir. Defaults are the ResNet-50, 100-epoch,
batch-4096 recipe of MoCo v3; with -a vit_* the flags not given take
MoCo v3's ViT recipe (AdamW, lr 1.5e-4, wd 0.1, T 0.2, crop-min 0.08, 300 epochs, 40 warm-up),
and the start-up summary lists them. --add_bf 1 adds BatchFormer as released.
Outputs in --output-dir: checkpoints/step-*/ (safetensors + meta.json), backbone.safetensors
(torchvision key names, what probe.py loads), metrics.jsonl, config.json, image-index.safetensors
(the training images' list, read again on resume).
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from bfcl.augment import BatchedMultiViews, BatchedTwoViews, local_crop_size
from bfcl.batchformer import dropout_seed
from bfcl.checkpoint import (list_checkpoints, load_model_state, load_optimizer_state, optimizer_state_tensors,
                             resume_checkpoint, save_checkpoint)
from bfcl.compiling import CompileOrEager
from bfcl.errors import BfclError, ConfigError, TrainingError, one_line
from bfcl.images import DEFAULT_MAX_PIXELS
from bfcl.index import find_layout, training_index
from bfcl.export import backbone_state, export_backbone
from bfcl.init_from import load_into_both_encoders, read_init_weights  # --init-from
from bfcl.knn import KnnMonitor, check_knn_source, knn_monitor, knn_source
from bfcl.timm_export import TIMM_FILE, export_timm  # --export-format timm
from bfcl.tracking import REPORT_TO, start_trackers, tracker_log, tracker_objects, trackers_for
from bfcl.loop import StopCheck, Window, batches, global_context
from bfcl.loss import BF_LOSSES, bf_loss_from_add_bf, moco_loss, multiview_loss
from bfcl.model import (ARCHS, BF_VIEWS, PER_VIEW, STEMS, MoCo, is_vit, layer4_input_side, training_memory,
                        uses_channels_last)
from bfcl.precision import CHOICES as PRECISIONS
from bfcl.auto_precision import decide_precision
from bfcl.precision import PROBE_ENV
from bfcl.optim import OPTIMIZERS, build_optimizer, param_groups
from bfcl.paths import printable_text
from bfcl.progress import ProgressLog
from bfcl.recipes import RECIPES, apply_recipe
from bfcl.runs import (EXIT_PREEMPTED, MAX_EPOCHS, MAX_WIDTH, StopSignal, available_memory, check_finite_weights,
                       check_free_disk, check_memory, check_output_dir, check_ranges, code_version, format_summary,
                       launch_state, make_accelerator, mark_stopped, run_lock, scaled_warmup)
from bfcl.schedules import learning_rate, momentum
from bfcl.views import PretrainDataset, pretrain_views

# Options that may change between a run and its resume; any other difference is refused.
RESUMABLE_CHANGES = {"workers", "output_dir", "resume", "force_resume", "log_every", "save_every", "keep",
                     "knn_every", "knn_samples", "knn_data", "max_steps", "compile", "max_bad_image_share",
                     "max_nonfinite_steps", "max_image_pixels", "recipe", "export_format", "report_to"}

# Options that checkpoints of bfcl 0.1.0 do not record, with the value those runs had.
ADDED_SINCE_0_1 = {"patch_size": 16, "stop_grad_conv1": True, "max_image_pixels": DEFAULT_MAX_PIXELS,
                   "bf_context": "local", "bf_start_epoch": 0.0, "recipe": None, "init_from": None,
                   # multi-crop (issue 37): checkpoints before it had MoCo v3's two views
                   "global_views": 2, "local_crops": 0, "local_crop_size": None, "local_crop_scale": [0.05, 0.4],
                   "bf_views": PER_VIEW}

# MoCo v3's recipes. Flags left unset (None) take the value of the backbone's family; the
# start-up summary names the ViT values that replaced the ResNet ones.
RESNET_RECIPE = {"optimizer": "lars", "lr": 0.6, "wd": 1e-6, "moco_t": 1.0, "crop_min": 0.2, "epochs": 100.0,
                 "warmup_epochs": 10.0}
VIT_RECIPE = {"optimizer": "adamw", "lr": 1.5e-4, "wd": 0.1, "moco_t": 0.2, "crop_min": 0.08, "epochs": 300.0,
              "warmup_epochs": 40.0}

INF = None
# Every numeric flag's domain: (low, high, low inclusive, high inclusive); checked before any work.
FLAG_RANGES = {
    "workers": (0, 256, True, True), "image_size": (8, 4096, True, True), "crop_min": (0, 1, False, True),
    "patch_size": (1, 4096, True, True), "max_image_pixels": (1, INF, True, True),
    "moco_dim": (1, MAX_WIDTH, True, True), "moco_mlp_dim": (1, MAX_WIDTH, True, True), "moco_t": (0, INF, False, True),
    "moco_m": (0, 1, True, True), "add_bf": (0, INF, True, True), "bf_lr_scale": (0, INF, True, True),
    "bf_start_epoch": (0, MAX_EPOCHS, True, True),
    "batch_size": (1, INF, True, True), "lr": (0, INF, False, True), "wd": (0, INF, True, True),
    "epochs": (0, MAX_EPOCHS, False, True), "warmup_epochs": (0, MAX_EPOCHS, True, True),
    "seed": (0, 2**31 - 1, True, True),
    "save_every": (1, INF, True, True), "keep": (0, INF, True, True), "log_every": (1, INF, True, True),
    "max_steps": (0, INF, True, True), "max_nonfinite_steps": (0, INF, True, True),
    "max_bad_image_share": (0, 1, True, True), "knn_every": (0, INF, True, True),
    "knn_samples": (1, INF, True, True),
    "global_views": (2, 64, True, True), "local_crops": (0, 64, True, True), "local_crop_size": (1, 4096, True, True),
    "local_crop_scale": (0, 1, False, True),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default after its help."""


def parse_args(argv=None) -> argparse.Namespace:
    """The flags as typed, defaults filled; --recipe not applied (parse_with_recipe does that)."""
    return build_parser().parse_args(argv)


def parse_with_recipe(argv=None) -> tuple[argparse.Namespace, dict[str, str | None]]:
    """The flags with --recipe's values under those typed explicitly; and the summary's notes on what the
    recipe set and what was overridden (bfcl/recipes.py, docs/recipes.md)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.recipe is None:
        return args, {}
    unset = object()  # parsed into a namespace argparse does not fill with defaults: only what was typed stays
    typed = p.parse_args(argv, namespace=argparse.Namespace(**{dest: unset for dest in vars(args)}))
    values, notes = apply_recipe(args.recipe, {k: v for k, v in vars(typed).items() if v is not unset})
    return argparse.Namespace(**{**vars(args), **values}), notes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="a named set of the flags below (docs/recipes.md: small-images, ...); flags typed "
                        "explicitly override it, and the start-up summary lists what it set")
    a = p.add_argument_group("data")
    a.add_argument("--data", required=True,
                   help="the images: an ImageFolder (DIR/train/<class>/..., labels used by the kNN monitor only), "
                        "any folder of images (searched recursively; hidden files and DIR/val left out), or the "
                        "root of the paths in --train-list")
    a.add_argument("--train-list", default=None,
                   help="file with one image path a line, relative to --data: train on exactly these, in this order")
    a.add_argument("--workers", type=int, default=8, help="data-loading processes per training process")
    a.add_argument("--image-size", type=int, default=224, help="side of the random crops")
    a.add_argument("--crop-min", type=float, default=None,
                   help="smallest crop area share (default: 0.2 for ResNets, 0.08 for ViTs, as MoCo v3)")
    a.add_argument("--blur", action=argparse.BooleanOptionalAction, default=True,
                   help="Gaussian blur in the views (--no-blur suits 32 px images)")
    a.add_argument("--augment", default="pil", choices=("pil", "batched"),
                   help="'pil': each loader worker makes both views per image (PIL); 'batched': workers only decode, "
                        "squash to a fixed size and draw the parameters, and the views of the whole batch are made "
                        "on the training device (bfcl/augment.py), for when the loader is the bottleneck")
    a.add_argument("--global-views", type=int, default=2,
                   help="views of each image at --image-size, recipes A, B, A, B, ... (2: MoCo v3's pair); every "
                        "view's query meets every other view's key (docs/multicrop.md); needs --augment batched "
                        "above 2")
    a.add_argument("--local-crops", type=int, default=0,
                   help="extra small views of each image (DINO's multi-crop), through the base side only and "
                        "contrasted with the global views' keys (docs/multicrop.md); needs --augment batched")
    a.add_argument("--local-crop-size", type=int, default=None,
                   help="side of the local crops (default with --local-crops: DINO's 96/224 of --image-size, "
                        "rounded, for a ViT to whole patches: 14 at 32 px (ViT/4: 12, ViT/8: 16), 27 at 64 "
                        "(ViT/8: 24), 96 at 224)")
    a.add_argument("--local-crop-scale", type=float, nargs=2, default=[0.05, 0.4], metavar=("MIN", "MAX"),
                   help="area share range of the local crops (DINO's)")
    a.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels are treated as unreadable (decompression-bomb guard); raise it for "
                        "huge images")
    a = p.add_argument_group("model")
    a.add_argument("-a", "--arch", default="resnet50", choices=ARCHS, help="backbone")
    a.add_argument("--stem", default="imagenet", choices=STEMS,
                   help="ResNets: 'small' is a 3x3 conv without max-pool, for 32-96 px images")
    a.add_argument("--patch-size", type=int, default=16, help="ViTs: patch side (e.g. 4 for 32 px images)")
    a.add_argument("--stop-grad-conv1", action=argparse.BooleanOptionalAction, default=True,
                   help="ViTs: keep the patch projection at its random init (MoCo v3's trick for stability)")
    a.add_argument("--init-from", default=None, metavar="WEIGHTS",
                   help="start both encoders' backbone from WEIGHTS (anything probe.py --pretrained reads, or "
                        "'torchvision' for torchvision's ImageNet weights of --arch); projector, predictor, "
                        "BatchFormer, optimizer and schedules start fresh; a resume continues the run's own "
                        "checkpoint (bfcl/init_from.py)")
    a.add_argument("--moco-dim", type=int, default=256, help="output width of projector and predictor")
    a.add_argument("--moco-mlp-dim", type=int, default=4096, help="hidden width of projector and predictor")
    a.add_argument("--moco-t", type=float, default=None,
                   help="softmax temperature T, the loss is scaled by 2T (default: 1.0 ResNets, 0.2 ViTs)")
    a.add_argument("--moco-m", type=float, default=0.99, help="base momentum of the momentum encoder")
    a.add_argument("--moco-m-cos", action=argparse.BooleanOptionalAction, default=True,
                   help="raise the momentum to 1 on a half-cosine")
    a = p.add_argument_group("BatchFormer")
    a.add_argument("--add_bf", "--add-bf", type=int, default=0,
                   help="the seed's switch: 0 off; 1 or 34 pairs-sum loss; 36 pairs-mean; other positive values joint")
    a.add_argument("--bf-loss", choices=BF_LOSSES, default=None,
                   help="BatchFormer loss by name (turns BatchFormer on; overrides --add_bf's variant)")
    a.add_argument("--bf-trainable", action="store_true",
                   help="train BatchFormer's weights; by default they stay at their random init, as in the released "
                        "runs")
    a.add_argument("--bf-lr-scale", type=float, default=0.1, help="lr multiplier for a trainable BatchFormer")
    a.add_argument("--bf-context", choices=("local", "global"), default="local",
                   help="what BatchFormer attends over: 'local' the batch of each process (as released, so the "
                        "process count changes it), 'global' the whole global batch, gathered with gradients")
    a.add_argument("--bf-views", choices=BF_VIEWS, default=PER_VIEW,
                   help="with several views: 'per-view' one BatchFormer sequence per view (as released for MoCo "
                        "v3's two), 'joint' one sequence of all views' rows (docs/multicrop.md#batchformer)")
    a.add_argument("--bf-start-epoch", type=float, default=0.0,
                   help="BatchFormer (and its loss) on from this epoch; plain MoCo v3 before it")
    a = p.add_argument_group("optimisation")
    a.add_argument("-b", "--batch-size", type=int, default=4096, help="GLOBAL batch over all processes")
    a.add_argument("--lr", type=float, default=None,
                   help="base lr; the lr used is lr x batch-size / 256 (default: 0.6 ResNets, 1.5e-4 ViTs)")
    a.add_argument("--wd", type=float, default=None, help="weight decay (default: 1e-6 ResNets, 0.1 ViTs)")
    a.add_argument("--optimizer", default=None, choices=OPTIMIZERS, help="default: lars for ResNets, adamw for ViTs")
    a.add_argument("--epochs", type=float, default=None,
                   help="length of the schedules, fractions allowed (default: 100 ResNets, 300 ViTs)")
    a.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear lr warmup from 0 (default: 10 ResNets, 40 ViTs)")
    a = p.add_argument_group("run")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--output-dir", default="runs/pretrain")
    a.add_argument("--resume", default="auto",
                   help="'auto': newest valid checkpoint in --output-dir, if any; 'none'; or a checkpoint directory")
    a.add_argument("--force-resume", action="store_true",
                   help="resume even if settings that matter differ from the checkpoint's")
    a.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at each epoch end)")
    a.add_argument("--keep", type=int, default=3, help="checkpoints kept in --output-dir/checkpoints (0: keep all)")
    a.add_argument("--log-every", type=int, default=10,
                   help="log, and check for stop signals and non-finite losses, every N steps")
    a.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many steps in total (0: train all epochs); the schedules still span --epochs")
    a.add_argument("--max-nonfinite-steps", type=int, default=0,
                   help="non-finite losses tolerated (fp16 skips those steps) before stopping")
    a.add_argument("--max-bad-image-share", type=float, default=0.01,
                   help="stop if more than this share of image reads fail")
    a.add_argument("--compile", action="store_true", help="torch.compile the model")
    a.add_argument("--report-to", choices=REPORT_TO, default="none",
                   help="also log metrics.jsonl's scalars and the config to an experiment tracker, through "
                        "Accelerate ('all': every installed one); TensorBoard writes <output-dir>/tensorboard; a "
                        "resume continues the tracker's run (bfcl/tracking.py)")
    a.add_argument("--export-format", choices=("torchvision", "timm"), default="torchvision",
                   help="ViTs: 'timm' also writes backbone-timm.safetensors (timm's key names; its metadata names "
                        "the timm model) beside backbone.safetensors, which probe.py and resumes read")
    a.add_argument("--mixed-precision", choices=PRECISIONS, default=None,
                   help="overrides accelerate launch's --mixed_precision / config file (default: theirs; auto "
                   "where the launcher names none, as torchrun and plain python). 'auto': bf16 on GPUs that "
                   "support it (else fp16); on CPUs that compute bf16 natively (AVX512-BF16, AMX) the faster of "
                   "bf16 and fp32, timed on this run's model at start-up and cached (bfcl/precision.py; "
                   f"{PROBE_ENV}=0 skips it); fp32 on other CPUs, where bf16 is emulated. A resume keeps the "
                   "precision its checkpoint trained in")
    a.add_argument("--knn-every", type=int, default=0,
                   help="kNN top-1 on a held-out subset every N steps (0: off); labels from DIR/val/<class>/ (with "
                        "DIR/train as the bank for an ImageFolder, else two halves of DIR/val) or from --knn-data")
    a.add_argument("--knn-data", default=None,
                   help="an ImageFolder with train/ (the kNN bank) and val/ (the queries) for --knn-every, when "
                        "--data has no labels")
    a.add_argument("--knn-samples", type=int, default=2000, help="train images in the kNN bank and val images queried")
    return p


def with_recipe(args: argparse.Namespace) -> tuple[argparse.Namespace, dict[str, str | None]]:
    """The config: args with every unset recipe flag filled from the backbone family's recipe
    (a new Namespace; args is not mutated); and the start-up summary's notes on what was filled:
    the ViT values that differ from ResNet's, and a warm-up scaled to a shortened schedule.

    A shortened schedule (--epochs below the recipe's, --warmup-epochs not given) keeps the
    recipe's warm-up share (10 % for ResNets, 13.3 % for ViTs), as probe.py's fine-tuning does."""
    recipe = VIT_RECIPE if is_vit(args.arch) else RESNET_RECIPE
    filled = {k: v for k, v in recipe.items() if getattr(args, k) is None}
    warmup = scaled_warmup(recipe["epochs"], recipe["warmup_epochs"], args.epochs, args.warmup_epochs)
    scaled = warmup is not None
    if scaled:
        filled["warmup_epochs"] = warmup
    switched = [f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                for k, v in filled.items() if v != RESNET_RECIPE[k] and not (scaled and k == "warmup_epochs")]
    notes = {"ViT recipe defaults": ", ".join(switched) or None,
             "warm-up": f"{filled['warmup_epochs']:g} epochs: the recipe's share of the shortened --epochs "
                        f"{args.epochs:g}" if scaled else None}
    config = argparse.Namespace(**{**vars(args), **filled})
    if config.local_crops and config.local_crop_size is None:  # DINO's 96 px of 224, scaled (bfcl/augment.py)
        config.local_crop_size = local_crop_size(config.image_size, config.patch_size if is_vit(config.arch) else None)
    return config, notes


def validate(config, num_processes: int, bf_loss: str | None, knn: tuple[str, str | None]) -> None:
    """Refuse (ConfigError, DataError), before any work and before anything is written, settings
    that would fail later or silently misbehave."""
    check_ranges(vars(config), FLAG_RANGES)
    if config.batch_size % num_processes:
        raise ConfigError(f"--batch-size {config.batch_size} is not divisible by the {num_processes} processes; "
                          f"use a multiple of {num_processes}")
    if bf_loss is not None and config.bf_context == "local" and config.batch_size // num_processes < 2:
        raise ConfigError(f"BatchFormer needs at least 2 samples per process, got "
                          f"{config.batch_size // num_processes}; raise --batch-size")
    if config.warmup_epochs >= config.epochs:
        raise ConfigError(f"--warmup-epochs {config.warmup_epochs:g} must be shorter than --epochs {config.epochs:g}")
    if bf_loss is not None and config.bf_start_epoch >= config.epochs:
        raise ConfigError(f"--bf-start-epoch {config.bf_start_epoch:g} must be before the end, "
                          f"--epochs {config.epochs:g}")
    if is_vit(config.arch) and config.image_size % config.patch_size:
        raise ConfigError(f"--image-size {config.image_size} is not a multiple of --patch-size {config.patch_size}; "
                          "change one of them")
    validate_views(config)
    find_layout(config.data, config.train_list)
    check_knn_source(knn[0], config.data, config.knn_data)
    if config.export_format == "timm" and not is_vit(config.arch):
        raise ConfigError(f"--export-format timm is for ViTs; a {config.arch} export loads into timm as it is "
                          "(same key names)")
    if config.resume not in ("auto", "none") and not os.path.isdir(config.resume):
        raise ConfigError(f"--resume {config.resume} is not a checkpoint folder; pass checkpoints/step-* of a run, "
                          "auto or none")
    check_output_dir(config.output_dir, config.data)


def multicrop(config) -> bool:
    """Whether a step takes the multi-crop path (MoCo.forward_views, multiview_loss) rather than
    MoCo v3's two views exactly as before issue 37."""
    return config.global_views > 2 or config.local_crops > 0 or config.bf_views != PER_VIEW


def validate_views(config) -> None:
    """The multi-crop flags (docs/multicrop.md), refused in one line each."""
    low, high = config.local_crop_scale
    if low >= high:
        raise ConfigError(f"--local-crop-scale {low:g} {high:g}: the first (smallest area share) must be below "
                          "the second")
    if (config.global_views > 2 or config.local_crops) and config.augment != "batched":
        raise ConfigError("--global-views above 2 and --local-crops are made by the batched augmentation; add "
                          "--augment batched")
    if not config.local_crops:
        return
    size = config.local_crop_size
    if size >= config.image_size:
        raise ConfigError(f"--local-crop-size {size} is not smaller than --image-size {config.image_size}; local "
                          "crops are the small views: pass a smaller size")
    if is_vit(config.arch) and size % config.patch_size:
        raise ConfigError(f"--local-crop-size {size} is not a multiple of --patch-size {config.patch_size}; "
                          f"use {max(1, round(size / config.patch_size)) * config.patch_size}")


def check_local_crop_precision(config, precision: str, device_type: str) -> None:
    """Local crops that give a ResNet's layer4 a 1 x 1 map (14 px with the ImageNet stem, DINO's
    size at 32 px) in bf16 on a CPU: refused, since PyTorch's CPU bf16 convolution returns NaN weight
    gradients there in about half the steps (docs/recipes.md#small-images, docs/multicrop.md#views)."""
    if not config.local_crops or is_vit(config.arch) or precision != "bf16" or device_type != "cpu":
        return
    if layer4_input_side(config.local_crop_size, config.stem) < 2:
        smallest = next(s for s in range(config.local_crop_size, 4096) if layer4_input_side(s, config.stem) >= 2)
        raise ConfigError(f"--local-crop-size {config.local_crop_size} gives {config.arch}'s layer4 a 1x1 map, where "
                          "CPU bf16 convolutions return NaN gradients; use --local-crop-size "
                          f"{smallest} or more, --stem small or --mixed-precision no")


def views_note(config, bf_loss: str | None) -> str:
    """The start-up summary's line on the views of each image."""
    note = f"{config.global_views} global at {config.image_size} px"
    if config.local_crops:
        low, high = config.local_crop_scale
        note += f" + {config.local_crops} local at {config.local_crop_size} px (area {low:g}-{high:g})"
    return note + (f"; BatchFormer {config.bf_views}" if bf_loss else "")


@dataclass(frozen=True)
class Plan:
    """Quantities derived once from the config and the launch; printed at start, never mutated."""

    processes: int
    local_batch: int
    steps_per_epoch: int
    total_steps: int  # the length of the lr and momentum schedules
    warmup_steps: int
    last_step: int  # where this invocation stops: total_steps, or --max-steps
    peak_lr: float  # --lr x global batch / 256
    bf_loss: str | None  # None: BatchFormer off
    bf_start_step: int  # BatchFormer on from this step (--bf-start-epoch)
    knn_source: str  # where the kNN monitor's labels come from (knn_source), 'off' for none
    knn_every: int  # --knn-every, or 0 where the monitor has no labelled images (no sync for it)
    images: dict | None = None  # ImageIndex.identity(): recorded in every checkpoint, checked on resume


def make_plan(config, num_images: int, processes: int, bf_loss: str | None, knn_source: str,
              images: dict | None = None) -> Plan:
    steps_per_epoch = num_images // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"{num_images} training images do not fill one global batch of {config.batch_size}; "
                          "lower --batch-size")
    total_steps = max(1, round(steps_per_epoch * config.epochs))
    return Plan(processes=processes, local_batch=config.batch_size // processes, steps_per_epoch=steps_per_epoch,
                total_steps=total_steps, warmup_steps=round(steps_per_epoch * config.warmup_epochs),
                last_step=min(total_steps, config.max_steps) if config.max_steps else total_steps,
                peak_lr=config.lr * config.batch_size / 256, bf_loss=bf_loss,
                bf_start_step=round(steps_per_epoch * config.bf_start_epoch), knn_source=knn_source,
                knn_every=config.knn_every if knn_source != "off" else 0, images=images)


def build_model_and_optimizer(config, plan: Plan, device: torch.device):
    """MoCo model and optimizer, plus the parameter names in optimizer order (for checkpoints).
    Called with the same seed on every process, so all start identical, BatchFormer included."""
    set_seed(config.seed)
    model = MoCo(config.arch, config.stem, config.moco_dim, config.moco_mlp_dim, batchformer=plan.bf_loss is not None,
                 bf_trainable=config.bf_trainable, image_size=config.image_size, patch_size=config.patch_size,
                 stop_grad_conv1=config.stop_grad_conv1)
    if plan.processes > 1 and device.type == "cuda":  # gloo (CPU) rejects SyncBatchNorm
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if uses_channels_last(config.arch):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    groups, param_names = param_groups(model, bf_lr_scale=config.bf_lr_scale)
    return model, build_optimizer(config.optimizer, groups, config.wd), param_names


def main(argv=None) -> int:
    stop = StopSignal()  # first: a signal during start-up is honoured at the first step, not fatal
    try:
        args, recipe_notes = parse_with_recipe(argv)
        return pretrain(args, stop, recipe_notes)
    except BfclError as e:  # one line naming the problem and the fix, exit status 1 (one_line: also when a
        sys.exit(f"error: {one_line(e)}")  # loader worker raised it, with its traceback as the message)


def pretrain(args: argparse.Namespace, stop: StopSignal, recipe_notes: dict[str, str | None]) -> int:
    config, notes = with_recipe(args)
    notes = {**recipe_notes, **notes}
    # A trainable BatchFormer switched on late has no gradient before: DDP must be told.
    unused = [DistributedDataParallelKwargs(find_unused_parameters=True)] \
        if config.bf_trainable and config.bf_start_epoch > 0 else []
    trackers = tracker_objects(trackers_for(config.report_to), config.output_dir)  # a missing package: refused now
    # The processes first (the Accelerator needs the precision, which auto may measure on valid settings).
    state = launch_state()
    bf_loss = config.bf_loss or bf_loss_from_add_bf(config.add_bf)
    knn = knn_source(config.data, config.train_list, config.knn_every, config.knn_data)
    validate(config, state.num_processes, bf_loss, knn)
    # Before anything is allocated: the MLP widths alone can exhaust the memory.
    needed = training_memory(config.arch, config.stem, config.moco_dim, config.moco_mlp_dim,
                             batchformer=bool(bf_loss), image_size=config.image_size, patch_size=config.patch_size)[1]
    check_memory(needed, available_memory(state.device),
                 f"--moco-mlp-dim {config.moco_mlp_dim} with --moco-dim {config.moco_dim}: the model")
    decide = lambda requested, device_type, chosen, why: decide_precision(  # noqa: E731
        config, bf_loss, state.num_processes, requested, device_type, chosen, why)
    accelerator, precision_reason = make_accelerator(config.mixed_precision, unused, log_with=trackers, decide=decide)
    check_local_crop_precision(config, accelerator.mixed_precision, accelerator.device.type)
    # One output folder, one run: the main process holds <output-dir>/.lock until the end.
    with run_lock(config.output_dir, accelerator) as lock:
        if lock is not None and lock.message:
            accelerator.print(printable_text(lock.message))
        return build_and_train(config, notes, accelerator, bf_loss, knn, precision_reason, stop)


@dataclass
class TrainingRun:
    """What the loop and its sync points share, built once before the first step."""

    config: argparse.Namespace
    plan: Plan
    accelerator: Accelerator
    moco: MoCo  # the unwrapped model: momentum update, checkpoints, kNN
    optimizer: object  # Accelerate's wrapper
    param_names: list[str]  # in optimizer order, for checkpoints
    log: ProgressLog | None  # the main process's
    knn: KnnMonitor | None  # the main process's
    stop: StopSignal
    window: Window  # device-side sums since the last sync point
    check: StopCheck
    totals: dict  # nonfinite, bad, images: since the start of this invocation


def build_and_train(config, notes: dict[str, str | None], accelerator, bf_loss: str | None,
                    knn: tuple[str, str | None], precision_reason: str, stop: StopSignal) -> int:
    """Build everything, print the summary, resume if asked, train."""
    if config.augment != "batched":
        augment = None
    elif multicrop(config):
        augment = BatchedMultiViews(config.image_size, config.crop_min, config.blur, config.global_views,
                                    config.local_crops, config.local_crop_size, config.local_crop_scale,
                                    compile=config.compile)
    else:
        augment = BatchedTwoViews(config.image_size, config.crop_min, config.blur, compile=config.compile)
    views = augment.dataset_transforms() if augment else pretrain_views(config.image_size, config.crop_min, config.blur)
    # Only a fresh start (or --force-resume) may rebuild a saved index that no longer matches the data:
    # a resume reading other images in another order would not be exact.
    resuming = config.resume != "none" and (config.resume != "auto" or bool(list_checkpoints(config.output_dir)))
    index, data_note = training_index(config.data, config.train_list, config.output_dir, accelerator,
                                      rebuild_ok=config.force_resume or not resuming)
    if index.layout == "folder" and os.path.isdir(os.path.join(config.data, "val")):
        data_note += f"; {os.path.join(config.data, 'val')} left out (the kNN monitor's labelled images)"
    dataset = PretrainDataset(index, views, max_pixels=config.max_image_pixels)
    plan = make_plan(config, len(dataset), accelerator.num_processes, bf_loss, knn[0], index.identity())
    model, optimizer, param_names = build_model_and_optimizer(config, plan, accelerator.device)
    check_free_disk(config.output_dir, model.state_dict())

    path, resumed = resume_checkpoint(config.output_dir, config.resume, vars(config), RESUMABLE_CHANGES,
                                      config.force_resume, plan.total_steps, ADDED_SINCE_0_1, plan.images,
                                      precision=accelerator.mixed_precision)
    start_step = 0
    if resumed is not None:
        load_model_state(model, resumed["model"], path)
        load_optimizer_state(optimizer, param_names, resumed["optimizer"])
        start_step = resumed["meta"]["step"]
    init = None  # --init-from: only a fresh start takes the weights; a resume has its own
    if resumed is None and config.init_from:
        with accelerator.main_process_first():  # one download of torchvision's weights
            init = read_init_weights(config.init_from, config.arch, config.stem, config.patch_size, config.image_size)
        load_into_both_encoders(model, init.state)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None and accelerator.scaler is not None and resumed["meta"].get("scaler"):
        accelerator.scaler.load_state_dict(resumed["meta"]["scaler"])

    moco = accelerator.unwrap_model(model, keep_torch_compile=False)
    if config.compile:  # after DDP's wrapping, as Accelerate compiles; eager if compiling fails
        model = CompileOrEager(model, "the model", accelerator.print)
    summary = {
        "data": f"{index.describe()}; index {data_note}", "kNN monitor": knn[1],
        "backbone": config.arch + (f", patch {config.patch_size}" if is_vit(config.arch) else f", {config.stem} stem"),
        **notes,
        "processes": plan.processes, "device": str(accelerator.device),
        "precision": f"{accelerator.mixed_precision} ({precision_reason})",
        "batch per process": plan.local_batch, "global batch": config.batch_size,
        "views per image": views_note(config, bf_loss) if multicrop(config) else None,
        "optimizer": config.optimizer, "lr (scaled)": plan.peak_lr,
        "steps per epoch": plan.steps_per_epoch, "total steps": plan.total_steps, "warmup steps": plan.warmup_steps,
        "trainable params": sum(p.numel() for p in moco.parameters() if p.requires_grad),
        "frozen params": sum(p.numel() for p in moco.parameters() if not p.requires_grad), "seed": config.seed,
        "BatchFormer": "off" if bf_loss is None else f"{bf_loss} loss, "
        f"{'trainable' if config.bf_trainable else 'frozen at init'}, context "
        + (f"{plan.local_batch} samples per process" if config.bf_context == "local"
           else f"the global batch of {config.batch_size}")
        + (f", on from step {plan.bf_start_step}" if plan.bf_start_step else ""),
        "resumed from": f"{path} (step {start_step})" if path else "scratch",
        "initialised from": init.describe() if init else
        f"{config.init_from} at the start of this run (its checkpoint resumed)" if config.init_from else None,
    }
    summary = {k: v for k, v in summary.items() if v is not None}
    accelerator.print(format_summary(summary))
    if accelerator.is_main_process:
        with open(os.path.join(config.output_dir, "config.json"), "w") as f:
            json.dump({"config": vars(config), "derived": summary, "precision": accelerator.mixed_precision}, f,
                      indent=1)
    start_trackers(accelerator, config.output_dir, vars(config))
    main_process, metrics_path = accelerator.is_main_process, os.path.join(config.output_dir, "metrics.jsonl")
    run = TrainingRun(config, plan, accelerator, moco, optimizer, param_names,
                      log=ProgressLog(metrics_path, plan.last_step, start_step,
                                      tracker=tracker_log(accelerator, metrics_path)) if main_process else None,
                      knn=knn_monitor(plan.knn_source, config.data, config.knn_data, dataset.folder, config.image_size,
                                      config.knn_samples, config.seed, min(config.workers, 2), config.max_image_pixels)
                      if main_process else None,
                      stop=stop, window=Window(accelerator.device), check=StopCheck(start_step),
                      totals={"nonfinite": 0, "bad": 0, "images": 0})
    return train(run, model, dataset, augment, start_step)


def save(run: TrainingRun, step: int, lr: float) -> None:
    """Training checkpoint, then the backbone export from the same state. The main process
    writes; the others wait so that no process runs ahead of a half-written checkpoint.
    Weights with a NaN or an infinity are never written: TrainingError, the last checkpoint kept."""
    config, plan, accelerator = run.config, run.plan, run.accelerator
    state = run.moco.state_dict()
    check_finite_weights(state, accelerator, step, lr, config.output_dir)
    if accelerator.is_main_process:
        meta = {"version": code_version(), "config": vars(config), "precision": accelerator.mixed_precision,
                "epoch": step / plan.steps_per_epoch, "steps_per_epoch": plan.steps_per_epoch, "images": plan.images,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": "derived from (seed, step, process index): nothing to restore"}
        save_checkpoint(config.output_dir, step, state,
                        optimizer_state_tensors(run.optimizer.optimizer, run.param_names), meta, config.keep)
        export(config, state, step)
    accelerator.wait_for_everyone()


def export(config, model_state: dict, step: int) -> str:
    path = os.path.join(config.output_dir, "backbone.safetensors")
    export_backbone(model_state, path, arch=config.arch, stem=config.stem, patch_size=config.patch_size,
                    image_size=config.image_size, step=step)
    if config.export_format == "timm":
        export_timm(backbone_state(model_state), os.path.join(config.output_dir, TIMM_FILE), arch=config.arch,
                    patch_size=config.patch_size, image_size=config.image_size, step=step)
    return path


def train(run: TrainingRun, model, dataset, augment, start_step: int) -> int:
    """The pretraining loop. Per step: set lr and m -> forward -> gather keys -> loss ->
    backward -> optimizer step -> momentum update; then, at sync points only, read the
    device-side sums, log, check for trouble and checkpoint (sync_point)."""
    config, plan, accelerator, optimizer, moco = run.config, run.plan, run.accelerator, run.optimizer, run.moco
    device, rank = accelerator.device, accelerator.process_index
    memory_format = torch.channels_last if uses_channels_last(config.arch) else torch.contiguous_format
    if run.knn is not None and start_step == 0:  # the curve starts at the random init
        run.log.log(0, {"epoch": 0.0, "knn_top1": run.knn.top1(moco.base_encoder.backbone, device)})

    steps = batches(dataset, config.batch_size, rank, plan.processes, config.seed, start_step, plan.last_step,
                    config.workers, pin_memory=device.type == "cuda")
    context = global_context(accelerator) if config.bf_context == "global" else None
    several_views = multicrop(config)
    for step, (x1, x2, _, failed) in steps:
        run.window.data_arrived()
        bf_on = plan.bf_loss is not None and step >= plan.bf_start_step
        lr = learning_rate(step, plan.total_steps, plan.warmup_steps, plan.peak_lr)
        m = momentum(step, plan.total_steps, config.moco_m, config.moco_m_cos)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        torch.manual_seed(dropout_seed(config.seed, step, rank))  # BatchFormer's dropout
        if several_views:  # --global-views, --local-crops, --bf-views joint (docs/multicrop.md)
            loss = multicrop_loss(run, model, augment, x1, x2, bf_on, context, memory_format)
        else:
            if augment is not None:  # x1: uint8 images at the source size, x2: each image's view parameters
                x1, x2 = augment(x1.to(device, non_blocking=True), x2)
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)

            q1, q2, k1, k2 = model(x1, x2, batchformer=bf_on, context=context)
            loss = moco_loss(q1, q2, accelerator.gather(k1), accelerator.gather(k2), rank, config.moco_t,
                             plan.bf_loss if bf_on else None)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        moco.update_momentum_encoder(m)

        run.window.add(loss, failed, run.stop.requested)
        if sync_point(run, step + 1, lr, m) == "stop":
            return EXIT_PREEMPTED
    # The last step's sync point saved and exported; only a resume with nothing left to train (a
    # run killed between its last checkpoint and the export) must write the export here.
    return finish(run, max(start_step, plan.last_step), export_again=start_step >= plan.last_step)


def multicrop_loss(run: TrainingRun, model, augment, x1, x2, bf_on: bool, context, memory_format) -> torch.Tensor:
    """One step's forward and loss with several views: the global views' and local views' queries
    against the gathered keys of the global views (MoCo.forward_views, multiview_loss)."""
    config, accelerator = run.config, run.accelerator
    device = accelerator.device
    if augment is not None:  # x1: uint8 images at the source size, x2: each image's view parameters
        views, local = augment(x1.to(device, non_blocking=True), x2)
    else:  # --bf-views joint with the loader's two views
        views, local = [x1, x2], None
    views = [v.to(device, non_blocking=True, memory_format=memory_format) for v in views]
    if local is not None:
        local = local.to(device, non_blocking=True, memory_format=memory_format)
    q_global, q_local, k_global = model(views[0], views[1], batchformer=bf_on, context=context,
                                        more_views=tuple(views[2:]), local_views=local, bf_views=config.bf_views)
    return multiview_loss(q_global, q_local, [accelerator.gather(k) for k in k_global], accelerator.process_index,
                          config.moco_t, run.plan.bf_loss if bf_on else None)


def sync_point(run: TrainingRun, done: int, lr: float, m: float) -> str | None:
    """After step `done` (counted from 1): at log, save and kNN steps, the only place where the
    host reads values from the device. Checks for trouble, logs, checkpoints; "stop" on a signal.
    Between them, about every 30 s, only the stop flags are read (StopCheck)."""
    config, plan, accelerator, totals, log = run.config, run.plan, run.accelerator, run.totals, run.log
    totals["images"] += config.batch_size
    end_of_epoch = done % plan.steps_per_epoch == 0
    save_now = done % config.save_every == 0 or end_of_epoch or done == plan.last_step
    # the same on every process (only the main one holds the monitor): all of them must reach the sync
    knn_now = plan.knn_every > 0 and (done % plan.knn_every == 0 or done == plan.last_step)
    reduce_sum = lambda t: accelerator.reduce(t, reduction="sum")
    stop_heard = False
    if done % config.log_every and not (save_now or knn_now):
        if not run.check.due(done):
            return None
        stop_heard = run.check.poll(done, run.stop.requested, reduce_sum, plan.processes, accelerator.device)
        if not stop_heard:
            return None
    sums = run.window.read(reduce_sum, plan.processes)
    run.check.synced(done)
    sums["stop"] = sums["stop"] or stop_heard
    totals["nonfinite"] += sums["nonfinite"]
    totals["bad"] += sums["bad"]
    if totals["nonfinite"] > config.max_nonfinite_steps:
        raise TrainingError(f"non-finite loss by step {done} (lr {lr:.4g}, precision {accelerator.mixed_precision}); "
                            f"the last good checkpoint is kept in {config.output_dir}; lower --lr, or use bf16 instead "
                            "of fp16")
    if totals["bad"] > config.max_bad_image_share * totals["images"]:
        raise TrainingError(f"{totals['bad']} of {totals['images']} image reads failed, more than "
                            f"--max-bad-image-share {config.max_bad_image_share}; check the data folder")
    if log is not None:
        metrics = {"epoch": round(done / plan.steps_per_epoch, 3), "loss": sums["loss"], "lr": lr, "m": m,
                   "img_per_s": round(sums["steps"] * config.batch_size / sums["elapsed"], 1),
                   "data_wait": sums["data_wait"], "bad_images": totals["bad"]}
        if knn_now and run.knn is not None:
            metrics["knn_top1"] = run.knn.top1(run.moco.base_encoder.backbone, accelerator.device)
        log.log(done, metrics)
        if end_of_epoch and totals["bad"]:
            log.print(f"epoch {done // plan.steps_per_epoch}: {totals['bad']} unreadable images so far, "
                      "each replaced by the next readable one")
    if save_now or sums["stop"]:
        save(run, done, lr)
    if not sums["stop"]:
        return None
    if log is not None:
        log.print(f"stopped by a signal at step {done}; checkpoint written; run the same command to resume")
        log.close()
        mark_stopped(config.output_dir, done)
    return "stop"


def finish(run: TrainingRun, step: int, export_again: bool) -> int:
    """The final line names the export and its step, which always match the final weights."""
    config, accelerator = run.config, run.accelerator
    if accelerator.is_main_process:
        path = export(config, run.moco.state_dict(), step) if export_again else \
            os.path.join(config.output_dir, "backbone.safetensors")
        run.log.print(f"done: {step} steps; backbone (step {step}) in {path}")
        run.log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
