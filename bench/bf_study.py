"""When does BatchFormer help? Each variant against MoCo v3 at equal wall-clock, paired by seed.

    make bench-bf                                   # screen, confirm the best two, trend (hours on 2 cores)
    .venv/bin/python bench/bf_study.py --budget-min 5 --seeds 2 --out bench-results/bf-screen
    .venv/bin/python bench/bf_study.py --budget-min 15 --seeds 3 --variants released,pairs-mean --out DIR

Every run is bench/quality.py's recipe (RECIPE in bench/cifar_pretraining.py: ResNet-18, CIFAR-10,
2 processes x 1 thread, precision auto) with the variant's train.py flags (VARIANTS below), for the
same wall-clock budget as the MoCo v3 run of its seed; probe.py scores each backbone (kNN k 200, fast-linear).

Equal time must be equal. Each variant is calibrated against MoCo v3 in interleaved rounds
(MoCo, variant, MoCo, variant, ...; --calibration-rounds), and its step time is the median of
its rounds, so a load change on a shared machine hits both alike. Every run's real wall-clock
is reported beside its score, and a run that overran its budget by more than --overrun-flag is
marked in the table ("overran"). --equal-steps adds each variant at its seed's MoCo v3 step count
(a run named VARIANT@moco-steps, only where the budgets gave different counts) and a column for it.

Outputs in --out: results.md (the table, titled with the data set's folder name, command,
hardware, date), results.json, knn_curve.svg (online kNN against wall-clock and steps, every
variant), runs/ and calibration/ (train.py and probe.py outputs), calibration.json. A rerun
reuses every calibration run and finished run whose command is unchanged, so a study grows in
steps: --seeds 1 now, --seeds 2 later into the same --out trains only seed 1.
"""

import argparse
import json
import os
import shlex
import statistics
import sys

import cifar_pretraining
from cifar_pretraining import (WARMUP_SHARE, monitor_every, pretrain_and_probe, setup_with_options,
                               steps_for_budget, train_cmd)
from harness import bench_parser, fail, mean_std, provenance, now, run_info, std, thread_env, write_results
from quality_report import svg

# name -> train.py flags after the recipe. "{warmup}" becomes the run's warm-up length in epochs.
VARIANTS = {
    "released": ["--bf-loss", "pairs-sum"],  # --add_bf 1: 8 terms summed, frozen at init
    "pairs-mean": ["--bf-loss", "pairs-mean"],
    "joint": ["--bf-loss", "joint"],
    "trainable-0.1": ["--bf-loss", "pairs-sum", "--bf-trainable", "--bf-lr-scale", "0.1"],
    "trainable-1": ["--bf-loss", "pairs-sum", "--bf-trainable", "--bf-lr-scale", "1"],
    "after-warmup": ["--bf-loss", "pairs-sum", "--bf-start-epoch", "{warmup}"],
    "global": ["--bf-loss", "pairs-sum", "--bf-context", "global"],
}
# The report's title and --out's default folder (bench/multicrop.py runs this study with its own arms).
TITLE, RESULTS = "BatchFormer variants", "bf-study"
COLOURS = ("#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, RESULTS)
    p.add_argument("--budget-min", type=float, default=5, help="wall-clock minutes per pretraining run")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1, each variant paired with MoCo v3 by seed")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS)}; 'best:K:RESULTS_JSON' adds the K best of an "
                        "earlier stage's ranking")
    p.add_argument("--calibration-rounds", type=int, default=2, help="interleaved MoCo/variant calibration rounds")
    p.add_argument("--calibration-steps", type=int, default=30, help="timed steps per calibration run")
    p.add_argument("--equal-steps", action="store_true",
                   help="also train each variant for its seed's MoCo v3 step count (where the two differ)")
    p.add_argument("--overrun-flag", type=float, default=0.05, help="mark runs over budget by more than this share")
    p.add_argument("--quality-args", default="",
                   help="more bench/quality.py recipe options (--batch-size, --train-args, --knn-points, ...), "
                        "e.g. '--batch-size 64 --knn-points 2' for small data")
    args = p.parse_args(argv)
    args.variant_list = variant_list(args.variants)
    return args


def variant_list(spec: str) -> list[str]:
    """'a,b,best:2:stage1/results.json' -> [a, b, the two best of stage 1 not already named]."""
    names = []
    for item in spec.split(","):
        if item.startswith("best:"):
            _, k, path = item.split(":", 2)
            if not os.path.exists(path):
                fail(f"{path} does not exist; run the screening stage first")
            ranking = json.load(open(path))["ranking"]
            names += [v for v in ranking if v not in names][:int(k)]
        elif item not in names:
            names.append(item)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        fail(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    return names


def setup_of(args) -> cifar_pretraining.Setup:
    """bench/quality.py's recipe and run options for this study (--quality-args on top), so that its
    calibration and runs can be reused."""
    return setup_with_options(args.quality_args, args.data, args.out, procs=args.procs,
                              calibration_steps=args.calibration_steps)


def flags(variant: str, epochs: float) -> list[str]:
    return [f.replace("{warmup}", repr(epochs * WARMUP_SHARE)) for f in VARIANTS[variant]]


def switches_on_late(variant: str) -> bool:
    return any("{warmup}" in f for f in VARIANTS[variant])


def calibrate(setup, env, steps_per_epoch: int, variants: list[str], rounds_count: int, path: str) -> dict:
    """Step times of MoCo v3 and each variant, measured in interleaved rounds; medians. Every
    calibration run is saved in path as it ends and reused when its command is unchanged, so an
    interrupted or extended study (more seeds) keeps its step counts and its runs.

    A variant that switches BatchFormer on after the warm-up is timed switched on from the start
    (its timed steps would otherwise be plain MoCo v3 steps); its run's step time is then MoCo v3's
    for the warm-up share of the run and its own for the rest."""
    saved = json.load(open(path)) if os.path.exists(path) else {}
    rounds = {name: [] for name in ["moco", *variants]}
    for r in range(rounds_count):
        for name in rounds:
            extra = [] if name == "moco" else flags(name, 0.0)
            key = f"{name}-{r}"
            saved[key] = cifar_pretraining.calibrate(setup, env, steps_per_epoch, False, saved.get(key), key, extra)
            rounds[name].append(saved[key])
            with open(path + ".tmp", "w") as f:
                json.dump(saved, f, indent=1)
            os.replace(path + ".tmp", path)
    cal = {}
    for name, runs in rounds.items():
        median = {k: statistics.median(run[k] for run in runs) for k in ("step_s", "monitor_s", "startup_s",
                                                                            "checkpoint_exit_s")}
        cal[name] = {**median, "rounds_step_s": [run["step_s"] for run in runs]}
    for name in filter(switches_on_late, variants):
        cal[name]["step_s"] = WARMUP_SHARE * cal["moco"]["step_s"] + (1 - WARMUP_SHARE) * cal[name]["step_s"]
    return cal


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    variants = args.variant_list
    setup = setup_of(args)
    os.makedirs(args.out, exist_ok=True)
    env = thread_env(args.threads)
    steps_per_epoch = setup.steps_per_epoch()
    budget_s = args.budget_min * 60
    info = {**run_info("bench/bf_study.py", argv), "data": args.data,
            "data_name": os.path.basename(os.path.normpath(args.data)), "budget_min": args.budget_min,
            "seeds": args.seeds, "recipe": shlex.join(setup.recipe()), "variants": {v: VARIANTS[v] for v in variants}}
    print(f"{info['date']} | {info['hardware']['cpu']} | {info['data_name']}, {args.budget_min:g} min per run, "
          f"{args.seeds} seed(s), variants {', '.join(variants)}", flush=True)
    cal = calibrate(setup, env, steps_per_epoch, variants, args.calibration_rounds,
                    os.path.join(args.out, "calibration.json"))
    plan = {name: steps_for_budget(c, budget_s, steps_per_epoch, setup.knn_points) for name, c in cal.items()}
    for name, c in cal.items():
        print(f"  {name}: {c['step_s']:.2f} s/step (rounds {', '.join(f'{s:.2f}' for s in c['rounds_step_s'])}) "
              f"-> {plan[name]} steps", flush=True)

    def train_and_probe(name: str, variant: str, steps: int, seed: int, budget: float | None) -> dict:
        extra = [] if variant == "moco" else flags(variant, steps / steps_per_epoch)
        cmd = train_cmd(setup, os.path.join(args.out, "runs", f"seed{seed}", name), seed, False, steps,
                        steps_per_epoch, monitor_every(setup, steps), extra=extra)
        return pretrain_and_probe(setup, env, name, seed, cmd, budget)

    records = []
    for seed in range(args.seeds):
        for name in ["moco", *variants]:
            records.append(train_and_probe(name, name, plan[name], seed, budget_s))
        if args.equal_steps:  # where a variant's budget gave MoCo v3's step count, its run already is this one
            for name in variants:
                if plan[name] != plan["moco"]:
                    records.append(train_and_probe(equal_steps_name(name), name, plan["moco"], seed, None))
    info["date_end"] = now()
    print(report(args, info, cal, records, variants))
    return 0


def report(args, info: dict, cal: dict, records: list[dict], variants: list[str]) -> str:
    by = {(r["name"], r["seed"]): r for r in records}
    seeds = range(args.seeds)
    rows = ["| variant | kNN top-1 | − MoCo v3 (paired) | fast-linear | − MoCo v3 (paired) | steps "
            "| wall-clock (min) |" + (" kNN − MoCo v3 at equal steps (paired) |" if args.equal_steps else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if args.equal_steps else "")]
    summary = {}

    def cell(values: list[float]) -> str:  # '± 0.0' for one seed, too: a paired column reads the same at any count
        return mean_std(values, always_std=True)

    for name in ["moco", *variants]:
        rs = [by[(name, s)] for s in seeds]
        knn_diff = [by[(name, s)]["knn_top1"] - by[("moco", s)]["knn_top1"] for s in seeds]
        lin_diff = [by[(name, s)]["linear_top1"] - by[("moco", s)]["linear_top1"] for s in seeds]
        over = [r for r in rs if r["wall_s"] > args.budget_min * 60 * (1 + args.overrun_flag)]
        walls = ", ".join(f"{r['wall_s'] / 60:.1f}" for r in rs) + (" (overran)" if over else "")
        summary[name] = {"knn_diff_mean": statistics.mean(knn_diff), "knn_diff_std": std(knn_diff)}
        rows.append(f"| {name} | {cell([r['knn_top1'] for r in rs])} | "
                    f"{'–' if name == 'moco' else cell(knn_diff)} | "
                    f"{cell([r['linear_top1'] for r in rs])} | "
                    f"{'–' if name == 'moco' else cell(lin_diff)} | {rs[0]['steps']} | {walls} |")
        if args.equal_steps:
            same = [by.get((equal_steps_name(name), s), by[(name, s)]) for s in seeds]
            steps_diff = [r["knn_top1"] - by[("moco", s)]["knn_top1"] for r, s in zip(same, seeds)]
            summary[name].update(knn_diff_equal_steps_mean=statistics.mean(steps_diff),
                                 knn_diff_equal_steps_std=std(steps_diff))
            rows[-1] += f" {'–' if name == 'moco' else cell(steps_diff)} |"
    best = sorted(variants, key=lambda v: -summary[v]["knn_diff_mean"])
    wins = [v for v in variants if summary[v]["knn_diff_mean"] > 2 * summary[v]["knn_diff_std"] > 0]
    text = (f"# {TITLE} on {info['data_name']}, {args.budget_min:g} min per run, "
            f"{args.seeds} seed(s)\n\n" + "\n".join(provenance(info)) + f"\n- recipe: `{info['recipe']}`\n\n"
            + "\n".join(rows) +
            f"\n\nBest by paired kNN difference: {', '.join(best)}. Beating MoCo v3 by more than twice the paired "
            f"std: {', '.join(wins) or 'none'}.\n")
    write_results(args.out, text, {**info, "calibration": cal, "runs": records, "summary": summary, "ranking": best})
    series = {"moco": ("MoCo v3", "#1f77b4"), **{v: (v, COLOURS[i % len(COLOURS)]) for i, v in enumerate(variants)}}
    with open(os.path.join(args.out, "knn_curve.svg"), "w") as f:
        f.write(svg(records, f"{info['data_name']}, {args.budget_min:g} min per run: {TITLE}", series))
    return text


def equal_steps_name(variant: str) -> str:
    return f"{variant}@moco-steps"


if __name__ == "__main__":
    sys.exit(main())
