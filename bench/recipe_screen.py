"""Which changes to the small-image recipe learn more per step? Each variant against the recipe at
equal steps, paired by seed.

    make bench-recipe                                          # the screen: 1 epoch per run, 1 seed
    .venv/bin/python bench/recipe_screen.py --steps 195 --variants crop-min-0.08,blur --out DIR
    .venv/bin/python bench/recipe_screen.py --steps 1161 --seeds 2 --variants crop-min-0.08+wd-1e-4 --out DIR

Every run is bench/quality.py's RECIPE (in bench/cifar_pretraining.py: ResNet-18, CIFAR-10 at 32 px,
batch 256, 2 processes x 1 thread, precision auto) with the variant's train.py flags (VARIANTS
below; 'a+b' applies both) for --steps steps, its schedules (warm-up 10 %, cosine lr and momentum)
fitted to that length.
probe.py scores each backbone: weighted kNN (k 200, T 0.07, all of train/ as the bank) and
fast-linear, the figures of `make bench-quality`. Counting steps, not minutes, makes a screen the
same on every machine; the wall-clock of each run is reported beside it.

A short screen favours what learns fast (a low base momentum, mild crops); read it as a
short-run ranking and confirm its winners at the target length (1,161 steps: the 15 minutes of
the README's results) with two seeds.

Outputs in --out: results.md (the table, command, hardware, date), results.json and runs/seed<S>/
<variant>/ (train.py and probe.py outputs). A rerun reuses every finished run whose command is
unchanged, so a screen grows a variant or a seed at a time. --no-recipe runs only the named
variants (a long confirmation whose recipe run already exists, e.g. the README's): the table then
ranks by kNN and has no paired differences.
"""

import argparse
import os
import shlex
import statistics
import sys

from cifar_pretraining import WARMUP_SHARE, monitor_every, pretrain_and_probe, setup_with_options, train_cmd
from harness import bench_parser, check_data, fail, mean_std, provenance, now, run_info, std, thread_env, write_results

# name -> train.py flags after the recipe; "{warmup}" becomes the run's warm-up in epochs.
VARIANTS = {
    "recipe": [],
    "crop-min-0.08": ["--crop-min", "0.08"],  # MoCo v3's ViT and SimCLR's crops
    "blur": ["--blur"],  # MoCo v3's ImageNet views; SimCLR drops blur on CIFAR
    "momentum-0.9": ["--moco-m", "0.9"],
    "momentum-0.99-short-warmup": ["--moco-m", "0.99", "--warmup-epochs", "{half-warmup}"],
    "mlp-4096": ["--moco-mlp-dim", "4096"],
    "mlp-1024": ["--moco-mlp-dim", "1024"],
    "wd-1e-4": ["--wd", "1e-4"],
    "lr-2.4": ["--lr", "2.4"],
    "lr-9.6": ["--lr", "9.6"],
    "t-0.1": ["--moco-t", "0.1"],
}
SCREEN = "crop-min-0.08,wd-1e-4,mlp-4096,momentum-0.9,blur"


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, "recipe-screen")
    p.add_argument("--steps", type=int, default=195, help="steps per pretraining run (195: one CIFAR-10 epoch)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, each variant paired with the recipe by seed")
    p.add_argument("--variants", default=SCREEN,
                   help=f"comma-separated, of {', '.join(VARIANTS)}; 'a+b' combines two "
                        "(the recipe runs first unless --no-recipe)")
    p.add_argument("--no-recipe", dest="with_recipe", action="store_false",
                   help="run only --variants (a long confirmation whose recipe run exists elsewhere); "
                        "the table then has no paired differences")
    p.add_argument("--quality-args", default="", help="more bench/quality.py recipe options, e.g. '--batch-size 64'")
    args = p.parse_args(argv)
    if args.steps < 1:
        fail(f"--steps {args.steps} must be at least 1")
    args.variant_list = variant_list(args.variants, args.with_recipe)
    if not args.variant_list:
        fail("--no-recipe with no --variants leaves nothing to run; name a variant with --variants")
    return args


def variant_list(spec: str, with_recipe: bool = True) -> list[str]:
    """'crop-min-0.08,blur+wd-1e-4' -> ['recipe', 'crop-min-0.08', 'blur+wd-1e-4']: the recipe first
    (unless with_recipe is False: then only what the spec names)."""
    names = ["recipe"] if with_recipe else []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        unknown = [part for part in item.split("+") if part not in VARIANTS]
        if unknown:
            fail(f"unknown variant {unknown[0]!r} in --variants; choose from {', '.join(VARIANTS)} (join two with '+')")
        if item not in names:
            names.append(item)
    return names


def flags(variant: str, epochs: float) -> list[str]:
    """The variant's train.py flags for a run of `epochs` epochs (train.py keeps a flag's last value)."""
    warmup = epochs * WARMUP_SHARE
    out = []
    for part in variant.split("+"):
        out += [f.replace("{half-warmup}", repr(warmup / 2)).replace("{warmup}", repr(warmup)) for f in VARIANTS[part]]
    return out


def report(info: dict, records: list[dict], variants: list[str], seeds: int) -> tuple[str, dict]:
    """The markdown table (each variant's kNN and fast-linear, and its paired difference from the
    recipe) and the summary: mean and std of the paired kNN difference, the ranking by it."""
    by = {(r["name"], r["seed"]): r for r in records}
    paired = "recipe" in variants  # without the recipe (--no-recipe) there is nothing to pair with
    rows = ["| variant | train.py flags | kNN top-1 | − recipe (paired) | fast-linear | − recipe (paired) "
            "| steps | wall-clock (min) |", "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in variants:
        rs = [by[(name, s)] for s in range(seeds)]
        summary[name] = {"knn_mean": statistics.mean(r["knn_top1"] for r in rs)}
        knn_cell = lin_cell = "–"
        if paired and name != "recipe":
            knn_diff = [r["knn_top1"] - by[("recipe", r["seed"])]["knn_top1"] for r in rs]
            lin_diff = [r["linear_top1"] - by[("recipe", r["seed"])]["linear_top1"] for r in rs]
            summary[name].update(knn_diff_mean=statistics.mean(knn_diff), knn_diff_std=std(knn_diff))
            knn_cell, lin_cell = mean_std(knn_diff), mean_std(lin_diff)
        rows.append(f"| {name} | `{shlex.join(flags(name, info['epochs'])) or '–'}` | "
                    f"{mean_std([r['knn_top1'] for r in rs])} | {knn_cell} | "
                    f"{mean_std([r['linear_top1'] for r in rs])} | {lin_cell} | "
                    f"{rs[0]['steps']} | {walls(rs)} |")
    key = "knn_diff_mean" if paired else "knn_mean"
    ranking = sorted((v for v in variants if v != "recipe"), key=lambda v: -summary[v][key])
    text = (f"# Recipe screen on {info['data_name']}: {info['steps']} steps per run ({info['epochs']:.2f} epochs), "
            f"{seeds} seed(s)\n\n" + "\n".join(provenance(info)) + f"\n- recipe: `{info['recipe']}`\n\n"
            + "\n".join(rows) +
            f"\n\nRanking by {'paired kNN difference' if paired else 'kNN (no recipe run here to pair with)'}: "
            f"{', '.join(ranking) or '–'}.\n")
    return text, {"summary": summary, "ranking": ranking}


def walls(records: list[dict]) -> str:
    return ", ".join(f"{r['wall_s'] / 60:.1f}" for r in records)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    check_data(args.data)
    setup = setup_with_options(args.quality_args, args.data, args.out, procs=args.procs, knn_points=3)
    env = thread_env(args.threads)
    steps_per_epoch = setup.steps_per_epoch()
    os.makedirs(args.out, exist_ok=True)
    epochs = args.steps / steps_per_epoch
    info = {**run_info("bench/recipe_screen.py", argv), "data": args.data,
            "data_name": os.path.basename(os.path.normpath(args.data)), "steps": args.steps, "epochs": epochs,
            "seeds": args.seeds, "recipe": shlex.join(setup.recipe()),
            "variants": {v: flags(v, epochs) for v in args.variant_list}}
    print(f"{info['date']} | {info['hardware']['cpu']} (bf16 {info['hardware']['bf16']}) | {info['data_name']}, "
          f"{args.steps} steps per run, {args.seeds} seed(s), variants {', '.join(args.variant_list)}", flush=True)
    records = []
    for seed in range(args.seeds):
        for name in args.variant_list:
            cmd = train_cmd(setup, os.path.join(args.out, "runs", f"seed{seed}", name), seed, False, args.steps,
                            steps_per_epoch, monitor_every(setup, args.steps), extra=flags(name, epochs))
            records.append(pretrain_and_probe(setup, env, name, seed, cmd, None))
    info["date_end"] = now()
    text, ranking = report(info, records, args.variant_list, args.seeds)
    write_results(args.out, text, {**info, "runs": records, **ranking})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
