"""Does bfcl pretraining pay off when the whole network is trained? CIFAR-10 fine-tuning, equal time.

    make bench-finetune                                     # 15 min pretraining, 15 min per fine-tuning, 2 seeds
    make bench-finetune FT_BUDGET=10 OUT_FT=bench-results/finetune-10
    .venv/bin/python bench/finetune.py --pretrained RUN/backbone.safetensors --budget-min 15   # skip pretraining

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
import datetime
import json
import math
import os
import shlex
import statistics
import sys

import quality
from quality import REPO, count_images, fail, git_commit, hardware, launcher, run

BATCH = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data", default=quality.DEFAULT_DATA, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", default=os.path.join(REPO, "bench-results", "finetune"), help="results folder")
    p.add_argument("--pretrained", default=None, help="a backbone to start from instead of pretraining one")
    p.add_argument("--pretrain-min", type=float, default=15, help="wall-clock minutes of MoCo v3 pretraining")
    p.add_argument("--budget-min", type=float, default=15, help="wall-clock minutes per fine-tuning run")
    p.add_argument("--seeds", type=int, default=2, help="fine-tuning seeds 0..N-1")
    p.add_argument("--procs", type=int, default=2, help="processes (torchrun) per run")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--calibration-steps", type=int, default=30, help="timed fine-tuning steps")
    return p.parse_args(argv)


def pretrain(args, env, train_args: str = "") -> str:
    """train.py with the CIFAR-10 recipe (plus train_args) for --pretrain-min; returns its backbone.safetensors.
    Also bench/downstream.py's pretraining."""
    q = quality.parse_args(["--data", args.data, "--out", os.path.join(args.out, "pretrain"), "--budget-min",
                            str(args.pretrain_min), "--seeds", "1", "--procs", str(args.procs), "--threads",
                            str(args.threads)] + (["--train-args", train_args] if train_args else []))
    os.makedirs(q.out, exist_ok=True)
    batch = int(quality.recipe_value(q, "-b"))
    steps_per_epoch = count_images(os.path.join(args.data, "train")) // batch
    cal_path = os.path.join(q.out, "calibration.json")
    earlier = json.load(open(cal_path)) if os.path.exists(cal_path) else None
    cal = quality.calibrate(q, env, steps_per_epoch, False, earlier)
    with open(cal_path, "w") as f:
        json.dump(cal, f, indent=1)
    steps = quality.steps_for_budget(cal, q.budget_min * 60, steps_per_epoch, q.knn_points)
    run_dir = os.path.join(q.out, "run")
    cmd = quality.train_cmd(q, run_dir, 0, False, steps, steps_per_epoch, max(1, math.ceil(steps / q.knn_points)))
    export = os.path.join(run_dir, "backbone.safetensors")
    record_path = os.path.join(run_dir, "record.json")
    if os.path.exists(record_path) and json.load(open(record_path))["command"] == shlex.join(cmd):
        print(f"pretraining: reusing {export}", flush=True)
        return export
    print(f"pretraining: {steps} steps ({steps / steps_per_epoch:.2f} epochs) in {args.pretrain_min:g} min", flush=True)
    quality.shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    t = run(cmd, os.path.join(run_dir, "train.log"), env, q.budget_min * 60 * quality.OVERRUN_STOP)
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


def finetune_cmd(args, start: str, out_dir: str, seed: int, epochs: float, extra=()) -> list[str]:
    what = ["--pretrained", start] if start != "random-init" else args.random_init
    return [*launcher(args), "probe.py", *what, "--data", args.data, "--mode", "finetune", "--image-size", "32",
            "-b", str(BATCH), "--epochs", repr(epochs),
            "--mixed-precision", "auto", "--workers", "0", "--seed", str(seed), "--output-dir", out_dir,
            "--no-eval-epoch-ends", "--log-every", "10", "--save-every", "1000000", "--keep", "1", *extra]


def calibrate(args, env, start: str, steps_per_epoch: int) -> dict:
    """Seconds per step, start-up, and final evaluation + exit of a short fine-tuning run."""
    n = args.calibration_steps
    out = os.path.join(args.out, "calibration")
    quality.shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cmd = finetune_cmd(args, start, out, 0, 100.0, ["--max-steps", str(n), "--log-every", "5"])
    t = run(cmd, os.path.join(out, "probe.log"), env)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    times = {r["step"]: r["time"] for r in records}
    step_s = statistics.median((times[s] - times[s - 5]) / 5 for s in range(10, n, 5))
    startup_s = times[5] - t["start"] - 5 * step_s
    final_s = t["start"] + t["wall_s"] - times[n - 5] - 5 * step_s  # last steps' window holds the evaluation
    return {"step_s": step_s, "startup_s": startup_s, "final_eval_exit_s": final_s, "wall_s": t["wall_s"],
            "command": shlex.join(cmd)}


def finetune(args, env, start: str, path: str, seed: int, epochs: float, expected_s: float) -> dict:
    """One fine-tuning run, stopped at OVERRUN_STOP x its expected time: the budget, or longer where
    the minimum of 10 steps does not fit it (a tiny budget on a slow machine)."""
    run_dir = os.path.join(args.out, "runs", f"seed{seed}", start)
    cmd = finetune_cmd(args, path, run_dir, seed, epochs)
    record_path = os.path.join(run_dir, "record.json")
    if os.path.exists(record_path):
        record = json.load(open(record_path))
        if record["command"] == shlex.join(cmd):
            print(f"  {start}, seed {seed}: reusing {record_path}", flush=True)
            return record
    quality.shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    print(f"  {start}, seed {seed}: fine-tuning", flush=True)
    t = run(cmd, os.path.join(run_dir, "probe.log"), env, max(args.budget_min * 60, expected_s) * quality.OVERRUN_STOP)
    results_path = os.path.join(run_dir, "results.json")
    if not os.path.exists(results_path):
        fail(f"{start}, seed {seed}: no results.json; see {run_dir}/probe.log")
    result = json.load(open(results_path))["results"]["finetune"]
    quality.shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    record = {"start": start, "seed": seed, "command": shlex.join(cmd), "wall_s": t["wall_s"],
              "stopped_at_budget": t["stopped_at_budget"], "steps": result["steps"],
              "top1": result["last"]["top1"], "top5": result["last"]["top5"], "best_top1": result["best"]["top1"]}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"  {start}, seed {seed}: top-1 {record['top1']:.2f}, {record['steps']} steps, "
          f"{record['wall_s'] / 60:.1f} min", flush=True)
    return record


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def report(args, info: dict, records: list[dict]) -> str:
    rows = ["| start | top-1 | top-5 | steps | wall-clock (min) | seeds |", "|---|---|---|---|---|---|"]
    for start in ("pretrained", "random-init"):
        rs = [r for r in records if r["start"] == start]
        rows.append(f"| {start} | {mean_std([r['top1'] for r in rs])} | {mean_std([r['top5'] for r in rs])} | "
                    f"{rs[0]['steps']} | {statistics.mean(r['wall_s'] for r in rs) / 60:.1f} | {len(rs)} |")
    diffs = [p["top1"] - r["top1"] for p in records if p["start"] == "pretrained"
             for r in records if r["start"] == "random-init" and r["seed"] == p["seed"]]
    text = (f"# Fine-tuning on {os.path.basename(os.path.normpath(args.data))}: bfcl-pretrained vs random init, "
            f"{args.budget_min:g} min each\n\n"
            f"`{info['command']}`, {info['hardware']['cpu']} ({info['hardware']['cores']} cores), "
            f"{info['date']} to {info['date_end']}, code {info['git']}.\n"
            f"Pretrained backbone: {info['pretrained']}.\n\n" + "\n".join(rows) +
            f"\n\nPretrained − random init, top-1, paired by seed: {mean_std(diffs)} points.\n")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({**info, "records": records, "paired_top1_difference": diffs}, f, indent=1)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    if not all(os.path.isdir(os.path.join(args.data, part)) for part in ("train", "val")):
        fail(f"{args.data} needs train/ and val/ ImageFolders (CIFAR-10 as JPEGs, see ../shared/data/README.md)")
    if args.calibration_steps < 15 or args.calibration_steps % 5:
        fail(f"--calibration-steps {args.calibration_steps} must be a multiple of 5, at least 15")
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    command = [os.path.relpath(sys.executable, REPO), "bench/finetune.py", *(argv or sys.argv[1:])]
    info = {"command": shlex.join(command),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "hardware": hardware(),
            "git": git_commit(), "budget_min": args.budget_min, "seeds": args.seeds}
    print(f"{info['date']} | {info['hardware']['cpu']}, {info['hardware']['cores']} cores | "
          f"fine-tuning {args.budget_min:g} min per run, {args.seeds} seed(s)", flush=True)
    path = os.path.abspath(args.pretrained) if args.pretrained else pretrain(args, env)
    info["pretrained"] = path if args.pretrained else f"train.py, CIFAR-10 recipe, {args.pretrain_min:g} min ({path})"
    args.family, args.random_init = backbone_of(path)
    info["random_init"] = shlex.join(args.random_init)
    steps_per_epoch = count_images(os.path.join(args.data, "train")) // BATCH
    cal = calibrate(args, env, path, steps_per_epoch)
    steps = max(10, int((args.budget_min * 60 - cal["startup_s"] - cal["final_eval_exit_s"]) / cal["step_s"]))
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
    info["date_end"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(report(args, info, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
