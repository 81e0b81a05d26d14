"""Does continuing from existing weights beat pretraining from scratch? CIFAR-10 split by class (issue 34).

    make bench-continue                                       # about 1 h 50 min on 2 cores
    .venv/bin/python bench/continued_pretraining.py --budget-min 15 --seeds 2 --out bench-results/continue

1. Split: CIFAR-10's classes sorted by name, the first half the source (airplane automobile bird cat
   deer), the rest the target, each as a train.py --train-list file (source-train.txt,
   target-train.txt: paths relative to --data), and target/, an ImageFolder of the target classes
   (symlinked class folders) for the kNN monitor and probe.py.
2. Calibration: one timed run of bench/cifar_pretraining.py's CIFAR-10 recipe on the source list
   turns --budget-min into a step count S (cifar_pretraining calibrate / steps_for_budget). Source
   and target halves have the same size, so S is every pretraining run's length.
3. Source: train.py, the recipe, S steps on the source list, seed 0: the source backbone.
4. Target, seeds 0..--seeds-1, S steps each, the same recipe, the online kNN monitor on target/
   (--knn-points evaluations, step 0 included): (a) MoCo v3 from random init, (b) --init-from the
   source backbone (only the backbone: projector, predictor, optimizer and schedules fresh).
   (c) is the source backbone as it is.
5. Scores on the target classes: kNN (k 200) and fast-linear top-1 on target/val (probe.py --mode
   quick), and fine-tuning at --fraction of the target labels (probe.py --mode finetune, the same
   class-balanced subset for every run, --ft-min calibrated to steps as bench/downstream.py does),
   seeds 0..--seeds-1 for (c) and one fine-tuning per pretraining seed for (a) and (b).
6. Report (results.md, results.json): the table (mean ± std over seeds), (b) - (a) paired by seed,
   and how many target steps (b) needs to reach (a)'s final monitor kNN (the first monitor point of
   (b) at or above it). Goals (issue 34): (b) beats (a) by >= 5 kNN points and beats (c); (b) needs a
   quarter of (a)'s steps or fewer.

Cost with the defaults on 2 cores: pretraining (1 + 2 x 2) x 15 min + calibrations ~3 min + 5 quick
probes ~5 min + fine-tuning 6 x 4 min = about 1 h 50 min. Not yet run at full size; docs/results.md
gets the table when it is. Outputs in --out: split/, calibration*.json, runs/<arm>/seed<S>/ (train.py
and probe.py outputs, checkpoints deleted), finetune/, results.md, results.json. A rerun with the
same --out reuses finished runs whose command is unchanged.
"""

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import statistics
import sys

import downstream
from cifar_pretraining import Setup, calibrate, monitor_every, steps_for_budget, train_cmd
from downstream_report import signed
from harness import (DEFAULT_DATA, REPO, count_images, fail, fresh_dir, launcher, mean_std, now, read_metrics,
                     reusable, run, run_info, write_results)

ARMS = {"a": "random init, target", "b": "--init-from source, target", "c": "source, not continued"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data", default=DEFAULT_DATA, help="ImageFolder root with train/ and val/")
    p.add_argument("--out", default=os.path.join(REPO, "bench-results", "continue"), help="results folder")
    p.add_argument("--budget-min", type=float, default=15, help="wall-clock minutes the pretraining step count fits")
    p.add_argument("--steps", type=int, default=0, help="fixed pretraining steps instead of --budget-min (toy runs)")
    p.add_argument("--seeds", type=int, default=2, help="target seeds 0..N-1")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the target labels fine-tuned on")
    p.add_argument("--ft-min", type=float, default=4, help="wall-clock minutes of each fine-tuning run")
    p.add_argument("--ft-steps", type=int, default=0, help="fixed fine-tuning steps instead of --ft-min (toy runs)")
    p.add_argument("--ft-batch-size", type=int, default=128, help="global fine-tuning batch")
    p.add_argument("--batch-size", type=int, default=None, help="override the recipe's pretraining batch")
    p.add_argument("--train-args", default="", help="more train.py options after the recipe")
    p.add_argument("--knn-points", type=int, default=12, help="monitor evaluations per target run (+ step 0)")
    p.add_argument("--knn-samples", type=int, default=2000, help="monitor bank and query size")
    p.add_argument("--fast-epochs", type=int, default=100, help="probe.py --fast-epochs")
    p.add_argument("--precision", default="auto", help="probe.py --mixed-precision (train.py: the recipe's)")
    p.add_argument("--procs", type=int, default=2, help="processes (torchrun) per run")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--calibration-steps", type=int, default=30, help="timed steps of each calibration run")
    args = p.parse_args(argv)
    if not 0 < args.fraction <= 1:
        fail(f"--fraction {args.fraction} must be in (0, 1]")
    if args.seeds < 1:
        fail("--seeds must be at least 1")
    return args


def split(data: str, out: str) -> dict:
    """Source and target train lists (relative to data) and target/, the target classes' ImageFolder."""
    classes = sorted(d for d in os.listdir(os.path.join(data, "train")) if not d.startswith("."))
    if len(classes) < 2 or sorted(os.listdir(os.path.join(data, "val"))) != classes:
        fail(f"{data} needs the same (at least 2) class folders in train/ and val/")
    half = len(classes) // 2
    parts = {"source": classes[:half], "target": classes[half:]}
    root = os.path.join(out, "split")
    shutil.rmtree(root, ignore_errors=True)
    info = {}
    for part, names in parts.items():
        lines = [os.path.join("train", c, f) for c in names for f in sorted(os.listdir(os.path.join(data, "train", c)))
                 if not f.startswith(".")]
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, f"{part}-train.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        info[part] = {"classes": names, "list": path, "images": len(lines)}
    view = os.path.join(root, "target")
    for sub in ("train", "val"):
        os.makedirs(os.path.join(view, sub))
        for c in parts["target"]:
            os.symlink(os.path.join(data, sub, c), os.path.join(view, sub, c))
    info["target"]["folder"] = view
    return info


def pretrain_settings(args, train_list: str, knn_data: str, extra: str = "") -> Setup:
    """The recipe's Setup for train.py on one half, with the kNN monitor on the target classes."""
    return Setup(data=args.data, out=args.out, procs=args.procs, batch_size=args.batch_size,
                 train_args=f"--train-list {shlex.quote(train_list)} --knn-data {shlex.quote(knn_data)} "
                            f"{args.train_args} {extra}",
                 knn_points=args.knn_points, knn_samples=args.knn_samples, calibration_steps=args.calibration_steps)


def earlier_record(out_dir: str, cmd: list[str]) -> dict | None:
    """The record an earlier run of the same command left in out_dir; else None, and out_dir emptied."""
    record = reusable(os.path.join(out_dir, "record.json"), shlex.join(cmd))
    if record is None:
        fresh_dir(out_dir)
    return record


def pretrain(args, env, name: str, seed: int, train_list: str, steps: int, steps_per_epoch: int,
             extra: str = "") -> dict:
    """One train.py run of `steps` steps; its backbone, steps and monitor curve. Reused if unchanged."""
    run_dir = os.path.join(args.out, "runs", name, f"seed{seed}")
    setup = pretrain_settings(args, train_list, args.split["target"]["folder"], extra)
    cmd = train_cmd(setup, run_dir, seed, False, steps, steps_per_epoch, monitor_every(setup, steps))
    if (record := earlier_record(run_dir, cmd)) is not None:
        return record
    print(f"  {name}, seed {seed}: {steps} steps", flush=True)
    t = run(cmd, os.path.join(run_dir, "train.log"), env)
    backbone = os.path.join(run_dir, "backbone.safetensors")
    if not os.path.exists(backbone):
        fail(f"{name}, seed {seed}: no backbone in {run_dir}; see its train.log")
    metrics = read_metrics(run_dir)
    curve = [{"step": r["step"], "knn_top1": r["knn_top1"]} for r in metrics if "knn_top1" in r]
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    record = {"name": name, "seed": seed, "command": shlex.join(cmd), "backbone": backbone, "wall_s": t["wall_s"],
              "steps": max(r["step"] for r in metrics), "curve": curve}
    with open(os.path.join(run_dir, "record.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def quick(args, env, arm: str, seed: int, backbone: str) -> dict:
    """kNN (k 200) and fast-linear top-1 of a backbone on the target classes."""
    out = os.path.join(args.out, "runs", arm, f"seed{seed}", "quick")
    cmd = [*launcher(args.procs), "probe.py", "--pretrained", backbone, "--data", args.split["target"]["folder"],
           "--mode", "quick", "--image-size", "32", "--batch-size", "512", "--workers", "0", "--seed", str(seed),
           "--fast-epochs", str(args.fast_epochs), "--mixed-precision", args.precision, "--output-dir", out]
    if (record := earlier_record(out, cmd)) is not None:
        return record
    run(cmd, os.path.join(out, "probe.log"), env)
    results = json.load(open(os.path.join(out, "results.json")))["results"]
    record = {"arm": arm, "seed": seed, "command": shlex.join(cmd), "knn_top1": results["knn"]["k200"]["top1"],
              "fast_linear_top1": results["fast_linear"]["top1"]}
    with open(os.path.join(out, "record.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def finetune_settings(args, backbone: str) -> argparse.Namespace:
    """bench/downstream.py's fine-tuning settings on the target classes, starting from `backbone`."""
    return argparse.Namespace(data=args.split["target"]["folder"], out=os.path.join(args.out, "finetune"),
                              batch_size=args.ft_batch_size, image_size=32, precision=args.precision,
                              pretrained_lr=None, subset_seed=0, procs=args.procs, backbone=backbone,
                              calibration_steps=args.calibration_steps, ft_steps=args.ft_steps)


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    """The first monitored step whose kNN is at or above target (None: never within the run)."""
    return next((p["step"] for p in curve if p["knn_top1"] >= target), None)


def report(info: dict, pre: dict, scores: dict, ft: dict) -> tuple[str, dict]:
    """results.md's text and results.json's summary."""
    seeds = sorted({r["seed"] for r in pre["a"]})
    final = {arm: [r["curve"][-1]["knn_top1"] for r in pre[arm]] for arm in ("a", "b")}
    reach = [steps_to_reach(b["curve"], a["curve"][-1]["knn_top1"]) for a, b in zip(pre["a"], pre["b"])]
    steps = pre["a"][0]["steps"]
    rows = ["| arm | target steps | monitor kNN (final) | kNN k200 | fast-linear | fine-tune "
            f"{100 * info['fraction']:g} % |", "|---|---|---|---|---|---|"]
    for arm, label in ARMS.items():
        rows.append(f"| ({arm}) {label} | {steps if arm != 'c' else 0} | "
                    f"{mean_std(final[arm]) if arm in final else '–'} | "
                    f"{mean_std([r['knn_top1'] for r in scores[arm]])} | "
                    f"{mean_std([r['fast_linear_top1'] for r in scores[arm]])} | "
                    f"{mean_std([r['top1'] for r in ft[arm]])} |")
    paired = lambda key, recs, x, y: [b[key] - a[key] for a, b in zip(recs[x], recs[y])]
    knn_b_a = paired("knn_top1", scores, "a", "b")
    knn_b_c = [b["knn_top1"] - scores["c"][0]["knn_top1"] for b in scores["b"]]
    ft_b_a = paired("top1", ft, "a", "b")
    summary = {"knn_b_minus_a": knn_b_a, "knn_b_minus_c": knn_b_c, "finetune_b_minus_a": ft_b_a,
               "steps_b_needs_for_a_final_monitor_knn": reach, "a_steps": steps,
               "goal_b_beats_a_by_5_knn": bool(knn_b_a) and statistics.mean(knn_b_a) >= 5,
               "goal_b_beats_c": bool(knn_b_c) and statistics.mean(knn_b_c) > 0,
               "goal_quarter_of_steps": all(r is not None and r <= steps / 4 for r in reach)}
    text = "\n".join([
        f"# Continued pretraining on CIFAR-10's target classes ({info['date']})", "",
        f"`{info['command']}`", "",
        f"{info['hardware']['cpu']}, {info['hardware']['cores']} cores, git {info['git']}; source classes "
        f"{', '.join(info['split']['source']['classes'])}, target {', '.join(info['split']['target']['classes'])}; "
        f"{steps} steps per pretraining run; seeds {', '.join(map(str, seeds))}.", "", *rows, "",
        f"- (b) - (a), kNN k200: {signed(knn_b_a)} (goal >= +5); fine-tune: {signed(ft_b_a)}",
        f"- (b) - (c), kNN k200: {signed(knn_b_c)} (goal > 0)",
        f"- target steps (b) needs to reach (a)'s final monitor kNN: "
        f"{', '.join('not reached' if r is None else str(r) for r in reach)} of {steps} "
        f"(goal <= {steps // 4}); monitor every {math.ceil(steps / info['knn_points'])} steps", ""])
    return text, summary


def labelled_images(args, cls: str) -> int:
    """Labelled images of one target class at --fraction (probe.py --label-fraction's rule)."""
    from bfcl.subsets import per_class_count

    folder = os.path.join(args.data, "train", cls)
    return per_class_count(args.fraction, count_images(folder))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    if not all(os.path.isdir(os.path.join(args.data, part)) for part in ("train", "val")):
        fail(f"{args.data} needs train/ and val/ ImageFolders (CIFAR-10 as JPEGs, see ../shared/data/README.md)")
    os.makedirs(args.out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    info = {**run_info("bench/continued_pretraining.py", argv), "fraction": args.fraction, "seeds": args.seeds,
            "knn_points": args.knn_points}
    args.split = info["split"] = split(args.data, args.out)
    source_list, target_list = args.split["source"]["list"], args.split["target"]["list"]
    setup = pretrain_settings(args, source_list, args.split["target"]["folder"])
    batch = int(setup.recipe_value("-b"))
    steps_per_epoch = min(args.split["source"]["images"], args.split["target"]["images"]) // batch
    if steps_per_epoch == 0:
        fail(f"half of {args.data} does not fill one batch of {batch}; pass a smaller --batch-size")
    if args.steps:
        steps = args.steps
    else:
        setup = dataclasses.replace(setup, out=os.path.join(args.out, "calibration"))
        cal = calibrate(setup, env, steps_per_epoch, False, None)
        steps = steps_for_budget(cal, args.budget_min * 60, steps_per_epoch, args.knn_points)
        info["calibration"] = cal
    print(f"{info['date']} | {info['hardware']['cpu']} | {steps} steps per pretraining run", flush=True)
    info["steps"] = steps

    source = pretrain(args, env, "source", 0, source_list, steps, steps_per_epoch)
    pre = {"a": [pretrain(args, env, "a", s, target_list, steps, steps_per_epoch) for s in range(args.seeds)],
           "b": [pretrain(args, env, "b", s, target_list, steps, steps_per_epoch,
                          f"--init-from {shlex.quote(source['backbone'])}") for s in range(args.seeds)]}
    backbones = {"a": [r["backbone"] for r in pre["a"]], "b": [r["backbone"] for r in pre["b"]],
                 "c": [source["backbone"]] * args.seeds}
    scores = {arm: [quick(args, env, arm, s, paths[s]) for s in (range(args.seeds) if arm != "c" else [0])]
              for arm, paths in backbones.items()}
    ft_args = finetune_settings(args, source["backbone"])
    if args.ft_steps:
        ft_steps = args.ft_steps
    else:
        ft_steps = downstream.steps_for(ft_args, downstream.calibrate(ft_args, env, args.fraction), args.ft_min)
    samples = sum(labelled_images(args, c) for c in args.split["target"]["classes"])
    ft = {arm: [downstream.finetune(argparse.Namespace(**{**vars(ft_args), "backbone": paths[s]}), env, "pretrained",
                                    args.fraction, s, ft_steps, samples, name=arm) for s in range(args.seeds)]
          for arm, paths in backbones.items()}
    info["date_end"] = now()
    text, summary = report(info, {**pre, "source": source}, scores, ft)
    write_results(args.out, text, {"info": info, "summary": summary, "source": source, "pretraining": pre,
                                   "scores": scores, "finetune": ft})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
