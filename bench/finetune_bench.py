"""Does bfcl pretraining pay off when the whole network is trained? CIFAR-10 fine-tuning, equal time.

    make bench-finetune                                     # 15 min pretraining, 15 min per fine-tuning, 2 seeds
    make bench-finetune FT_BUDGET=10 OUT_FT=bench-results/finetune-10
    .venv/bin/python bench/finetune_bench.py --pretrained RUN/backbone.safetensors --budget-min 15   # skip pretraining

1. Pretraining (unless --pretrained): train.py with bench/quality.py's CIFAR-10 recipe (MoCo v3,
   ResNet-18, ImageNet stem at 32 px, precision auto, 2 processes x 1 thread), seed 0, calibrated to
   --pretrain-min of wall-clock exactly as bench/quality.py does.
2. Calibration: a short timed `probe.py --mode finetune` run gives the seconds per step, the
   start-up and the final evaluation, and the budget becomes a step count (as --epochs).
3. For each seed: fine-tune from (a) the pretrained backbone and (b) a random init, the same
   number of steps, each with its start's recipe as probe.py chooses it, the warm-up keeping the
   recipe's share of the shortened run (ResNets: the pretrained start SimCLR's semi-supervised
   recipe, no warm-up; the random init torchvision's reference, SGD momentum 0.9, lr 0.1 x
   batch/256, wd 1e-4, warm-up 5/90, label smoothing 0.1; a ViT gets DeiT's recipe, warm-up 5/150),
   batch 256, precision auto; evaluated once, at the end, on val/. The random init is the same backbone's.
4. Report: top-1/top-5 of the final model, mean +- std over seeds, and the paired difference.

Outputs in --out: results.md, results.json, pretrain/ (train.py's run), runs/seed<S>/<start>/
(probe.py's outputs and logs; checkpoints deleted, finetuned.safetensors kept). A rerun with the
same --out reuses finished runs whose command is unchanged.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys

from cifar_pretraining import OVERRUN_STOP, Setup, add_pretrain_options, backbone_of, pretrain
from harness import (bench_parser, check_calibration_steps, check_data, count_images, fail, fresh_dir, launcher,
                     mean_std, now, reusable, run, run_info, steps_in_budget, thread_env, time_short_run,
                     write_results)

BATCH = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, "finetune")
    add_pretrain_options(p)
    p.add_argument("--budget-min", type=float, default=15, help="wall-clock minutes per fine-tuning run")
    p.add_argument("--seeds", type=int, default=2, help="fine-tuning seeds 0..N-1")
    p.add_argument("--calibration-steps", type=int, default=30, help="timed fine-tuning steps")
    return p.parse_args(argv)


def finetune_cmd(args, start: str, out_dir: str, seed: int, epochs: float, extra=()) -> list[str]:
    what = ["--pretrained", start] if start != "random-init" else args.random_init
    return [*launcher(args.procs), "probe.py", *what, "--data", args.data, "--mode", "finetune", "--image-size", "32",
            "-b", str(BATCH), "--epochs", repr(epochs),
            "--mixed-precision", "auto", "--workers", "0", "--seed", str(seed), "--output-dir", out_dir,
            "--no-eval-epoch-ends", "--log-every", "10", "--save-every", "1000000", "--keep", "1", *extra]


def calibrate(args, env, start: str) -> dict:
    """Seconds per step, start-up, and final evaluation + exit of a short fine-tuning run."""
    n = args.calibration_steps
    out = os.path.join(args.out, "calibration")
    fresh_dir(out)
    cmd = finetune_cmd(args, start, out, 0, 100.0, ["--max-steps", str(n), "--log-every", "5"])
    t = time_short_run(cmd, out, "probe.log", env, n)
    return {"step_s": t["step_s"], "startup_s": t["startup_s"], "final_eval_exit_s": t["last_window_s"] + t["exit_s"],
            "wall_s": t["wall_s"], "command": t["command"]}


def finetune(args, env, start: str, path: str, seed: int, epochs: float, expected_s: float) -> dict:
    """One fine-tuning run, stopped at OVERRUN_STOP x its expected time: the budget, or longer where
    the minimum of 10 steps does not fit it (a tiny budget on a slow machine)."""
    run_dir = os.path.join(args.out, "runs", f"seed{seed}", start)
    cmd = finetune_cmd(args, path, run_dir, seed, epochs)
    record_path = os.path.join(run_dir, "record.json")
    if (record := reusable(record_path, shlex.join(cmd))) is not None:
        print(f"  {start}, seed {seed}: reusing {record_path}", flush=True)
        return record
    fresh_dir(run_dir)
    print(f"  {start}, seed {seed}: fine-tuning", flush=True)
    t = run(cmd, os.path.join(run_dir, "probe.log"), env, max(args.budget_min * 60, expected_s) * OVERRUN_STOP)
    results_path = os.path.join(run_dir, "results.json")
    if not os.path.exists(results_path):
        fail(f"{start}, seed {seed}: no results.json; see {run_dir}/probe.log")
    result = json.load(open(results_path))["results"]["finetune"]
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    record = {"start": start, "seed": seed, "command": shlex.join(cmd), "wall_s": t["wall_s"],
              "stopped_at_budget": t["stopped_at_budget"], "steps": result["steps"],
              "top1": result["last"]["top1"], "top5": result["last"]["top5"], "best_top1": result["best"]["top1"]}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"  {start}, seed {seed}: top-1 {record['top1']:.2f}, {record['steps']} steps, "
          f"{record['wall_s'] / 60:.1f} min", flush=True)
    return record


def report(args, info: dict, records: list[dict]) -> str:
    rows = ["| start | top-1 | top-5 | steps | wall-clock (min) | seeds |", "|---|---|---|---|---|---|"]
    for start in ("pretrained", "random-init"):
        rs = [r for r in records if r["start"] == start]
        rows.append(f"| {start} | {mean_std([r['top1'] for r in rs], always_std=True)} | "
                    f"{mean_std([r['top5'] for r in rs], always_std=True)} | "
                    f"{rs[0]['steps']} | {statistics.mean(r['wall_s'] for r in rs) / 60:.1f} | {len(rs)} |")
    diffs = [p["top1"] - r["top1"] for p in records if p["start"] == "pretrained"
             for r in records if r["start"] == "random-init" and r["seed"] == p["seed"]]
    text = (f"# Fine-tuning on {os.path.basename(os.path.normpath(args.data))}: bfcl-pretrained vs random init, "
            f"{args.budget_min:g} min each\n\n"
            f"`{info['command']}`, {info['hardware']['cpu']} ({info['hardware']['cores']} cores), "
            f"{info['date']} to {info['date_end']}, code {info['git']}.\n"
            f"Pretrained backbone: {info['pretrained']}.\n\n" + "\n".join(rows) +
            f"\n\nPretrained − random init, top-1, paired by seed: {mean_std(diffs, always_std=True)} points.\n")
    write_results(args.out, text, {**info, "records": records, "paired_top1_difference": diffs})
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    check_data(args.data)
    check_calibration_steps(args.calibration_steps)
    os.makedirs(args.out, exist_ok=True)
    env = thread_env(args.threads)
    info = {**run_info("bench/finetune_bench.py", argv), "budget_min": args.budget_min, "seeds": args.seeds}
    print(f"{info['date']} | {info['hardware']['cpu']}, {info['hardware']['cores']} cores | "
          f"fine-tuning {args.budget_min:g} min per run, {args.seeds} seed(s)", flush=True)
    if args.pretrained:
        path = os.path.abspath(args.pretrained)
    else:
        path = pretrain(Setup(args.data, os.path.join(args.out, "pretrain"), procs=args.procs), env, args.pretrain_min)
    info["pretrained"] = path if args.pretrained else f"train.py, CIFAR-10 recipe, {args.pretrain_min:g} min ({path})"
    args.family, args.random_init = backbone_of(path)
    info["random_init"] = shlex.join(args.random_init)
    steps_per_epoch = count_images(os.path.join(args.data, "train")) // BATCH
    cal = calibrate(args, env, path)
    steps = steps_in_budget(args.budget_min * 60, cal["step_s"], cal["startup_s"] + cal["final_eval_exit_s"])
    epochs = steps / steps_per_epoch
    expected_s = cal["startup_s"] + steps * cal["step_s"] + cal["final_eval_exit_s"]
    info.update(calibration=cal, steps=steps)
    print(f"calibration: {cal['step_s']:.3f} s/step, start-up {cal['startup_s']:.0f} s, final evaluation + exit "
          f"{cal['final_eval_exit_s']:.0f} s -> {steps} steps ({epochs:.2f} epochs) in {args.budget_min:g} min",
          flush=True)
    records = []
    for seed in range(args.seeds):
        for start in ("pretrained", "random-init"):
            records.append(finetune(args, env, start, path if start == "pretrained" else "random-init", seed, epochs,
                                    expected_s))
    info["date_end"] = now()
    print(report(args, info, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
