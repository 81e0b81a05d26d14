"""Is the bfcl backbone worth having when labels are few? CIFAR-10 at 1 %, 10 % and 100 % of the labels.

    make bench-downstream                                  # pretrain 15 min, then every score below
    .venv/bin/python bench/downstream.py --pretrained RUN/backbone.safetensors   # skip pretraining
    .venv/bin/python bench/downstream.py --sweep-lr 0.01,0.03,0.1,0.3 --out bench-results/downstream-sweep
                                                           # choose the pretrained start's fine-tuning lr

1. Pretraining (unless --pretrained): train.py with bench/quality.py's CIFAR-10 recipe (MoCo v3,
   ResNet-18, ImageNet stem at 32 px, 2 processes x 1 thread) at --mixed-precision auto, seed 0,
   calibrated to --pretrain-min of wall-clock as bench/quality.py does.
2. For each label fraction (--fractions; a class-balanced subset of train/ drawn from
   --subset-seed, the same for every run: probe.py --label-fraction) and each start (the
   pretrained backbone, and a random init of the same architecture): kNN (k 20) and fast-linear
   from one probe.py --mode quick run. The two starts' centre-crop features are fingerprinted
   (SHA-256), and the benchmark stops if they are equal: both arms would have loaded the same weights.
3. Calibration: a short timed fine-tuning run gives the seconds per step, the start-up and the
   final evaluation, and each fraction's --ft-min becomes a step count (the same for both starts).
4. Fine-tuning (probe.py --mode finetune), seeds 0..--seeds-1 on the same subset, each start with
   its own recipe (probe.py picks it: SimCLR's semi-supervised recipe for a pretrained ResNet,
   torchvision's from-scratch one for the random init; docs/finetune-recipes.md), and with
   BatchFormer in the classifier (--add_bf 1) at --bf-fractions for --bf-starts. Evaluated once,
   at the end.
5. Report: results.md (top-1 table, paired differences by seed, every run), results.json and
   downstream.svg (top-1 against label fraction, log x, one line per start and method).

Cost with the defaults (2 cores): pretraining 15 min + quick checks ~5 min + calibration ~1 min +
fine-tuning 2 seeds x 2 starts x (2 + 4 + 8 min) + BatchFormer 2 seeds x 2 starts x (2 + 4 min)
= about 1 h 45 min (the script prints its estimate at start; the budgets include each run's start-up
and final evaluation). Measured with --pretrained on 2 AMD EPYC (AVX2) cores, 2026-12-02: 86 minutes,
of which the six quick checks took 7.5 and the calibration 1.3
(docs/results.md#few-labels-pretrained-against-random-init).
--ft-min, --fractions, --bf-fractions, --bf-starts and --seeds trade cost for precision; --pretrained
saves the 15 minutes.

--sweep-lr runs only steps 1-3 and fine-tunes the pretrained start at --sweep-fraction once per
base lr and seed, writing sweep.md and sweep.json (4 lrs x 2 seeds x 4 min after a 15-minute
pretraining: 55 minutes on 2 AMD EPYC cores, 2026-12-02).

Outputs in --out: the above, pretrain/ (train.py's run), runs/<fraction>/<start>/quick/ and
runs/<fraction>/<start>[-bf]/seed<S>/ (probe.py's outputs and logs; checkpoints deleted). A rerun
with the same --out reuses finished runs whose command is unchanged.
"""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys

from cifar_pretraining import Setup, add_pretrain_options, backbone_of, pretrain
from downstream_report import write_report, write_sweep
from harness import (bench_parser, check_calibration_steps, check_data, fail, fresh_dir, launcher, now, reusable,
                     run, run_info, steps_in_budget, thread_env, time_short_run)

STARTS = ("pretrained", "random-init")
# Warm-up as a share of the run: torchvision's 5 of 90 epochs from scratch; none from a pretrained
# start (SimCLR appendix B.5, SimCLRv2 and BYOL fine-tune without warm-up).
WARMUP_SHARE = {"pretrained": 0.0, "random-init": 5 / 90}
KNN_K = 20  # k 200 is the pretraining monitor's; with 50 labels per class, 20 neighbours


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, "downstream")
    add_pretrain_options(p)
    p.add_argument("--fractions", type=floats, default=[0.01, 0.1, 1.0], help="label fractions, comma-separated")
    p.add_argument("--ft-min", type=floats, default=[2, 4, 8],
                   help="wall-clock minutes of each fine-tuning run, one per fraction")
    p.add_argument("--ft-steps", type=int, default=0,
                   help="fixed steps per fine-tuning run instead of --ft-min (no calibration; toy runs)")
    p.add_argument("--bf-fractions", type=floats, default=[0.01, 0.1],
                   help="fractions also fine-tuned with BatchFormer in the classifier ('' for none)")
    p.add_argument("--bf-starts", type=lambda t: [v for v in t.split(",") if v], default=list(STARTS),
                   help="starts also fine-tuned with BatchFormer, comma-separated")
    p.add_argument("--seeds", type=int, default=2, help="fine-tuning seeds 0..N-1 (the subset stays the same)")
    p.add_argument("--subset-seed", type=int, default=0, help="probe.py --subset-seed: which labelled images")
    p.add_argument("--batch-size", type=int, default=128, help="global fine-tuning batch (1 %% of CIFAR-10: 500)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--pretrained-lr", type=float, default=None,
                   help="base lr of the pretrained start's fine-tuning (default: its recipe's)")
    p.add_argument("--sweep-lr", type=floats, default=None, help="sweep mode: these base lrs, pretrained start")
    p.add_argument("--sweep-fraction", type=float, default=0.1, help="sweep mode: the label fraction")
    p.add_argument("--fast-epochs", type=int, default=100, help="probe.py --fast-epochs")
    p.add_argument("--precision", default="auto", help="probe.py and train.py --mixed-precision")
    p.add_argument("--calibration-steps", type=int, default=30, help="timed fine-tuning steps")
    args = p.parse_args(argv)
    check(args)
    return args


def check(args) -> None:
    if not all(0 < f <= 1 for f in args.fractions) or len(set(args.fractions)) != len(args.fractions):
        fail(f"--fractions {args.fractions}: distinct values in (0, 1], e.g. 0.01,0.1,1")
    if len(args.ft_min) != len(args.fractions):
        fail(f"--ft-min has {len(args.ft_min)} values for {len(args.fractions)} --fractions; give one per fraction")
    if not args.sweep_lr and not set(args.bf_fractions) <= set(args.fractions):
        fail(f"--bf-fractions {args.bf_fractions} must be among --fractions {args.fractions}")
    if not set(args.bf_starts) <= set(STARTS):
        fail(f"--bf-starts {','.join(args.bf_starts)}: choose among {','.join(STARTS)}")
    check_calibration_steps(args.calibration_steps)
    if args.seeds < 1:
        fail("--seeds must be at least 1")


def sweep_minutes(args) -> float:
    """--ft-min of the sweep's fraction if it is among --fractions, else the first --ft-min."""
    return dict(zip(args.fractions, args.ft_min)).get(args.sweep_fraction, args.ft_min[0])


def estimate_min(args) -> float:
    """Wall-clock minutes the benchmark should take (quick checks: about 5 minutes in all)."""
    pretrain = 0 if args.pretrained else args.pretrain_min
    if args.sweep_lr:
        return pretrain + 2 + len(args.sweep_lr) * args.seeds * sweep_minutes(args)
    runs = sum(m * args.seeds * (len(STARTS) + (len(args.bf_starts) if f in args.bf_fractions else 0))
               for f, m in zip(args.fractions, args.ft_min))
    return pretrain + 5 + 1 + runs


# ---- probe.py commands -----------------------------------------------------------------------

def start_flags(args, start: str) -> list[str]:
    return ["--pretrained", args.backbone] if start == "pretrained" else list(args.random_init)


def subset_flags(args, fraction: float) -> list[str]:
    return [] if fraction >= 1 else ["--label-fraction", repr(fraction), "--subset-seed", str(args.subset_seed)]


def quick_cmd(args, start: str, fraction: float, out_dir: str) -> list[str]:
    return [*launcher(args.procs), "probe.py", *start_flags(args, start), "--data", args.data,
            *subset_flags(args, fraction),
            "--mode", "quick", "--image-size", str(args.image_size), "--batch-size", "512", "--workers", "0",
            "--seed", "0", "--knn-k", str(KNN_K), "--fast-epochs", str(args.fast_epochs), "--save-features",
            "--mixed-precision", args.precision, "--output-dir", out_dir]


def finetune_cmd(args, start: str, fraction: float, seed: int, epochs: float, out_dir: str, bf: bool = False,
                 lr: float | None = None, extra=()) -> list[str]:
    lr = base_lr(args, start, lr)
    return [*launcher(args.procs), "probe.py", *start_flags(args, start), "--data", args.data,
            *subset_flags(args, fraction),
            "--mode", "finetune", "--image-size", str(args.image_size), "-b", str(args.batch_size),
            "--epochs", repr(epochs), "--warmup-epochs", repr(epochs * WARMUP_SHARE[start]),
            "--mixed-precision", args.precision, "--workers", "0", "--seed", str(seed), "--output-dir", out_dir,
            "--no-eval-epoch-ends", "--log-every", "10", "--save-every", "1000000", "--keep", "1",
            *(["--add_bf", "1"] if bf else []), *(["--lr", repr(lr)] if lr is not None else []), *extra]


def base_lr(args, start: str, lr: float | None) -> float | None:
    """The --lr to pass: the sweep's, else --pretrained-lr for the pretrained start, else None (the recipe's)."""
    return lr if lr is not None else args.pretrained_lr if start == "pretrained" else None


def subset_record(results: dict) -> dict:
    """What probe.py says about the labelled subset it used (size, per-class counts, SHA-256)."""
    found = {k: v for k, v in results.items() if k.startswith(("subset", "label"))}
    return {**found, "train_samples": results["train_samples"]}


# ---- the runs --------------------------------------------------------------------------------

def quick(args, env, start: str, fraction: float) -> dict:
    """kNN and fast-linear top-1 of one start at one fraction, and its features' fingerprint."""
    out = os.path.join(args.out, "runs", f"{fraction:g}", start, "quick")
    cmd = quick_cmd(args, start, fraction, out)
    record_path = os.path.join(out, "record.json")
    if (record := reusable(record_path, shlex.join(cmd))) is not None:
        return record
    fresh_dir(out)
    print(f"  {fraction:g} of the labels, {start}: kNN and fast-linear", flush=True)
    t = run(cmd, os.path.join(out, "probe.log"), env)
    results = json.load(open(os.path.join(out, "results.json")))
    features = os.path.join(out, "features.safetensors")
    with open(features, "rb") as f:  # train and val features: equal only if the weights were
        digest = hashlib.sha256(f.read()).hexdigest()
    os.remove(features)
    record = {"start": start, "fraction": fraction, "command": shlex.join(cmd), "wall_s": t["wall_s"],
              "loaded": results["pretrained"], "knn_top1": results["results"]["knn"][f"k{KNN_K}"]["top1"],
              "fast_linear_top1": results["results"]["fast_linear"]["top1"], "features_sha256": digest,
              "subset": subset_record(results)}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def calibrate(args, env, fraction: float) -> dict:
    """Seconds per fine-tuning step, start-up, and final evaluation + exit, from a short timed run."""
    n = args.calibration_steps
    out = os.path.join(args.out, "calibration")
    fresh_dir(out)
    cmd = finetune_cmd(args, "pretrained", fraction, 0, 1000.0, out, extra=["--max-steps", str(n), "--log-every", "5"])
    t = time_short_run(cmd, out, "probe.log", env, n)
    return {"step_s": t["step_s"], "startup_s": t["startup_s"], "final_eval_exit_s": t["last_window_s"] + t["exit_s"],
            "wall_s": t["wall_s"], "command": t["command"]}


def steps_for(args, cal: dict | None, minutes: float) -> int:
    if args.ft_steps:
        return args.ft_steps
    return steps_in_budget(minutes * 60, cal["step_s"], cal["startup_s"] + cal["final_eval_exit_s"])


def finetune(args, env, start: str, fraction: float, seed: int, steps: int, train_samples: int, bf: bool = False,
             lr: float | None = None, name: str | None = None) -> dict:
    steps_per_epoch = train_samples // args.batch_size
    if steps_per_epoch == 0:
        fail(f"{train_samples} labelled images at fraction {fraction:g} do not fill one batch of {args.batch_size}; "
             "lower --batch-size")
    epochs = steps / steps_per_epoch  # probe.py: total steps = round(steps_per_epoch * epochs) = steps
    out = os.path.join(args.out, "runs", f"{fraction:g}", name or (start + ("-bf" if bf else "")), f"seed{seed}")
    cmd = finetune_cmd(args, start, fraction, seed, epochs, out, bf, lr)
    record_path = os.path.join(out, "record.json")
    if (record := reusable(record_path, shlex.join(cmd))) is not None:
        return record
    fresh_dir(out)
    t = run(cmd, os.path.join(out, "probe.log"), env)
    results = json.load(open(os.path.join(out, "results.json")))
    ft = results["results"]["finetune"]
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    record = {"start": start, "fraction": fraction, "bf": bf, "seed": seed, "command": shlex.join(cmd),
              "loaded": results["pretrained"], "base_lr": base_lr(args, start, lr), "wall_s": t["wall_s"],
              "steps": ft["steps"], "epochs": epochs,
              "lr": ft["lr"], "recipe": ft["recipe"]["name"], "top1": ft["last"]["top1"], "top5": ft["last"]["top5"],
              "best_top1": ft["best"]["top1"], "subset": subset_record(results)}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"  {fraction:g}, {start}{' + BatchFormer' if bf else ''}, seed {seed}: top-1 {record['top1']:.2f} "
          f"({record['recipe']}, lr {record['lr']:.4g}, {record['steps']} steps, {record['wall_s'] / 60:.1f} min)",
          flush=True)
    return record


def check_arms_differ(quick_records: list[dict], backbone: str) -> None:
    """The pretrained arm loaded the backbone, the random arm did not, and their features differ."""
    for r in quick_records:
        want = backbone if r["start"] == "pretrained" else "random-init"
        if r["loaded"] != want:
            fail(f"the {r['start']} arm at {r['fraction']:g} loaded {r['loaded']}, expected {want}")
    for fraction in {r["fraction"] for r in quick_records}:
        digests = {r["start"]: r["features_sha256"] for r in quick_records if r["fraction"] == fraction}
        if len(digests) == 2 and len(set(digests.values())) == 1:
            fail(f"at {fraction:g} of the labels the pretrained and random-init features are identical: "
                 "both arms loaded the same weights")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    check_data(args.data)
    os.makedirs(args.out, exist_ok=True)
    env = thread_env(args.threads)
    info = {**run_info("bench/downstream.py", argv), "fractions": args.fractions, "ft_min": args.ft_min,
            "ft_steps": args.ft_steps, "bf_fractions": args.bf_fractions, "bf_starts": args.bf_starts,
            "seeds": args.seeds,
            "subset_seed": args.subset_seed, "batch_size": args.batch_size, "precision": args.precision,
            "estimate_min": round(estimate_min(args))}
    print(f"{info['date']} | {info['hardware']['cpu']}, {info['hardware']['cores']} cores | fractions "
          f"{', '.join(f'{f:g}' for f in args.fractions)} | about {info['estimate_min']} min", flush=True)
    if args.pretrained:
        args.backbone = os.path.abspath(args.pretrained)
    else:
        setup = Setup(args.data, os.path.join(args.out, "pretrain"), procs=args.procs,
                      train_args=f"--mixed-precision {args.precision}")
        args.backbone = pretrain(setup, env, args.pretrain_min)
    info["pretrained"] = args.backbone if args.pretrained else \
        f"train.py, CIFAR-10 recipe, {args.pretrain_min:g} min ({args.backbone})"
    family, args.random_init = backbone_of(args.backbone)
    info["random_init"] = shlex.join(args.random_init)

    fractions = [args.sweep_fraction] if args.sweep_lr else args.fractions
    starts = ("pretrained",) if args.sweep_lr else STARTS
    quick_records = [quick(args, env, start, f) for f in fractions for start in starts]
    check_arms_differ(quick_records, args.backbone)
    samples = {r["fraction"]: r["subset"]["train_samples"] for r in quick_records}
    cal = None if args.ft_steps else calibrate(args, env, max(fractions))
    info["calibration"] = cal
    if cal:
        print(f"calibration: {cal['step_s']:.3f} s/step, start-up {cal['startup_s']:.0f} s, final evaluation + exit "
              f"{cal['final_eval_exit_s']:.0f} s", flush=True)
    minutes = dict(zip(args.fractions, args.ft_min))

    if args.sweep_lr:
        f = args.sweep_fraction
        steps = steps_for(args, cal, sweep_minutes(args))
        records = [finetune(args, env, "pretrained", f, seed, steps, samples[f], lr=lr, name=f"sweep-lr{lr:g}")
                   for lr in args.sweep_lr for seed in range(args.seeds)]
        info["date_end"] = now()
        print(write_sweep(args.out, info, quick_records, records))
        return 0

    records = []
    for f in args.fractions:
        steps = steps_for(args, cal, minutes[f])
        for seed in range(args.seeds):
            for start in STARTS:
                for bf in (False, True) if f in args.bf_fractions and start in args.bf_starts else (False,):
                    records.append(finetune(args, env, start, f, seed, steps, samples[f], bf))
    info["date_end"] = now()
    print(write_report(args.out, info, quick_records, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
