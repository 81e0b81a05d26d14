"""How good is a pretrained ResNet or ViT? MoCo v3's linear classification protocol, and faster checks.

    accelerate launch probe.py --pretrained runs/pretrain/backbone.safetensors --data DIR
    accelerate launch probe.py --pretrained checkpoint_0099.pth.tar --data DIR --mode knn
    accelerate launch probe.py --random-init -a resnet50 --data DIR --mode all   # the baseline to beat
    accelerate launch probe.py --pretrained runs/pretrain --data DIR --mode finetune -b 256
    accelerate launch probe.py --pretrained runs/pretrain --data PHOTOS --mode embed --neighbours 10 \
        --duplicates 0.95 --output-dir runs/embed   # any folder of images, no labels needed
    torchrun --nproc_per_node 2 probe.py --pretrained ... --data DIR              # two CPU processes (gloo)

DIR holds train/<class>/<image> and val/<class>/<image> with the same class folders (every mode
but embed, which reads whatever train.py reads: an ImageFolder, any nested folder of images, or
--train-list FILE relative to --data).
--pretrained takes a training checkpoint folder (checkpoints/step-*), a run folder or its
backbone.safetensors, an original MoCo v3 / BatchFormer .pth.tar, or a torchvision state dict
(.pth or .safetensors); nothing is unpickled beyond tensors, numbers and strings.

Modes (--mode):
  linear       the protocol (docs/method.md#linear-protocol): frozen backbone in eval mode, linear head
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
  finetune     end to end: the whole backbone and a new head train (docs/method.md#fine-tuning), with SimCLR's
               semi-supervised recipe (pretrained ResNets), torchvision's from-scratch one
               (--random-init ResNets) or DeiT's (ViTs), each field overridable by its flag
               (docs/finetune-recipes.md); exact resume, SIGTERM checkpoint, OUTPUT/finetuned.safetensors.
  embed        one L2-normalised feature row per image of --data (no labels needed; bfcl/embed.py):
               OUTPUT/embeddings.safetensors [N, C] in the index's order, images.txt (row i's path,
               relative to --data), unreadable.txt (they get no row). Split across processes, in
               shards a rerun resumes. --neighbours K adds neighbours.safetensors/.csv (each image's K
               most cosine-similar others), --duplicates T adds duplicates.csv (groups at cosine >= T).
               Read them back with bfcl.embed.load(OUTPUT) (docs/embed.md).

Measured on 2 shared CPU cores, on `make smoke-test`'s data (4 classes, 384 / 128 images of
32 px) with a random-init resnet18/small, the baseline a pretrained backbone must beat:
kNN k200 top-1 21.1, fast-linear top-1 41.4 (chance 25), about 20 s per mode with start-up.

Few labels, in every mode: --labels-per-class N or --label-fraction F train on a class-balanced
subset of train/ drawn from --subset-seed alone (N of each class, or all of a smaller one; F of
each class rounded half up, at least 1), --train-list FILE on the images a list names. The subset
used is written to OUTPUT/train_list.txt, which --train-list reads back (bfcl/subsets.py).

Long tails, in every mode but embed (docs/longtail.md, bfcl/longtail.py): --imbalance R keeps the
CIFAR-LT subset of Cao et al. (LDAM): the i-th class int(n_max x R^(-i/(C-1))) images, n_max the
smallest class (or --labels-per-class N), class order and images from --subset-seed; CIFAR-10 at
R 100 keeps 12,406 images. val/ stays balanced. --loss balanced-softmax (linear, fast-linear,
finetune) trains with Balanced Softmax: the subset's log class prior added to the logits of the
loss, evaluation unchanged. Every classifying result gets a "longtail" block: per-class top-1 with
the class's train and val images, and many / medium / few group top-1 (thirds by class size; the
literature's > 100 / 20-100 / < 20 split beside it).

results.json in --output-dir (only the modes that ran appear under "results"):
  {"pretrained": PATH or "random-init", "source": layout read, "arch": "resnet50",
   "stem": "imagenet", "step": int or null, "image_size": 224, "num_classes": 1000,
   "train_samples": int, "val_samples": int, "processes": int, "config": {parsed options},
   "subset": null, or {"rule": "--label-fraction 0.01", "seed": 0 (null for a list), "size": int,
              "available": int, "per_class": {class: int}, "sha256": of train_list.txt, "list": "train_list.txt",
              and with --imbalance "imbalance": R, "class_order": [classes, head first]},
   "results": {
     "knn":         {"temperature": 0.07, "k20": {"top1": %, "top5": %, "longtail": {...}}, "k200": {...}},
     "fast_linear": {"protocol": false, "epochs": 100, "criterion": "ce", "top1": %, "top5": %, "longtail": {...}},
     "linear":      {"protocol": true, "bn_head": false, "epochs": 90, "batch_size": 1024, "lr": 0.4,
                     "best": {"epoch": int, "top1": %, "top5": %, "loss": float, "lr": float},
                     "last": {same keys}, "history": [{same keys}, one per epoch], "criterion": "ce",
                     "longtail": of the last epoch},
     "finetune":    {"recipe": {...}, "steps": int, "batch_size": int, "lr": float,
                     "best": {"step": int, "top1": %, "top5": %, "loss": float, ...}, "last": {...},
                     "history": [one per evaluation], "model": "OUTPUT/finetuned.safetensors", "criterion": "ce",
                     "longtail": of the final model}}}
  "longtail": {"per_class": {class: {"train": int, "val": int, "top1": %}}, "group_rule": str,
               "groups": {"many" | "medium" | "few": {"classes": int, "train": [min, max], "top1": %}} or null,
               "literature_rule": str, "literature": {same keys, an empty group null}}
--mode embed writes {"pretrained", "source", "arch", "stem", "image_size", "processes", "config", "results":
  {"embed": {"rows": int, "width": int, "unreadable": int, "shards_computed": int, "shards_reused": int,
             "embed_seconds": float, "images_per_s": float, "files": [paths written],
             "neighbours": {"k", "matmul", "seconds", "peak_block_bytes"}, "duplicates": {"threshold", "groups",
             "images", "seconds"}}}} (the last two with --neighbours / --duplicates).
top-5 is capped at the class count (100 % with 5 classes or fewer). "best" is picked on the
val set, so it is optimistic; MoCo v3's main_lincls.py tracked it as best_acc1. Say which one
you report.
"""

import argparse
import json
import os
import sys

from accelerate.utils import broadcast_object_list
from rich.console import Console

import bfcl.embed
from bfcl.errors import BfclError, ConfigError, one_line
from bfcl.evaluation import default_image_size, labelled_data, load_backbone, results_table
from bfcl.finetune import RECIPE_FLAGS, FinetuneRun, finetune, finetune_recipe
from bfcl.images import DEFAULT_MAX_PIXELS
from bfcl.index import training_index
from bfcl.linear import FAST_LINEAR_BATCH, FAST_LINEAR_LR, linear_epochs, linear_peak_lr, linear_probe, quick_checks
from bfcl.longtail import LOSSES
from bfcl.model import ARCHS, STEMS, is_vit
from bfcl.neighbours import DUPLICATE_THRESHOLD, check_k, check_threshold, search_and_write
from bfcl.precision import CHOICES as PRECISIONS
from bfcl.pretrained import describe
from bfcl.progress import CountProgress
from bfcl.runs import (EXIT_PREEMPTED, MAX_EPOCHS, check_output_dir, check_ranges, format_summary, make_accelerator,
                       run_lock)
from bfcl.subsets import describe_subset
from bfcl.tracking import REPORT_TO, log_results, start_trackers, tracker_objects, trackers_for

MODES = ("linear", "knn", "fast-linear", "quick", "all", "finetune", "embed")

INF = None
FLAG_RANGES = {  # (low, high, low inclusive, high inclusive), checked before any work
    "image_size": (8, 4096, True, True), "patch_size": (1, 4096, True, True), "max_train_samples": (0, INF, True, True),
    "workers": (0, 256, True, True), "batch_size": (1, INF, True, True), "lr": (0, INF, False, True),
    "epochs": (0, MAX_EPOCHS, False, True), "knn_k": (1, INF, True, True), "knn_t": (0, INF, False, True),
    "fast_epochs": (1, MAX_EPOCHS, True, True), "seed": (0, 2**31 - 1, True, True),
    "max_image_pixels": (1, INF, True, True),
    "max_bad_image_share": (0, 1, True, True), "wd": (0, INF, True, True), "warmup_epochs": (0, MAX_EPOCHS, True, True),
    "min_lr": (0, INF, True, True), "label_smoothing": (0, 1, True, False), "mixup": (0, INF, True, True),
    "cutmix": (0, INF, True, True), "reprob": (0, 1, True, True), "drop_path": (0, 1, True, False),
    "layer_decay": (0, 1, False, True), "save_every": (1, INF, True, True), "keep": (0, INF, True, True),
    "log_every": (1, INF, True, True), "max_steps": (0, INF, True, True), "eval_every": (0, INF, True, True),
    "labels_per_class": (1, INF, True, True), "label_fraction": (0, 1, False, True),
    "subset_seed": (0, INF, True, True), "imbalance": (1, INF, True, True), "neighbours": (1, INF, True, True),
    "shard_size": (1, INF, True, True),
    "neighbour_block": (1, INF, True, True),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default after its help."""


class DeprecatedAddBf(argparse.Action):
    """probe.py's old name of --bf-head, still read, with a one-line note."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("note: probe.py --add_bf is now --bf-head (train.py's --add_bf is a pretraining mode); "
              "--add_bf still works here", file=sys.stderr)
        setattr(namespace, self.dest, values)


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
                   help="linear is the protocol; knn and fast-linear are quick checks; embed writes features of any "
                        "image folder, with file names")
    a = p.add_argument_group("data")
    a.add_argument("--data", required=True,
                   help="folder with train/ and val/, one subfolder per class, the same classes in both (--mode "
                        "embed: any folder of images, however nested, or an ImageFolder, as train.py reads it)")
    a.add_argument("--image-size", type=int, default=None,
                   help="crop side; default: the pretraining size if recorded (a ViT's is fixed by its position "
                        "embedding), else the data's image side with the small stem, else 224 (val: Resize 256 + "
                        "CenterCrop 224, no resize below 96 px)")
    labels = a.add_mutually_exclusive_group()
    labels.add_argument("--max-train-samples", type=int, default=0,
                        help="use a seeded (--seed) random subset of train/ this large (0: all)")
    labels.add_argument("--labels-per-class", type=int, default=None,
                        help="train on N images of each class (all of a class with fewer), drawn from --subset-seed")
    labels.add_argument("--label-fraction", type=float, default=None,
                        help="train on this share of each class's images (rounded half up, at least 1), drawn from "
                             "--subset-seed: 0.01 and 0.1 are the few-labels settings of SimCLR and BYOL")
    labels.add_argument("--train-list", default=None,
                        help="train on the images this file lists, one a line relative to train/ ('class/file.jpg', "
                             "or bare names as in SimCLR's ImageNet 1 %% / 10 %% lists), e.g. a run's train_list.txt; "
                        "--mode embed: the images to embed, relative to --data, as train.py's --train-list")
    a.add_argument("--subset-seed", type=int, default=0,
                   help="which images --labels-per-class / --label-fraction / --imbalance draw (and --imbalance's "
                        "class order), in every mode, process and start")
    a.add_argument("--imbalance", type=float, default=None, metavar="R",
                   help="long-tailed train/ (CIFAR-10-LT / CIFAR-100-LT protocol, LDAM): the i-th class keeps "
                        "int(n_max x R^(-i/(C-1))) images, n_max the smallest class's count or --labels-per-class; "
                        "not with --label-fraction, --train-list or --max-train-samples. val/ stays balanced")
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
                        "MoCo v3); finetune: the recipe's (default 0.05 x batch/256 pretrained ResNets, 0.1 x "
                        "batch/256 random-init ResNets, 5e-4 x batch/512 ViTs)")
    a.add_argument("--epochs", type=float, default=None,
                   help="epochs of the cosine schedule (default: 90 linear; finetune: the recipe's, 90 ResNets, "
                        "150 ViTs)")
    a.add_argument("--bn-head", action="store_true",
                   help="parameter-free BatchNorm before the linear head (MoCo v3 authors: makes the lr less "
                        "sensitive)")
    # dest add_bf: the name results.json and fine-tuning checkpoints record, so that runs resume
    a.add_argument("--bf-head", dest="add_bf", type=int, choices=(0, 1), default=0,
                   help="1: a trainable BatchFormer between the feature and a shared head, which sees [x ; BF(x)] "
                        "with the labels twice; removed at evaluation and from the exported classifier "
                        "(bfcl/bf_head.py)")
    a.add_argument("--loss", choices=LOSSES, default="ce",
                   help="training loss of linear, fast-linear and finetune: 'balanced-softmax' adds the training "
                        "subset's log class prior to the logits of the loss (Ren et al. 2020), evaluation unchanged")
    a.add_argument("--add_bf", dest="add_bf", type=int, choices=(0, 1), action=DeprecatedAddBf, help=argparse.SUPPRESS)
    a = p.add_argument_group("fine-tuning (--mode finetune; each flag overrides the recipe: bfcl/finetune_recipe.py)")
    a.add_argument("--wd", type=float, default=None, help="weight decay (1e-4 ResNets, 0.05 ViTs)")
    a.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up from 0 (5; with a shorter --epochs, the recipe's share of them)")
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
                   help="also evaluate on val/ every N steps (0: only where --eval-epoch-ends says)")
    a.add_argument("--eval-epoch-ends", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate at every epoch end (--no-eval-epoch-ends: at the end and --eval-every only). "
                        "Default: at up to 10 evenly spread epoch ends, the end included, as many as keep "
                        "evaluation within a tenth of training (steps x batch x 3 forward passes >= 10 x val "
                        "images per evaluation); the summary lists the steps")
    a = p.add_argument_group("quick checks")
    a.add_argument("--knn-k", type=int, nargs="+", default=[20, 200], help="neighbour counts")
    a.add_argument("--knn-t", type=float, default=0.07, help="temperature of the exp(cos / T) vote weights")
    a.add_argument("--fast-epochs", type=int, default=100,
                   help=f"epochs of fast-linear (batch {FAST_LINEAR_BATCH}, lr {FAST_LINEAR_LR}, cosine)")
    a.add_argument("--save-features", action="store_true",
                   help="write the centre-crop features to --output-dir/features.safetensors")
    a = p.add_argument_group("embeddings (--mode embed)")
    a.add_argument("--embed-dtype", choices=tuple(bfcl.embed.DTYPES), default="float32",
                   help="dtype of the rows written (float16 halves the file; the neighbour search reads it as float32)")
    a.add_argument("--shard-size", type=int, default=65536,
                   help="images per shard (rounded down to whole batches): a killed run resumes from the last "
                        "finished shard")
    a.add_argument("--neighbours", type=int, default=None, metavar="K",
                   help="also write each image's K most cosine-similar other images (exact, blocked, on the "
                        "training device): neighbours.safetensors, and neighbours.csv when N x K <= 1M")
    a.add_argument("--duplicates", type=float, nargs="?", const=DUPLICATE_THRESHOLD, default=None, metavar="T",
                   help="also write groups of near-duplicates (cosine >= T to a neighbour, joined transitively) to "
                        f"duplicates.csv, from the neighbour lists (K 10 unless --neighbours). T alone: "
                        f"{DUPLICATE_THRESHOLD}, the lowest T with precision >= 0.99 on planted CIFAR-10 duplicates "
                        "(docs/results.md#embeddings-neighbours-and-near-duplicates)")
    a.add_argument("--neighbour-block", type=int, default=4096,
                   help="rows per block of the neighbour search: peak memory 4 x block x N bytes")
    a = p.add_argument_group("run")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--output-dir", default="runs/probe",
                   help="results.json (and features.safetensors; --mode embed: its files) go here")
    a.add_argument("--report-to", choices=REPORT_TO, default="none",
                   help="also log fine-tuning's metrics.jsonl scalars, the results and the config to an experiment "
                        "tracker through Accelerate ('all': every installed one); bfcl/tracking.py")
    a.add_argument("--mixed-precision", choices=PRECISIONS, default=None,
                   help="overrides accelerate launch's setting (default: theirs; auto where the launcher names "
                        "none, as torchrun and plain python). "
                        "'auto': bf16 on GPUs that support it (else fp16) and on CPUs that compute it natively "
                        "(AVX512-BF16, AMX), fp32 on other CPUs, where bf16 is emulated")
    return p.parse_args(argv)


def recipe_from_flags(args: argparse.Namespace, arch: str):
    """(fine-tuning recipe, warm-up note): the backbone family's recipe with every flag given applied."""
    return finetune_recipe(arch, not args.random_init,
                           **{field: getattr(args, flag) for flag, field in RECIPE_FLAGS.items()})


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return probe(args)
    except BfclError as e:  # one line naming the problem and the fix, exit status 1 (one_line: also when a
        sys.exit(f"error: {one_line(e)}")  # loader worker raised it, with its traceback as the message)


def probe(args: argparse.Namespace) -> int:
    check_ranges(vars(args), FLAG_RANGES)
    trackers = tracker_objects(trackers_for(args.report_to), args.output_dir)  # a missing package: refused now
    accelerator, precision_reason = make_accelerator(args.mixed_precision, log_with=trackers)
    world = accelerator.num_processes
    if args.batch_size % world:
        raise ConfigError(f"--batch-size {args.batch_size} is not divisible by the {world} processes; use a "
                          f"multiple of {world}")
    check_output_dir(args.output_dir, args.data)
    if args.mode == "embed":  # any folder of images: no train/ + val/ needed
        with run_lock(args.output_dir, accelerator):
            return embed(args, accelerator, precision_reason)
    try:
        backbone = load_backbone(None if args.random_init else args.pretrained, args.arch, args.stem,
                                 args.patch_size, args.image_size, args.seed)
        image_size, size_reason = default_image_size(backbone, os.path.join(args.data, "train"), args.image_size,
                                                     args.max_image_pixels)
        data = labelled_data(args.data, image_size, labels_per_class=args.labels_per_class,
                             label_fraction=args.label_fraction, train_list=args.train_list,
                             subset_seed=args.subset_seed, max_train_samples=args.max_train_samples, seed=args.seed,
                             max_image_pixels=args.max_image_pixels, imbalance=args.imbalance)
        backbone.model(len(data.classes), image_size=image_size)  # fail now, in one line, if it does not fit
    except ValueError as e:  # CheckpointError, DataError, or a ViT image size that is no multiple of its patch
        raise ConfigError(str(e)) from None
    subset = data.subset.record if data.subset is not None else None
    if subset is not None and accelerator.is_main_process:  # the labels used, as a list --train-list reads
        data.subset.write(args.output_dir)
    modes = {"quick": ("knn", "fast-linear"), "all": ("knn", "fast-linear", "linear")}.get(args.mode, (args.mode,))
    if "finetune" in modes:
        recipe, warmup_note = recipe_from_flags(args, backbone.arch)
    summary = {
        "pretrained": args.pretrained or "random-init", "source": describe(backbone.info), "arch": backbone.arch,
        "stem / patch": f"patch {backbone.patch_size}" if is_vit(backbone.arch) else backbone.stem,
        "image size": f"{image_size}, {size_reason}", "classes": len(data.classes),
        "train / val images": f"{len(data.train)} / {len(data.val)}", "modes": ", ".join(modes),
        "processes": world, "device": str(accelerator.device),
        "precision": f"{accelerator.mixed_precision} ({precision_reason})",
        "batch per process": args.batch_size // world, "global batch": args.batch_size,
        "labels": describe_subset(subset),
    }
    if "linear" in modes:
        summary.update({"linear lr (scaled)": linear_peak_lr(backbone.arch, args.lr, args.batch_size),
                        "linear epochs": linear_epochs(args.epochs), "BN head": args.bn_head,
                        "BatchFormer before the head": bool(args.add_bf)})
        if args.batch_size > len(data.train):
            summary["note"] = f"batch {args.batch_size} exceeds the {len(data.train)} train images: one step per epoch"
    if "finetune" in modes and warmup_note:
        summary["fine-tuning warm-up"] = warmup_note
    accelerator.print(format_summary(summary))
    start_trackers(accelerator, args.output_dir, vars(args))

    shared = {"seed": args.seed, "batch_size": args.batch_size, "workers": args.workers,
              "max_bad_image_share": args.max_bad_image_share}
    results = {}
    if {"knn", "fast-linear"} & set(modes):
        results = quick_checks(backbone, data, accelerator, knn_ks=args.knn_k if "knn" in modes else None,
                               knn_t=args.knn_t, fast_epochs=args.fast_epochs if "fast-linear" in modes else None,
                               features_file=os.path.join(args.output_dir, "features.safetensors")
                               if args.save_features else None, loss=args.loss, **shared)
    if "linear" in modes:
        results["linear"] = linear_probe(backbone, data, accelerator, epochs=args.epochs, lr=args.lr,
                                         bn_head=args.bn_head, bf_head=bool(args.add_bf), loss=args.loss, **shared)
    if "finetune" in modes:
        run = FinetuneRun(args.output_dir, args.batch_size, pretrained=not args.random_init, bf_head=bool(args.add_bf),
                          seed=args.seed, workers=args.workers, resume=args.resume, force_resume=args.force_resume,
                          max_steps=args.max_steps, save_every=args.save_every, keep=args.keep,
                          log_every=args.log_every, eval_every=args.eval_every, eval_epoch_ends=args.eval_epoch_ends,
                          max_bad_image_share=args.max_bad_image_share, loss=args.loss)
        with run_lock(args.output_dir, accelerator):
            outcome = finetune(backbone, data, recipe, run, accelerator, record=vars(args))
        if outcome == EXIT_PREEMPTED:
            return EXIT_PREEMPTED
        results["finetune"] = outcome

    if accelerator.is_main_process:
        record = {"pretrained": args.pretrained or "random-init", "source": backbone.info["source"],
                  "arch": backbone.arch, "stem": backbone.stem, "patch_size": backbone.patch_size
                  if is_vit(backbone.arch) else None, "step": backbone.info.get("step"), "image_size": image_size,
                  "num_classes": len(data.classes), "train_samples": len(data.train), "val_samples": len(data.val),
                  "subset": subset, "processes": world, "config": vars(args), "results": results}
        path = os.path.join(args.output_dir, "results.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
        Console().print(results_table(results, f"{backbone.arch}: {args.pretrained or 'random init'}"))
        accelerator.print(f"results in {path}")
        log_results(accelerator, results)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


# train/ subsets: meaningless to embed
LABEL_FLAGS = ("max_train_samples", "labels_per_class", "label_fraction", "imbalance")


def embed(args: argparse.Namespace, accelerator, precision_reason: str) -> int:
    """--mode embed: the rows of bfcl.embed.embed_images, then --neighbours / --duplicates on the main process."""
    given = [f"--{f.replace('_', '-')}" for f in LABEL_FLAGS if getattr(args, f) not in (None, 0)]
    if given:
        raise ConfigError(f"{', '.join(given)} selects labelled train/ images; --mode embed embeds every image of "
                          "--data (or of --train-list)")
    k = args.neighbours or (10 if args.duplicates is not None else None)  # duplicates come from neighbour lists
    try:
        if args.duplicates is not None:
            check_threshold(args.duplicates)  # before any work
        backbone = load_backbone(None if args.random_init else args.pretrained, args.arch, args.stem,
                                 args.patch_size, args.image_size, args.seed)
        index, index_note = training_index(args.data, args.train_list, args.output_dir, accelerator, True)
        if k is not None:
            check_k(k, len(index))
        image_size, size_reason = bfcl.embed.image_size_for(backbone, index, args.image_size, args.max_image_pixels)
        backbone.model(1, image_size=image_size)  # another arch or size than the file's: one line now
    except ValueError as e:  # CheckpointError, DataError, K >= N, T outside (0, 1]
        raise ConfigError(str(e)) from None
    world = accelerator.num_processes
    accelerator.print(format_summary({
        "pretrained": args.pretrained or "random-init", "source": describe(backbone.info), "arch": backbone.arch,
        "stem / patch": f"patch {backbone.patch_size}" if is_vit(backbone.arch) else backbone.stem,
        "image size": f"{image_size}, {size_reason}", "images": f"{len(index)} ({index.describe()})",
        "image index": index_note, "mode": "embed", "dtype": args.embed_dtype,
        "neighbours": k or "off", "duplicates": f"cosine >= {args.duplicates}" if args.duplicates else "off",
        "processes": world, "device": str(accelerator.device),
        "precision": f"{accelerator.mixed_precision} ({precision_reason})",
        "batch per process": args.batch_size // world, "output": args.output_dir,
    }))
    with CountProgress("embed", len(index), accelerator.is_main_process) as advance:
        result = bfcl.embed.embed_images(
            backbone, index, args.output_dir, image_size=image_size, batch_size=args.batch_size // world,
            workers=args.workers, dtype=bfcl.embed.DTYPES[args.embed_dtype], shard_size=args.shard_size,
            max_pixels=args.max_image_pixels, backbone_file=args.pretrained, accelerator=accelerator,
            progress=advance)
    out = {"rows": result.rows, "width": result.width, "unreadable": len(result.unreadable),
           "shards_computed": result.shards_computed, "shards_reused": result.shards_reused,
           "embed_seconds": round(result.seconds, 2), "images_per_s": round(result.images_per_s, 1),
           "files": [os.path.join(args.output_dir, f) for f in ("embeddings.safetensors", "images.txt",
                                                                 "unreadable.txt")]}
    outcome = None
    if accelerator.is_main_process:  # the others wait: the search is one process's work on one device
        try:
            if k is not None:
                check_k(k, result.rows)  # unreadable images have no row
                found = search_and_write(args.output_dir, k, args.duplicates, args.neighbour_block,
                                                  accelerator.device)
                out = {**out, **found, "files": out["files"] + found["files"]}
            outcome = ("ok", out)
        except (ValueError, BfclError) as e:
            outcome = ("error", str(e))
    if world > 1:
        outcome = broadcast_object_list([outcome])[0]
    if outcome[0] == "error":
        raise ConfigError(outcome[1])
    out = outcome[1]
    if accelerator.is_main_process:
        path = os.path.join(args.output_dir, "results.json")
        with open(path, "w") as f:
            json.dump({"pretrained": args.pretrained or "random-init", "source": backbone.info["source"],
                       "arch": backbone.arch, "stem": backbone.stem, "image_size": image_size, "processes": world,
                       "config": vars(args), "results": {"embed": out}}, f, indent=1)
        accelerator.print(format_summary(embed_summary(out, args.embed_dtype)))
        accelerator.print(f"results in {path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def embed_summary(out: dict, dtype: str) -> dict:
    """What embed wrote, for people: one 'name: value' a line."""
    summary = {"rows": f"{out['rows']} x {out['width']} ({dtype})", "unreadable": out["unreadable"],
               "shards": f"{out['shards_computed']} computed, {out['shards_reused']} reused",
               "embed": f"{out['embed_seconds']} s, {out['images_per_s']:,.0f} images/s"}
    if "neighbours" in out:
        nb = out["neighbours"]
        peak = nb["peak_block_bytes"]
        peak = f"{peak / 2**20:,.1f} MiB" if peak >= 2**20 else f"{peak:,} bytes"
        summary["neighbours"] = (f"K {nb['k']} in {nb['seconds']} s ({nb['matmul']} matmul), peak {peak} of "
                                 "scores (4 x block x N)")
    if "duplicates" in out:
        d = out["duplicates"]
        summary["duplicates"] = f"{d['groups']} groups of {d['images']} images at cosine >= {d['threshold']}"
    summary["files"] = ", ".join(os.path.basename(f) for f in out["files"])
    return summary


if __name__ == "__main__":
    sys.exit(main())
