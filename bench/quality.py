"""Does the trainer learn good features from real images? CIFAR-10, a fixed wall-clock budget per run.

    make bench-quality                                   # 15 min per pretraining run, 2 seeds
    make bench-quality BUDGET=5 SEEDS=3 OUT=bench-results/q5
    .venv/bin/python bench/quality.py --budget-min 15 --seeds 2 --bf-loss pairs-mean

For each seed, train.py pretrains on DATA/train (subprocesses of this Python, in the repo root):

  MoCo v3                                  RECIPE (bench/cifar_pretraining.py), for the budget
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
import json
import os
import shlex
import shutil
import sys

from cifar_pretraining import (WARMUP_SHARE, add_setup_options, calibrate, monitor_every, pretrain_and_probe,
                               setup_from, steps_for_budget, train_cmd)
from harness import bench_parser, check_calibration_steps, check_data, now, run_info, thread_env
from quality_report import write_report


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, "quality", type(
        "F", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    p.add_argument("--budget-min", type=float, default=15, help="wall-clock minutes per pretraining run")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1; mean ± std over them")
    p.add_argument("--no-equal-steps", dest="equal_steps", action="store_false",
                   help="skip the BatchFormer run at MoCo v3's step count (saves ~1.2x budget per seed)")
    p.add_argument("--fresh", action="store_true", help="delete --out's earlier runs instead of reusing them")
    add_setup_options(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    data, out = os.path.abspath(args.data), os.path.abspath(args.out)
    check_data(data)
    check_calibration_steps(args.calibration_steps)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    setup = setup_from(args, data, out)
    env = thread_env(args.threads)
    budget_s = args.budget_min * 60
    steps_per_epoch = setup.steps_per_epoch()
    info = {**run_info("bench/quality.py", argv), "data": data, "data_name": os.path.basename(os.path.normpath(data)),
            "budget_min": args.budget_min, "seeds": args.seeds,
            "recipe": shlex.join(setup.recipe()), "bf_loss": args.bf_loss, "bf_trainable": args.bf_trainable,
            "steps_per_epoch": steps_per_epoch, "warmup_share": WARMUP_SHARE,
            "launch": f"{args.procs} process(es) x {args.threads or 'default'} thread(s), "
                      f"{args.workers} loader workers each"}
    print(f"{info['date']} | {info['hardware']['cpu']}, {info['hardware']['cores']} cores | "
          f"{args.budget_min:g} min per run, {args.seeds} seed(s) | recipe: {info['recipe']}", flush=True)

    print("calibrating (short timed runs of each recipe)", flush=True)
    cal_path = os.path.join(out, "calibration.json")
    earlier = json.load(open(cal_path))["calibration"] if os.path.exists(cal_path) else {}
    cal = {name: calibrate(setup, env, steps_per_epoch, bf, earlier.get(name))
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
        records.append(pretrain_and_probe(setup, env, "random-init", seed, None, None))
        for name, steps in runs.items():
            cmd = train_cmd(setup, os.path.join(out, "runs", f"seed{seed}", name), seed, name != "moco", steps,
                            steps_per_epoch, monitor_every(setup, steps))
            records.append(pretrain_and_probe(setup, env, name, seed, cmd,
                                              budget_s if name != "bf-equal-steps" else None))
    info["date_end"] = now()
    table = write_report(out, info, cal, records)
    print(table)
    print(f"results in {out}: results.md, results.json, knn_curve.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
