"""Does the trainer learn good features from real images? CIFAR-10, a fixed wall-clock budget per run.

    make bench-quality                                   # 15 min per pretraining run, 2 seeds
    make bench-quality BUDGET=5 SEEDS=3 OUT=bench-results/q5
    .venv/bin/python bench/quality.py --budget-min 15 --seeds 2 --bf-loss pairs-mean

For each seed, train.py pretrains on DATA/train (subprocesses of this Python, in the repo root):

  MoCo v3                                  RECIPE below, for the budget
  MoCo v3 + BatchFormer                    the same + BatchFormer (--bf-loss), for the same budget
  MoCo v3 + BatchFormer at equal steps     as many steps as that seed's MoCo v3 run, however long
                                           that takes (its wall-clock is reported)

and probe.py scores each backbone, and a randomly initialised one, on DATA/val: weighted kNN
(k = 200, T = 0.07, all of train/ as the bank) and fast-linear (a linear head on cached features;
NOT the 90-epoch protocol). Results are mean ± std over the seeds.

Fixed wall-clock: train.py's schedules need their length up front, so a short calibration run of
each recipe (RECIPE, with and without BatchFormer) times its startup, its steps, one pass of the
online kNN monitor and its exit (the final checkpoint), and the budget becomes --epochs
(fractional). The budget covers the whole train.py process: startup, loading, the monitor and
checkpoints. A run that overruns it by half is stopped with SIGTERM (train.py checkpoints and
exits); the table reports every run's real wall-clock and steps.

Outputs in --out: results.md (tables, command, hardware, date), results.json (everything, per
run), knn_curve.svg (the online kNN monitor against wall-clock and steps), calibration.json and
runs/seed<S>/<run>/ (train.py and probe.py outputs and logs; checkpoints are deleted, the
backbone.safetensors export is kept). A rerun with the same --out reuses finished runs whose
command is unchanged; --fresh starts over.

Measured (make bench-quality BUDGET=15 SEEDS=2, 2 cores, 2026-11-28): kNN top-1 random init 22.1,
MoCo v3 50.6 +- 0.0, + BatchFormer 48.9 +- 0.5 (equal time) / 49.3 +- 0.3 (equal steps); README "Results".
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

from bfcl.loss import BF_LOSSES
from bfcl.precision import cpu_has_native_bf16, cpu_name
from quality_report import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "cifar10"))

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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "F", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}), allow_abbrev=False)
    p.add_argument("--data", default=DEFAULT_DATA, help="ImageFolder root with train/ and val/ (CIFAR-10 here)")
    p.add_argument("--out", default=os.path.join(REPO, "bench-results", "quality"), help="results folder")
    p.add_argument("--budget-min", type=float, default=15, help="wall-clock minutes per pretraining run")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1; mean ± std over them")
    p.add_argument("--bf-loss", default="pairs-sum", choices=BF_LOSSES,
                   help="BatchFormer loss variant (pairs-sum is --add_bf 1, the documented default)")
    p.add_argument("--bf-trainable", action="store_true",
                   help="train BatchFormer's weights (default: frozen at init, as released)")
    p.add_argument("--no-equal-steps", dest="equal_steps", action="store_false",
                   help="skip the BatchFormer run at MoCo v3's step count (saves ~1.2x budget per seed)")
    p.add_argument("--batch-size", type=int, default=None, help="override RECIPE's global batch (small data sets)")
    p.add_argument("--train-args", default="", help="more train.py options after RECIPE, which they override, "
                   "e.g. \"--moco-m 0.99 --lr 1.2\"")
    p.add_argument("--procs", type=int, default=2,
                   help="training processes (torchrun, gloo); 1: a plain python process")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL threads per process (0: torch's default, one per core)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading processes per process (0: load in the training process)")
    p.add_argument("--knn-points", type=int, default=6, help="online kNN monitor evaluations per run")
    p.add_argument("--knn-samples", type=int, default=2000, help="monitor bank and query size (train.py --knn-samples)")
    p.add_argument("--calibration-steps", type=int, default=30,
                   help="steps of each calibration run (multiple of 5, >= 15)")
    p.add_argument("--fast-epochs", type=int, default=100, help="probe.py --fast-epochs")
    p.add_argument("--fresh", action="store_true", help="delete --out's earlier runs instead of reusing them")
    return p.parse_args(argv)


def fail(message: str):
    sys.exit(f"error: {message}")


def count_images(root: str) -> int:
    return sum(1 for _, _, files in os.walk(root) for f in files if f.lower().endswith((".jpg", ".jpeg", ".png")))


def hardware() -> dict:
    return {"cpu": cpu_name(), "bf16": "native" if cpu_has_native_bf16() else "emulated", "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "os": platform.platform(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True)
    return r.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---- subprocesses ----------------------------------------------------------------------------

def launcher(args) -> list[str]:
    """This Python, or torchrun (as a module of it) for several processes; --standalone picks a
    free port, so benchmarks and tests running side by side do not collide."""
    if args.procs == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.procs)]


def run(cmd: list[str], log_path: str, env: dict, stop_after_s: float | None = None) -> dict:
    """Run cmd in the repo root, output to log_path. Past stop_after_s, SIGTERM (train.py then
    checkpoints and exits 75; torchrun passes the signal on and exits non-zero). Returns start
    time, wall-clock and whether it was stopped."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        stopped = False
        while proc.poll() is None:
            time.sleep(0.5)
            if stop_after_s is not None and not stopped and time.time() - start > stop_after_s:
                proc.send_signal(signal.SIGTERM)
                stopped = True
    wall = time.time() - start
    if proc.returncode not in (0, 75) and not stopped:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        fail(f"{shlex.join(cmd)} exited with {proc.returncode}; last lines of {log_path}:\n{tail}")
    return {"start": start, "wall_s": wall, "stopped_at_budget": stopped}


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_cmd(args, out_dir: str, seed: int, bf: bool, steps: int, steps_per_epoch: int, knn_every: int,
              log_every: int = 10, extra=()) -> list[str]:
    epochs = steps / steps_per_epoch  # train.py: total steps = round(steps_per_epoch * epochs) = steps
    cmd = [*launcher(args), "train.py", "--data", args.data, "--output-dir", out_dir, *recipe(args),
           "--epochs", repr(epochs), "--warmup-epochs", repr(epochs * WARMUP_SHARE), "--seed", str(seed),
           "--workers", str(args.workers), "--resume", "none", "--save-every", "1000000", "--keep", "1",
           "--log-every", str(log_every), "--knn-every", str(knn_every), "--knn-samples", str(args.knn_samples), *extra]
    if bf:
        cmd += ["--bf-loss", args.bf_loss] + (["--bf-trainable"] if args.bf_trainable else [])
    return cmd


def recipe(args) -> list[str]:
    """RECIPE with --batch-size and --train-args applied (train.py keeps an option's last value)."""
    r = list(RECIPE)
    if args.batch_size:
        r[r.index("-b") + 1] = str(args.batch_size)
    return r + shlex.split(args.train_args)


def random_init_args(args) -> list[str]:
    """probe.py's flags for the random-init baseline of the recipe's backbone (a ViT's patch too)."""
    what = ["--random-init", "-a", recipe_value(args, "-a"), "--stem", recipe_value(args, "--stem")]
    if "--patch-size" in recipe(args):
        what += ["--patch-size", recipe_value(args, "--patch-size")]
    return what


def recipe_value(args, flag: str) -> str:
    r = recipe(args)
    return r[len(r) - 1 - r[::-1].index(flag) + 1]  # the last occurrence wins, as in argparse


# ---- calibration: the budget as a number of steps ------------------------------------------------

def calibrate(args, env, steps_per_epoch: int, bf: bool, earlier: dict | None, name: str | None = None,
              extra=()) -> dict:
    """Time a short run of the recipe: logs every 5 steps and the kNN monitor at the last step.
    The windows before it give the step time; the last one, minus that, the monitor pass.
    name and extra (more train.py flags) time a variant of the recipe (bench/bf_study.py)."""
    n = args.calibration_steps
    out = os.path.join(args.out, "calibration", name or ("bf" if bf else "moco"))
    cmd = train_cmd(args, out, 0, bf, 2 * n + steps_per_epoch, steps_per_epoch, n, 5,
                    ["--max-steps", str(n), *extra])
    if earlier and earlier.get("command") == shlex.join(cmd):  # keeps a resumed benchmark's runs reusable
        return earlier
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t = run(cmd, os.path.join(out, "train.log"), env)
    times = {r["step"]: r["time"] for r in read_metrics(out)}
    window = lambda s: times[s] - times[s - 5]
    windows = list(range(10, n, 5))
    # Windows holding an epoch end also hold a checkpoint; use them only on data sets so small
    # that every window does (then the step time is overestimated, which keeps runs in budget).
    plain = [s for s in windows if (s - 1) // steps_per_epoch == (s - 5) // steps_per_epoch] or windows
    step_s = statistics.median(window(s) for s in plain) / 5
    monitor_s = max(0.0, window(n) - 5 * step_s)
    startup_s = max(0.0, times[5] - t["start"] - 5 * step_s)
    exit_s = t["start"] + t["wall_s"] - times[n]  # final checkpoint + interpreter exit
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    os.remove(os.path.join(out, "backbone.safetensors"))
    return {"bf": bf, "steps": n, "step_s": step_s, "monitor_s": monitor_s, "startup_s": startup_s,
            "checkpoint_exit_s": exit_s, "wall_s": t["wall_s"], "command": shlex.join(cmd)}


def steps_for_budget(cal: dict, budget_s: float, steps_per_epoch: int, knn_points: int) -> int:
    """Largest step count whose estimated wall-clock fits the budget: startup + steps + monitor
    passes + a checkpoint at every epoch end and at the last step."""
    steps = max(1, int((budget_s - cal["startup_s"] - cal["checkpoint_exit_s"]) / cal["step_s"]))
    for _ in range(3):  # the checkpoint count depends on the step count; settles at once
        overhead = (cal["startup_s"] + cal["checkpoint_exit_s"] * (1 + steps // steps_per_epoch)
                    + knn_points * cal["monitor_s"])
        steps = max(10, int((budget_s - overhead) / cal["step_s"]))
    return steps


# ---- one run: pretrain (or not), then probe -------------------------------------------------------

def probe(args, env, run_dir: str, seed: int, pretrained: str | None) -> dict:
    """kNN (k 200) and fast-linear top-1 on val, from one probe.py --mode quick run (one feature pass)."""
    out = os.path.join(run_dir, "probe")
    what = ["--pretrained", pretrained] if pretrained else random_init_args(args)
    cmd = [*launcher(args), "probe.py", *what, "--data", args.data, "--mode", "quick", "--image-size",
           recipe_value(args, "--image-size"), "--workers", str(args.workers), "--batch-size", "512",
           "--seed", str(seed), "--fast-epochs", str(args.fast_epochs), "--output-dir", out]
    os.makedirs(out, exist_ok=True)
    timing = run(cmd, os.path.join(out, "probe.log"), env)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)["results"]
    scores = {"knn_top1": results["knn"]["k200"]["top1"], "linear_top1": results["fast_linear"]["top1"],
              "probe_s": timing["wall_s"]}
    return scores


def pretrain_and_probe(args, env, name: str, seed: int, cmd: list[str] | None, budget_s: float | None) -> dict:
    """One row of results.json; reused from an earlier bench run if its command is the same."""
    run_dir = os.path.join(args.out, "runs", f"seed{seed}", name)
    record_path = os.path.join(run_dir, "record.json")
    key = shlex.join(cmd) if cmd else f"random init, seed {seed}, {shlex.join(random_init_args(args))}"
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["command"] == key:
            print(f"  {name}, seed {seed}: reusing {record_path}", flush=True)
            return record
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
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
    record.update(probe(args, env, run_dir, seed, os.path.join(run_dir, "backbone.safetensors") if cmd else None))
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"  {name}, seed {seed}: kNN {record['knn_top1']:.2f}, fast-linear {record['linear_top1']:.2f}, "
          f"{record['steps']} steps, {record['wall_s'] / 60:.1f} min", flush=True)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    for part in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data, part)):
            fail(f"{os.path.join(args.data, part)} not found; pass --data with train/ and val/ ImageFolders "
                 "(CIFAR-10 as JPEGs, see ../shared/data/README.md)")
    if args.calibration_steps < 15 or args.calibration_steps % 5:
        fail(f"--calibration-steps {args.calibration_steps} must be a multiple of 5, at least 15")
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    budget_s = args.budget_min * 60
    batch = int(recipe_value(args, "-b"))
    if batch % args.procs:
        fail(f"batch {batch} is not divisible by --procs {args.procs}")
    steps_per_epoch = count_images(os.path.join(args.data, "train")) // batch
    if steps_per_epoch == 0:
        fail(f"{args.data}/train holds fewer images than one batch of {batch}; pass a smaller --batch-size")
    info = {"command": shlex.join([os.path.relpath(sys.executable, REPO), "bench/quality.py", *(argv or sys.argv[1:])]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "hardware": hardware(),
            "git": git_commit(), "data": args.data, "data_name": os.path.basename(os.path.normpath(args.data)),
            "budget_min": args.budget_min, "seeds": args.seeds,
            "recipe": shlex.join(recipe(args)), "bf_loss": args.bf_loss, "bf_trainable": args.bf_trainable,
            "steps_per_epoch": steps_per_epoch, "warmup_share": WARMUP_SHARE,
            "launch": f"{args.procs} process(es) x {args.threads or 'default'} thread(s), "
                      f"{args.workers} loader workers each"}
    print(f"{info['date']} | {info['hardware']['cpu']}, {info['hardware']['cores']} cores | "
          f"{args.budget_min:g} min per run, {args.seeds} seed(s) | recipe: {info['recipe']}", flush=True)

    print("calibrating (short timed runs of each recipe)", flush=True)
    cal_path = os.path.join(args.out, "calibration.json")
    earlier = json.load(open(cal_path))["calibration"] if os.path.exists(cal_path) else {}
    cal = {name: calibrate(args, env, steps_per_epoch, bf, earlier.get(name))
           for name, bf in (("moco", False), ("bf", True))}
    plan = {name: steps_for_budget(c, budget_s, steps_per_epoch, args.knn_points) for name, c in cal.items()}
    for name, c in cal.items():
        print(f"  {name}: {c['step_s']:.2f} s/step, monitor {c['monitor_s']:.1f} s, startup {c['startup_s']:.1f} s, "
              f"checkpoint+exit {c['checkpoint_exit_s']:.1f} s -> {plan[name]} steps "
              f"({plan[name] / steps_per_epoch:.2f} epochs) in {args.budget_min:g} min", flush=True)
    with open(cal_path, "w") as f:
        json.dump({"calibration": cal, "planned_steps": plan}, f, indent=1)

    records = []
    for seed in range(args.seeds):
        print(f"seed {seed}", flush=True)
        runs = {"moco": plan["moco"], "bf": plan["bf"]}
        if args.equal_steps:
            runs["bf-equal-steps"] = plan["moco"]
        records.append(pretrain_and_probe(args, env, "random-init", seed, None, None))
        for name, steps in runs.items():
            knn_every = max(1, math.ceil(steps / args.knn_points))
            cmd = train_cmd(args, os.path.join(args.out, "runs", f"seed{seed}", name), seed, name != "moco", steps,
                            steps_per_epoch, knn_every)
            records.append(pretrain_and_probe(args, env, name, seed, cmd,
                                              budget_s if name != "bf-equal-steps" else None))
    info["date_end"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    table = write_report(args.out, info, cal, records)
    print(table)
    print(f"results in {args.out}: results.md, results.json, knn_curve.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
