"""The small-image pretraining recipe of the bench scripts, and its runs: train.py commands, the
wall-clock budget as a step count, a pretraining run followed by probe.py's kNN and fast-linear.

quality.py, bf_study.py and recipe_screen.py compare runs of RECIPE; finetune_bench.py and
downstream.py pretrain one backbone with it (`pretrain`). A `Setup` holds what their flags
choose; add_setup_options gives a script quality.py's spelling of them.
"""

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import statistics
from dataclasses import dataclass

from bfcl.loss import BF_LOSSES
from harness import (count_images, fail, fresh_dir, launcher, read_metrics, reusable, run, steps_in_budget,
                     time_short_run)

# The small-image recipe, chosen by measurement on this 2-core CPU (README "Small-image recipe").
# ResNet-18 with the ImageNet stem at 32 px: conv1/2 + max-pool/2 leave 8x8 maps for layer1, 12x
# less compute than the 3x3 CIFAR stem, so a 15-minute run sees about six epochs, not a quarter
# of one. Precision auto: bf16 where the CPU computes it natively (on the AVX512-BF16 machine of
# the README's results, bf16 with NHWC and views made per batch ran 1.67x as many images per
# second as fp32 with PIL views), fp32 where bf16 would be emulated (about 9x slower on AVX2).
# T 0.2 (small batch), a high LARS lr and a low base momentum suit
# a run of about a thousand steps; global batch 256 is split over two single-threaded processes.
RECIPE = ["-a", "resnet18", "--stem", "imagenet", "--image-size", "32", "-b", "256",
          "--optimizer", "lars", "--lr", "4.8", "--wd", "1e-5", "--moco-t", "0.2", "--moco-m", "0.8",
          "--moco-mlp-dim", "2048", "--crop-min", "0.2", "--no-blur", "--mixed-precision", "auto",
          "--augment", "batched"]
WARMUP_SHARE = 0.1  # of the run's epochs; MoCo v3 warms up 10 of 100 epochs
OVERRUN_STOP = 1.5  # a budgeted run is stopped at this multiple of its budget


@dataclass(frozen=True)
class Setup:
    """Where and how the recipe runs. out holds calibration/ and runs/; the rest are the flags of
    add_setup_options."""
    data: str
    out: str
    procs: int = 2
    workers: int = 0
    batch_size: int | None = None  # RECIPE's global batch unless set
    train_args: str = ""  # more train.py options after RECIPE, which they override
    bf_loss: str = "pairs-sum"
    bf_trainable: bool = False
    knn_points: int = 6
    knn_samples: int = 2000
    calibration_steps: int = 30
    fast_epochs: int = 100

    def recipe(self) -> list[str]:
        """RECIPE with batch_size and train_args applied (train.py keeps an option's last value)."""
        r = list(RECIPE)
        if self.batch_size:
            r[r.index("-b") + 1] = str(self.batch_size)
        return r + shlex.split(self.train_args)

    def recipe_value(self, flag: str) -> str:
        r = self.recipe()
        return r[len(r) - 1 - r[::-1].index(flag) + 1]  # the last occurrence wins, as in argparse

    def random_init_args(self) -> list[str]:
        """probe.py's flags for the random-init baseline of the recipe's backbone (a ViT's patch too)."""
        what = ["--random-init", "-a", self.recipe_value("-a"), "--stem", self.recipe_value("--stem")]
        if "--patch-size" in self.recipe():
            what += ["--patch-size", self.recipe_value("--patch-size")]
        return what

    def steps_per_epoch(self) -> int:
        batch = int(self.recipe_value("-b"))
        if batch % self.procs:
            fail(f"batch {batch} is not divisible by --procs {self.procs}")
        steps = count_images(os.path.join(self.data, "train")) // batch
        if steps == 0:
            fail(f"{self.data}/train holds fewer images than one batch of {batch}; pass a smaller --batch-size")
        return steps


def add_setup_options(p: argparse.ArgumentParser, knn_points: int = 6) -> None:
    """The Setup's flags, as bench/quality.py spells them (bf_study.py and recipe_screen.py take them
    in --quality-args); --data, --out and --procs come from harness.bench_parser."""
    p.add_argument("--bf-loss", default="pairs-sum", choices=BF_LOSSES,
                   help="BatchFormer loss variant (pairs-sum is --add_bf 1, the documented default)")
    p.add_argument("--bf-trainable", action="store_true",
                   help="train BatchFormer's weights (default: frozen at init, as released)")
    p.add_argument("--batch-size", type=int, default=None, help="override RECIPE's global batch (small data sets)")
    p.add_argument("--train-args", default="", help="more train.py options after RECIPE, which they override, "
                   "e.g. \"--moco-m 0.99 --lr 1.2\"")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading processes per process (0: load in the training process)")
    p.add_argument("--knn-points", type=int, default=knn_points, help="online kNN monitor evaluations per run")
    p.add_argument("--knn-samples", type=int, default=2000, help="monitor bank and query size (train.py --knn-samples)")
    p.add_argument("--calibration-steps", type=int, default=30,
                   help="steps of each calibration run (multiple of 5, >= 15)")
    p.add_argument("--fast-epochs", type=int, default=100, help="probe.py --fast-epochs")


def add_pretrain_options(p: argparse.ArgumentParser) -> None:
    """finetune_bench.py's and downstream.py's choice of a backbone: pretrain one (`pretrain`) or pass it."""
    p.add_argument("--pretrained", default=None, help="a backbone to start from instead of pretraining one")
    p.add_argument("--pretrain-min", type=float, default=15, help="wall-clock minutes of MoCo v3 pretraining")


def setup_from(args: argparse.Namespace, data: str, out: str) -> Setup:
    """The Setup of parsed add_setup_options flags."""
    fields = {f.name for f in dataclasses.fields(Setup)} - {"data", "out"}
    return Setup(data=data, out=out, **{name: getattr(args, name) for name in fields})


def setup_with_options(options: str, data: str, out: str, **defaults) -> Setup:
    """A Setup from defaults, with quality.py-style options (a --quality-args string) on top."""
    p = argparse.ArgumentParser(prog="--quality-args", allow_abbrev=False)
    add_setup_options(p)
    p.set_defaults(**defaults)
    return setup_from(p.parse_args(shlex.split(options)), data, out)


def train_cmd(setup: Setup, out_dir: str, seed: int, bf: bool, steps: int, steps_per_epoch: int, knn_every: int,
              log_every: int = 10, extra=()) -> list[str]:
    epochs = steps / steps_per_epoch  # train.py: total steps = round(steps_per_epoch * epochs) = steps
    cmd = [*launcher(setup.procs), "train.py", "--data", setup.data, "--output-dir", out_dir, *setup.recipe(),
           "--epochs", repr(epochs), "--warmup-epochs", repr(epochs * WARMUP_SHARE), "--seed", str(seed),
           "--workers", str(setup.workers), "--resume", "none", "--save-every", "1000000", "--keep", "1",
           "--log-every", str(log_every), "--knn-every", str(knn_every), "--knn-samples", str(setup.knn_samples),
           *extra]
    if bf:
        cmd += ["--bf-loss", setup.bf_loss] + (["--bf-trainable"] if setup.bf_trainable else [])
    return cmd


def monitor_every(setup: Setup, steps: int) -> int:
    """train.py --knn-every for knn_points monitor passes over a run of `steps`."""
    return max(1, math.ceil(steps / setup.knn_points))


# ---- calibration: the budget as a number of steps ----------------------------------------------------

def calibrate(setup: Setup, env: dict, steps_per_epoch: int, bf: bool, earlier: dict | None, name: str | None = None,
              extra=()) -> dict:
    """Time a short run of the recipe: logs every 5 steps and the kNN monitor at the last step.
    The windows before it give the step time; the last one, minus that, the monitor pass.
    name and extra (more train.py flags) time a variant of the recipe (bench/bf_study.py)."""
    n = setup.calibration_steps
    out = os.path.join(setup.out, "calibration", name or ("bf" if bf else "moco"))
    cmd = train_cmd(setup, out, 0, bf, 2 * n + steps_per_epoch, steps_per_epoch, n, 5,
                    ["--max-steps", str(n), *extra])
    if earlier and earlier.get("command") == shlex.join(cmd):  # keeps a resumed benchmark's runs reusable
        return earlier
    fresh_dir(out)
    t = time_short_run(cmd, out, "train.log", env, n, steps_per_epoch)
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    os.remove(os.path.join(out, "backbone.safetensors"))
    return {"bf": bf, "steps": n, "step_s": t["step_s"], "monitor_s": t["last_window_s"], "startup_s": t["startup_s"],
            "checkpoint_exit_s": t["exit_s"], "wall_s": t["wall_s"], "command": t["command"]}


def steps_for_budget(cal: dict, budget_s: float, steps_per_epoch: int, knn_points: int) -> int:
    """Largest step count whose estimated wall-clock fits the budget: startup + steps + monitor
    passes + a checkpoint at every epoch end and at the last step."""
    steps = steps_in_budget(budget_s, cal["step_s"], cal["startup_s"] + cal["checkpoint_exit_s"], minimum=1)
    for _ in range(3):  # the checkpoint count depends on the step count; settles at once
        overhead = (cal["startup_s"] + cal["checkpoint_exit_s"] * (1 + steps // steps_per_epoch)
                    + knn_points * cal["monitor_s"])
        steps = steps_in_budget(budget_s, cal["step_s"], overhead)
    return steps


# ---- one run: pretrain (or not), then probe ----------------------------------------------------------

def probe(setup: Setup, env: dict, run_dir: str, seed: int, pretrained: str | None) -> dict:
    """kNN (k 200) and fast-linear top-1 on val, from one probe.py --mode quick run (one feature pass)."""
    out = os.path.join(run_dir, "probe")
    what = ["--pretrained", pretrained] if pretrained else setup.random_init_args()
    cmd = [*launcher(setup.procs), "probe.py", *what, "--data", setup.data, "--mode", "quick", "--image-size",
           setup.recipe_value("--image-size"), "--workers", str(setup.workers), "--batch-size", "512",
           "--seed", str(seed), "--fast-epochs", str(setup.fast_epochs), "--output-dir", out]
    os.makedirs(out, exist_ok=True)
    timing = run(cmd, os.path.join(out, "probe.log"), env)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)["results"]
    return {"knn_top1": results["knn"]["k200"]["top1"], "linear_top1": results["fast_linear"]["top1"],
            "probe_s": timing["wall_s"]}


def pretrain_and_probe(setup: Setup, env: dict, name: str, seed: int, cmd: list[str] | None,
                       budget_s: float | None) -> dict:
    """One row of results.json; reused from an earlier bench run if its command is the same.
    cmd None: the random-init baseline, probed only."""
    run_dir = os.path.join(setup.out, "runs", f"seed{seed}", name)
    record_path = os.path.join(run_dir, "record.json")
    key = shlex.join(cmd) if cmd else f"random init, seed {seed}, {shlex.join(setup.random_init_args())}"
    if (record := reusable(record_path, key)) is not None:
        print(f"  {name}, seed {seed}: reusing {record_path}", flush=True)
        return record
    fresh_dir(run_dir)
    record = {"name": name, "seed": seed, "command": key, "steps": 0, "wall_s": 0.0, "curve": []}
    if cmd:
        print(f"  {name}, seed {seed}: training ({cmd[cmd.index('--epochs') + 1][:6]} epochs)", flush=True)
        t = run(cmd, os.path.join(run_dir, "train.log"), env, budget_s * OVERRUN_STOP if budget_s else None)
        if not os.path.exists(os.path.join(run_dir, "backbone.safetensors")):
            fail(f"{name}, seed {seed}: no backbone.safetensors in {run_dir}; see {run_dir}/train.log")
        metrics = read_metrics(run_dir)
        record.update(wall_s=t["wall_s"], stopped_at_budget=t["stopped_at_budget"], steps=metrics[-1]["step"],
                      img_per_s=statistics.median(r["img_per_s"] for r in metrics if "img_per_s" in r),
                      curve=[{"step": r["step"], "minutes": (r["time"] - t["start"]) / 60, "knn_top1": r["knn_top1"]}
                             for r in metrics if "knn_top1" in r])
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    print(f"  {name}, seed {seed}: probing", flush=True)
    record.update(probe(setup, env, run_dir, seed, os.path.join(run_dir, "backbone.safetensors") if cmd else None))
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"  {name}, seed {seed}: kNN {record['knn_top1']:.2f}, fast-linear {record['linear_top1']:.2f}, "
          f"{record['steps']} steps, {record['wall_s'] / 60:.1f} min", flush=True)
    return record


# ---- one pretrained backbone for the fine-tuning benchmarks --------------------------------------------

def pretrain(setup: Setup, env: dict, budget_min: float) -> str:
    """train.py with the recipe, MoCo v3, seed 0, calibrated to budget_min of wall-clock; returns its
    backbone.safetensors (setup.out/run/). finetune_bench.py's and downstream.py's pretraining."""
    os.makedirs(setup.out, exist_ok=True)
    steps_per_epoch = setup.steps_per_epoch()
    cal_path = os.path.join(setup.out, "calibration.json")
    earlier = json.load(open(cal_path)) if os.path.exists(cal_path) else None
    cal = calibrate(setup, env, steps_per_epoch, False, earlier)
    with open(cal_path, "w") as f:
        json.dump(cal, f, indent=1)
    steps = steps_for_budget(cal, budget_min * 60, steps_per_epoch, setup.knn_points)
    run_dir = os.path.join(setup.out, "run")
    cmd = train_cmd(setup, run_dir, 0, False, steps, steps_per_epoch, monitor_every(setup, steps))
    export = os.path.join(run_dir, "backbone.safetensors")
    record_path = os.path.join(run_dir, "record.json")
    if reusable(record_path, shlex.join(cmd)) is not None:
        print(f"pretraining: reusing {export}", flush=True)
        return export
    print(f"pretraining: {steps} steps ({steps / steps_per_epoch:.2f} epochs) in {budget_min:g} min", flush=True)
    fresh_dir(run_dir)
    t = run(cmd, os.path.join(run_dir, "train.log"), env, budget_min * 60 * OVERRUN_STOP)
    if not os.path.exists(export):
        fail(f"pretraining left no {export}; see {run_dir}/train.log")
    with open(record_path, "w") as f:
        json.dump({"command": shlex.join(cmd), "steps": steps, "wall_s": t["wall_s"]}, f, indent=1)
    return export


def backbone_of(path: str) -> tuple[str, list[str]]:
    """(family, probe.py flags for a random init of the same backbone) of a pretrained file."""
    from bfcl.model import is_vit
    from bfcl.pretrained import guess_architecture, load_backbone_state
    state, info = load_backbone_state(path)
    arch = info.get("arch") or guess_architecture(state)["arch"]
    if is_vit(arch):
        patch = info.get("patch_size") or guess_architecture(state)["patch_size"]
        return "vit", ["--random-init", "-a", arch, "--patch-size", str(patch)]
    return "resnet", ["--random-init", "-a", arch, "--stem", info.get("stem") or guess_architecture(state)["stem"]]
