"""MoCo v3 self-supervised pretraining of a ResNet, optionally with BatchFormer.

One handwritten loop; Accelerate only launches processes, places tensors and handles mixed
precision. The same command runs on a CPU, one GPU, several GPUs or several nodes:

    accelerate launch --config_file accelerate_configs/cpu.yaml train.py --data DIR ...
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train.py --data DIR --add_bf 1
    torchrun --nproc_per_node 2 train.py --data DIR ...      # two CPU processes (gloo)

DIR holds train/<class>/<image> (ImageFolder layout) and, for --knn-every, val/. Defaults are
the ResNet-50, 100-epoch, batch-4096 recipe of MoCo v3; --add_bf 1 adds BatchFormer as released.
Outputs in --output-dir: checkpoints/step-*/ (safetensors + meta.json), backbone.safetensors
(torchvision key names, what probe.py loads), metrics.jsonl, config.json.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

import bfcl
from bfcl.augment import BatchedTwoViews
from bfcl.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_optimizer_state,
                             optimizer_state_tensors, save_checkpoint, save_file_atomic)
from bfcl.data import DataError, EpochBatchSampler, PretrainDataset, eval_transform, image_folder, pretrain_views
from bfcl.knn import extract_features, knn_scores, topk_accuracy
from bfcl.lars import LARS
from bfcl.loss import BF_LOSSES, bf_loss_from_add_bf, moco_loss
from bfcl.model import ARCHS, STEMS, MoCo
from bfcl.progress import ProgressLog
from bfcl.schedules import learning_rate, momentum

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after a checkpoint; run again to resume

# Options that may change between a run and its resume; any other difference is refused.
RESUMABLE_CHANGES = {"workers", "output_dir", "resume", "force_resume", "log_every", "save_every", "keep",
                     "knn_every", "knn_samples", "max_steps", "compile", "max_bad_image_share", "max_nonfinite_steps"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=type("F", (argparse.RawDescriptionHelpFormatter,
                                                           argparse.ArgumentDefaultsHelpFormatter), {}))
    a = p.add_argument_group("data")
    a.add_argument("--data", required=True, help="folder with train/ (and val/ for --knn-every), one subfolder per class")
    a.add_argument("--workers", type=int, default=8, help="data-loading processes per training process")
    a.add_argument("--image-size", type=int, default=224, help="side of the random crops")
    a.add_argument("--crop-min", type=float, default=0.2, help="smallest crop area share (MoCo v3 uses 0.2 for ResNets, 0.08 for ViTs)")
    a.add_argument("--blur", action=argparse.BooleanOptionalAction, default=True, help="Gaussian blur in the views (--no-blur suits 32 px images)")
    a.add_argument("--augment", default="pil", choices=("pil", "batched"),
                   help="'pil': each loader worker makes both views per image (PIL); 'batched': workers only decode, "
                        "squash to a fixed size and draw the parameters, and the views of the whole batch are made "
                        "on the training device (bfcl/augment.py), for when the loader is the bottleneck")
    a = p.add_argument_group("model")
    a.add_argument("-a", "--arch", default="resnet50", choices=ARCHS, help="backbone")
    a.add_argument("--stem", default="imagenet", choices=STEMS, help="'small': 3x3 conv, no max-pool, for 32-96 px images")
    a.add_argument("--moco-dim", type=int, default=256, help="output width of projector and predictor")
    a.add_argument("--moco-mlp-dim", type=int, default=4096, help="hidden width of projector and predictor")
    a.add_argument("--moco-t", type=float, default=1.0, help="softmax temperature T (the loss is scaled by 2T)")
    a.add_argument("--moco-m", type=float, default=0.99, help="base momentum of the momentum encoder")
    a.add_argument("--moco-m-cos", action=argparse.BooleanOptionalAction, default=True, help="raise the momentum to 1 on a half-cosine")
    a = p.add_argument_group("BatchFormer")
    a.add_argument("--add_bf", "--add-bf", type=int, default=0,
                   help="the seed's switch: 0 off; 1 pairs-sum loss; 36 pairs-mean; other positive values joint")
    a.add_argument("--bf-loss", choices=BF_LOSSES, default=None,
                   help="BatchFormer loss by name (turns BatchFormer on; overrides --add_bf's variant)")
    a.add_argument("--bf-trainable", action="store_true",
                   help="train BatchFormer's weights; by default they stay at their random init, as in the released runs")
    a.add_argument("--bf-lr-scale", type=float, default=0.1, help="lr multiplier for a trainable BatchFormer")
    a = p.add_argument_group("optimisation")
    a.add_argument("-b", "--batch-size", type=int, default=4096, help="GLOBAL batch over all processes")
    a.add_argument("--lr", type=float, default=0.6, help="base lr; the lr used is lr x batch-size / 256")
    a.add_argument("--wd", type=float, default=1e-6, help="weight decay")
    a.add_argument("--optimizer", default="lars", choices=("lars", "adamw"))
    a.add_argument("--epochs", type=float, default=100, help="length of the schedules; fractions allowed")
    a.add_argument("--warmup-epochs", type=float, default=10, help="linear lr warmup from 0")
    a = p.add_argument_group("run")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--output-dir", default="runs/pretrain")
    a.add_argument("--resume", default="auto", help="'auto': newest valid checkpoint in --output-dir, if any; 'none'; or a checkpoint directory")
    a.add_argument("--force-resume", action="store_true", help="resume even if settings that matter differ from the checkpoint's")
    a.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at each epoch end)")
    a.add_argument("--keep", type=int, default=3, help="checkpoints kept in --output-dir/checkpoints")
    a.add_argument("--log-every", type=int, default=10, help="log, and check for stop signals and non-finite losses, every N steps")
    a.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in total (0: train all epochs); the schedules still span --epochs")
    a.add_argument("--max-nonfinite-steps", type=int, default=0, help="non-finite losses tolerated (fp16 skips those steps) before stopping")
    a.add_argument("--max-bad-image-share", type=float, default=0.01, help="stop if more than this share of image reads fail")
    a.add_argument("--compile", action="store_true", help="torch.compile the model")
    a.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="overrides accelerate launch's --mixed_precision / config file (default: theirs; "
                   "the way to set it under torchrun); bf16 also runs on CPUs with AVX512-BF16 or AMX")
    a.add_argument("--knn-every", type=int, default=0, help="kNN top-1 on a held-out subset every N steps (0: off); needs DIR/val")
    a.add_argument("--knn-samples", type=int, default=2000, help="train images in the kNN bank and val images queried")
    return p.parse_args(argv)


def fail(message: str) -> None:
    """Stop before any work with a one-line error."""
    sys.exit(f"error: {message}")


def validate(args, num_processes: int, bf_loss: str | None) -> None:
    """Refuse, before any work, settings that would fail later or silently misbehave."""
    if args.batch_size % num_processes:
        fail(f"--batch-size {args.batch_size} is not divisible by the {num_processes} processes; use a multiple of {num_processes}")
    if bf_loss is not None and args.batch_size // num_processes < 2:
        fail(f"BatchFormer needs at least 2 samples per process, got {args.batch_size // num_processes}; raise --batch-size")
    if args.warmup_epochs >= args.epochs:
        fail(f"--warmup-epochs {args.warmup_epochs:g} must be shorter than --epochs {args.epochs:g}")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        probe = os.path.join(args.output_dir, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"--output-dir {args.output_dir} is not writable ({e.strerror}); choose another folder")
    if args.knn_every and not os.path.isdir(os.path.join(args.data, "val")):
        fail(f"--knn-every needs labelled images in {os.path.join(args.data, 'val')}; add them or pass --knn-every 0")


def code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{bfcl.__version__}+{commit}" if commit else bfcl.__version__


def param_groups(model: MoCo, args) -> tuple[list[dict], list[str]]:
    """Trainable parameters in two groups (BatchFormer gets --bf-lr-scale), and their names in
    optimizer order, which the checkpoint uses to name optimizer state."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    main = [(n, p) for n, p in named if not n.startswith("batchformer.")]
    bf = [(n, p) for n, p in named if n.startswith("batchformer.")]
    groups = [{"params": [p for _, p in main], "lr_scale": 1.0}]
    if bf:
        groups.append({"params": [p for _, p in bf], "lr_scale": args.bf_lr_scale})
    return groups, [n for n, _ in main + bf]


def ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGINT/SIGTERM to the main process, which finishes the step first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignal:
    """First SIGTERM/SIGINT: ask the loop to checkpoint and exit. Second: exit at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = True


def resume_state(args) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from (or None) and its meta, with settings checked."""
    if args.resume == "none":
        return None, None
    if args.resume == "auto":
        path = latest_checkpoint(args.output_dir)
        if path is None:
            return None, None
    else:
        path = args.resume
    try:
        model_state, optimizer_state, meta = load_checkpoint(path)
    except CheckpointError as e:
        fail(str(e))
    old, new = meta["config"], vars(args)
    changed = [f"--{k.replace('_', '-')} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
    if changed and not args.force_resume:
        fail(f"cannot resume {path}: settings differ ({'; '.join(changed)}); restore them or pass --force-resume")
    return path, {"model": model_state, "optimizer": optimizer_state, "meta": meta}


def knn_monitor_sets(args):
    """Fixed subsets for the online kNN monitor: bank from train/, queries from val/."""
    transform = eval_transform(args.image_size)
    train = image_folder(os.path.join(args.data, "train"), transform)
    val = image_folder(os.path.join(args.data, "val"), transform)
    g = torch.Generator().manual_seed(args.seed)
    pick = lambda ds: torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=g)[:args.knn_samples].tolist())
    loader = lambda ds: DataLoader(pick(ds), batch_size=256, num_workers=min(args.workers, 2))
    return loader(train), loader(val), len(train.classes)


def knn_top1(backbone, bank_loader, query_loader, num_classes, device) -> float:
    was_training = backbone.training
    backbone.eval()
    bank, bank_labels = extract_features(backbone, bank_loader, device)
    queries, labels = extract_features(backbone, query_loader, device)
    backbone.train(was_training)
    return topk_accuracy(knn_scores(queries, bank, bank_labels, num_classes, k=200), labels)["top1"]


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


def make_plan(args, num_images: int, processes: int, bf_loss: str | None) -> Plan:
    steps_per_epoch = num_images // args.batch_size
    if steps_per_epoch == 0:
        fail(f"{num_images} training images do not fill one global batch of {args.batch_size}; lower --batch-size")
    total_steps = round(steps_per_epoch * args.epochs)
    return Plan(processes=processes, local_batch=args.batch_size // processes, steps_per_epoch=steps_per_epoch,
                total_steps=total_steps, warmup_steps=round(steps_per_epoch * args.warmup_epochs),
                last_step=min(total_steps, args.max_steps) if args.max_steps else total_steps,
                peak_lr=args.lr * args.batch_size / 256, bf_loss=bf_loss)


def channels_last(device: torch.device, precision: str) -> bool:
    """NHWC activations: cuDNN's and oneDNN's bf16 convolutions are fastest in it (ResNet-18,
    32 px, bf16 on a CPU core: 12 % faster); fp32 on a CPU gains little, so it stays NCHW."""
    return device.type == "cuda" or precision == "bf16"


def build_model_and_optimizer(args, plan: Plan, device: torch.device, precision: str):
    """MoCo model and optimizer, plus the parameter names in optimizer order (for checkpoints).
    Called with the same seed on every process, so all start identical, BatchFormer included."""
    set_seed(args.seed)
    model = MoCo(args.arch, args.stem, args.moco_dim, args.moco_mlp_dim, batchformer=plan.bf_loss is not None,
                 bf_trainable=args.bf_trainable)
    if plan.processes > 1 and device.type == "cuda":  # gloo (CPU) rejects SyncBatchNorm
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last(device, precision):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    groups, param_names = param_groups(model, args)
    if args.optimizer == "lars":
        optimizer = LARS(groups, weight_decay=args.wd, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, weight_decay=args.wd)
    return model, optimizer, param_names


def check_free_disk(args, model) -> None:
    need = 3 * sum(t.numel() * t.element_size() for t in model.state_dict().values())  # model + optimizer, with room
    free = shutil.disk_usage(args.output_dir).free
    if free < need:
        fail(f"{free / 2**30:.2f} GiB free in {args.output_dir} but a checkpoint needs about {need / 2**30:.2f} GiB; "
             "free some space or choose another --output-dir")


def main(argv=None) -> int:
    args = parse_args(argv)
    # torchrun without GPUs: Accelerate starts gloo only when told the processes are CPU ones.
    accelerator = Accelerator(cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available(),
                              mixed_precision=args.mixed_precision)
    bf_loss = args.bf_loss or bf_loss_from_add_bf(args.add_bf)
    validate(args, accelerator.num_processes, bf_loss)
    try:
        augment = BatchedTwoViews(args.image_size, args.crop_min, args.blur, compile=args.compile) \
            if args.augment == "batched" else None
        dataset = PretrainDataset(os.path.join(args.data, "train"), augment.dataset_transforms() if augment
                                  else pretrain_views(args.image_size, args.crop_min, args.blur))
    except DataError as e:
        fail(str(e))
    plan = make_plan(args, len(dataset), accelerator.num_processes, bf_loss)
    model, optimizer, param_names = build_model_and_optimizer(args, plan, accelerator.device, accelerator.mixed_precision)
    check_free_disk(args, model)

    path, resumed = resume_state(args)
    start_step = 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])  # strict: every key must match
        load_optimizer_state(optimizer, param_names, resumed["optimizer"])
        start_step = resumed["meta"]["step"]
    if args.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None and accelerator.scaler is not None and resumed["meta"].get("scaler"):
        accelerator.scaler.load_state_dict(resumed["meta"]["scaler"])

    moco = accelerator.unwrap_model(model, keep_torch_compile=False)
    summary = {
        "processes": plan.processes, "device": str(accelerator.device), "precision": accelerator.mixed_precision,
        "batch per process": plan.local_batch, "global batch": args.batch_size, "lr (scaled)": plan.peak_lr,
        "steps per epoch": plan.steps_per_epoch, "total steps": plan.total_steps, "warmup steps": plan.warmup_steps,
        "trainable params": sum(p.numel() for p in moco.parameters() if p.requires_grad),
        "frozen params": sum(p.numel() for p in moco.parameters() if not p.requires_grad), "seed": args.seed,
        "BatchFormer": "off" if bf_loss is None else f"{bf_loss} loss, "
        f"{'trainable' if args.bf_trainable else 'frozen at init'}, context {plan.local_batch} samples per process",
        "resumed from": f"{path} (step {start_step})" if path else "scratch",
    }
    accelerator.print("\n".join(f"{k:>18}: {v}" for k, v in summary.items()))
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:
            json.dump({"config": vars(args), "derived": summary}, f, indent=1)
    return train(args, plan, accelerator, model, optimizer, param_names, dataset, augment, start_step)


def save(args, plan: Plan, accelerator, moco: MoCo, optimizer, param_names, step: int) -> None:
    """Training checkpoint + backbone export. The main process writes; the others wait so
    that no process runs ahead of a half-written checkpoint."""
    if accelerator.is_main_process:
        meta = {"format": "bfcl-checkpoint-1", "version": code_version(), "config": vars(args),
                "epoch": step / plan.steps_per_epoch, "steps_per_epoch": plan.steps_per_epoch,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": "derived from (seed, step, process index): nothing to restore"}
        state = moco.state_dict()
        save_checkpoint(args.output_dir, step, state, optimizer_state_tensors(optimizer.optimizer, param_names),
                        meta, args.keep)
        prefix = "base_encoder.backbone."
        backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        save_file_atomic(backbone, os.path.join(args.output_dir, "backbone.safetensors"),
                         {"format": "torchvision-resnet-backbone", "arch": args.arch, "stem": args.stem,
                          "image_size": str(args.image_size), "step": str(step)})
    accelerator.wait_for_everyone()


def train(args, plan: Plan, accelerator, model, optimizer, param_names, dataset, augment, start_step: int) -> int:
    """The pretraining loop. Per step: set lr and m -> forward -> gather keys -> loss ->
    backward -> optimizer step -> momentum update; then, at sync points only, read the
    device-side sums, log, check for trouble and checkpoint."""
    device, rank = accelerator.device, accelerator.process_index
    moco = accelerator.unwrap_model(model, keep_torch_compile=False)
    log = ProgressLog(os.path.join(args.output_dir, "metrics.jsonl"), plan.last_step, start_step) \
        if accelerator.is_main_process else None
    knn_sets = knn_monitor_sets(args) if args.knn_every and accelerator.is_main_process else None
    memory_format = torch.channels_last if channels_last(device, accelerator.mixed_precision) else torch.contiguous_format
    stop = StopSignal()
    # Sums since the last sync point, kept on the device so that a step never waits for the
    # host: loss, non-finite losses, image reads that failed, stop requests.
    window, window_steps = torch.zeros(4, device=device), 0
    nonfinite_total, bad_total, images_total = 0, 0, 0
    window_start, data_wait = time.perf_counter(), 0.0
    step = start_step
    if knn_sets and step == 0:  # the curve starts at the random init
        log.log(0, {"epoch": 0.0, "knn_top1": knn_top1(moco.base_encoder.backbone, *knn_sets, device)})
    while step < plan.last_step:
        epoch, epoch_step = divmod(step, plan.steps_per_epoch)
        sampler = EpochBatchSampler(len(dataset), args.batch_size, rank, plan.processes, args.seed, epoch, epoch_step)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                            pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
        fetch_start = time.perf_counter()
        for x1, x2, _, failed in loader:
            data_wait += time.perf_counter() - fetch_start
            lr = learning_rate(step, plan.total_steps, plan.warmup_steps, plan.peak_lr)
            m = momentum(step, plan.total_steps, args.moco_m, args.moco_m_cos)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)  # BatchFormer's dropout
            if augment is not None:  # x1: uint8 images at the source size, x2: each image's view parameters
                x1, x2 = augment(x1.to(device, non_blocking=True), x2)
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)

            q1, q2, k1, k2 = model(x1, x2)
            loss = moco_loss(q1, q2, accelerator.gather(k1), accelerator.gather(k2), rank, args.moco_t, plan.bf_loss)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            moco.update_momentum_encoder(m)
            step += 1

            # Host values go up through pinned memory without blocking: a plain .to(device) of a CPU
            # tensor makes the host wait for the whole step on a GPU.
            host = torch.tensor([failed.sum().item(), float(stop.requested)], pin_memory=device.type == "cuda")
            window += torch.cat([loss.detach().float().view(1), (~torch.isfinite(loss.detach())).float().view(1),
                                 host.to(device, non_blocking=True)])
            window_steps += 1
            images_total += args.batch_size
            end_of_epoch = step % plan.steps_per_epoch == 0
            save_now = step % args.save_every == 0 or end_of_epoch or step == plan.last_step
            knn_now = args.knn_every and (step % args.knn_every == 0 or step == plan.last_step)
            if step % args.log_every and not (save_now or knn_now):
                fetch_start = time.perf_counter()
                continue

            # ---- sync point: the only place where the host reads values from the device ----
            loss_sum, nonfinite, bad, stops = accelerator.reduce(window, reduction="sum").tolist()
            nonfinite_total += int(nonfinite)
            bad_total += int(bad)
            if nonfinite_total > args.max_nonfinite_steps:
                fail(f"non-finite loss by step {step} (lr {lr:.4g}, precision {accelerator.mixed_precision}); the last "
                     f"good checkpoint is kept in {args.output_dir}; lower --lr, or use bf16 instead of fp16")
            if bad_total > args.max_bad_image_share * images_total:
                fail(f"{bad_total} of {images_total} image reads failed, more than --max-bad-image-share "
                     f"{args.max_bad_image_share}; check the data folder")
            elapsed = time.perf_counter() - window_start
            if log is not None:
                metrics = {"epoch": round(step / plan.steps_per_epoch, 3), "loss": loss_sum / plan.processes / window_steps,
                           "lr": lr, "m": m, "img_per_s": round(window_steps * args.batch_size / elapsed, 1),
                           "data_wait": data_wait / elapsed, "bad_images": bad_total}
                if knn_now:
                    metrics["knn_top1"] = knn_top1(moco.base_encoder.backbone, *knn_sets, device)
                log.log(step, metrics)
                if end_of_epoch and bad_total:
                    log.print(f"epoch {step // plan.steps_per_epoch}: {bad_total} unreadable images so far, each replaced by the next readable one")
            window.zero_()
            window_steps, window_start, data_wait = 0, time.perf_counter(), 0.0
            if save_now or stops:
                save(args, plan, accelerator, moco, optimizer, param_names, step)
            if stops:
                if log is not None:
                    log.print(f"stopped by a signal at step {step}; checkpoint written; run the same command to resume")
                    log.close()
                return EXIT_PREEMPTED
            if step >= plan.last_step:
                break
            fetch_start = time.perf_counter()
    if log is not None:
        log.print(f"done: {step} steps; backbone in {os.path.join(args.output_dir, 'backbone.safetensors')}")
        log.close()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
