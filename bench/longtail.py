"""BatchFormer where its paper wins: long-tailed data. CIFAR-10-LT (R = 100, 12,406 training images),
in pretraining and in the fine-tuned classifier, against a Balanced Softmax baseline.

    make bench-longtail                                    # everything below: about 2 h on 2 cores
    .venv/bin/python bench/longtail.py --pretrain-steps 1161 --ft-min 4 --out bench-results/longtail-long

1. The long-tailed subset, once: probe.py's --imbalance R --subset-seed S (bfcl.longtail through
   bfcl.subsets.label_subset) on --data/train, written to OUT/train_list.txt (relative to train/).
   Every run below trains on exactly these images: train.py --data DATA/train --train-list, and
   probe.py --imbalance R --subset-seed S, whose train_list.txt must hash the same (checked). val/
   stays balanced.
2. Pretraining on the long-tailed images (labels unused), bench/quality.py's recipe (MoCo v3,
   ResNet-18, ImageNet stem at 32 px, 2 processes x 1 thread, precision auto), equal steps
   (--pretrain-steps; 1,161 is the 15-minute budget of the recipe on the 2-core AVX512 machine of
   docs/results.md), seeds 0..--seeds-1, three arms (--arms): MoCo v3 (moco), the released
   BatchFormer setting (released: train.py --add_bf 1) and the best variant of the BatchFormer
   study (after-warmup: --add_bf 1 --bf-start-epoch at the end of the warm-up,
   docs/results.md#batchformer-variants). The online kNN monitor uses --data's balanced train/ and val/.
   Each backbone: kNN (k 20, T 0.07) on val/ with the long-tailed images as the bank (probe.py
   --mode knn --imbalance R), overall and many / medium / few (thirds by class size; docs/longtail.md).
3. Calibration: a short timed fine-tuning run turns --ft-min into a step count, the same for every
   fine-tuning run (equal steps).
4. Fine-tuning on the long-tailed labels (probe.py --mode finetune --imbalance R), from each
   pretrained arm in --ft-starts and from a random init of the same backbone, each start with its
   recipe (probe.py picks it), x --loss ce and balanced-softmax x with and without --bf-head 1:
   fine-tuning seed s starts from pretraining seed s's backbone. Pairs whose paired std of overall
   top-1 is above --std-limit (0.5) over --seeds get one more fine-tuning seed for both of their
   arms, up to --max-seeds (seed s >= --seeds starts from pretraining seed s mod --seeds).
5. Report: results.md (kNN and fine-tuning tables overall / many / medium / few, the paired
   answers, every run), results.json, longtail.svg (per-class top-1 against class size, log x,
   one line per arm; bench/downstream_report.py's line_plot).

Cost with the defaults (2 cores, the AVX512 machine's 0.78 s per pretraining step): pretraining 3
arms x 2 seeds x 600 steps (about 8 min each with start-up) = 48 min, kNN 6 x about 1 min, calibration
1 min, fine-tuning 3 starts x 2 losses x 2 heads x 2 seeds x 2.5 min = 60 min: about 1 h 55 min
(printed at start), and 2.5 min more per fine-tuning run a third seed adds. --arms, --ft-starts,
--pretrain-steps, --ft-min and --seeds trade cost for precision. Not run end to end yet.

Outputs in --out: the above, runs/pretrain/<arm>/seed<S>/ (train.py's run, knn/), runs/finetune/
<start>/<loss>[-bf]/seed<S>/ (probe.py's outputs; checkpoints deleted), calibration/. A rerun with the
same --out reuses finished runs whose command is unchanged.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys

from cifar_pretraining import WARMUP_SHARE, Setup, train_cmd
from downstream_report import line_plot, signed
from harness import (bench_parser, check_calibration_steps, check_data, fail, fresh_dir, launcher, mean_std, now,
                     provenance, reusable, run, run_info, std, steps_in_budget, thread_env, time_short_run,
                     write_results)

from bfcl.images import image_folder
from bfcl.subsets import label_subset

# train.py flags of each pretraining arm after the recipe; "{warmup}" becomes the warm-up's epochs.
ARMS = {"moco": [], "released": ["--add_bf", "1"], "after-warmup": ["--add_bf", "1", "--bf-start-epoch", "{warmup}"]}
LOSSES = ("ce", "balanced-softmax")
RANDOM = "random-init"
# Warm-up as a share of a fine-tuning run: none from a pretrained start (SimCLR), torchvision's 5 of 90 from scratch.
FT_WARMUP = {"pretrained": 0.0, RANDOM: 5 / 90}
KNN_K = 20
GROUPS = ("many", "medium", "few")
PRETRAIN_STEP_S = 900 / 1161  # the recipe's 15 minutes = 1,161 steps on the AVX512 machine, start-up included
KNN_MIN, CALIBRATION_MIN = 1.0, 1.0
COLOURS = {("ce", False): "#1f77b4", ("ce", True): "#d62728", ("balanced-softmax", False): "#2ca02c",
           ("balanced-softmax", True): "#ff7f0e", ("knn", False): "#7f7f7f"}
DASHES = {"moco": "", "released": "7 4", "after-warmup": "2 3", RANDOM: "10 3 2 3"}


def number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, "longtail")
    p.add_argument("--imbalance", type=float, default=100, help="probe.py --imbalance R: head / tail class size")
    p.add_argument("--subset-seed", type=int, default=0, help="probe.py --subset-seed: class order and images")
    p.add_argument("--arms", type=names, default=list(ARMS), help=f"pretraining arms, of {', '.join(ARMS)}")
    p.add_argument("--pretrain-steps", type=int, default=600, help="steps of every pretraining run (equal steps)")
    p.add_argument("--batch-size", type=int, default=None, help="pretraining's global batch (default: the recipe's)")
    p.add_argument("--knn-samples", type=int, default=2000, help="train.py --knn-samples of the online monitor")
    p.add_argument("--knn-points", type=int, default=4, help="online kNN monitor passes per pretraining run")
    p.add_argument("--ft-starts", type=names, default=["moco", "released"],
                   help=f"pretrained arms fine-tuned, besides {RANDOM} (always)")
    p.add_argument("--losses", type=names, default=list(LOSSES), help="probe.py --loss values fine-tuned")
    p.add_argument("--bf-heads", type=names, default=["0", "1"], help="probe.py --bf-head values fine-tuned")
    p.add_argument("--ft-min", type=float, default=2.5, help="wall-clock minutes of each fine-tuning run")
    p.add_argument("--ft-steps", type=int, default=0, help="fixed fine-tuning steps instead of --ft-min (toy runs)")
    p.add_argument("--ft-batch-size", type=int, default=128, help="global fine-tuning batch")
    p.add_argument("--seeds", type=int, default=2, help="pretraining and fine-tuning seeds 0..N-1, paired")
    p.add_argument("--max-seeds", type=int, default=3, help="fine-tuning seeds at most, where a pair's std is high")
    p.add_argument("--std-limit", type=float, default=0.5, help="paired std of overall top-1 that adds a seed")
    p.add_argument("--precision", default="auto", help="train.py and probe.py --mixed-precision")
    p.add_argument("--calibration-steps", type=int, default=30, help="timed fine-tuning steps")
    args = p.parse_args(argv)
    check(args)
    return args


def check(args) -> None:
    if set(args.arms) - set(ARMS) or "moco" not in args.arms:
        fail(f"--arms {','.join(args.arms)}: choose among {', '.join(ARMS)}, moco included (the reference)")
    if set(args.ft_starts) - set(args.arms):
        fail(f"--ft-starts {','.join(args.ft_starts)} must be among --arms {','.join(args.arms)}")
    if set(args.losses) - set(LOSSES) or not args.losses:
        fail(f"--losses {','.join(args.losses)}: choose among {', '.join(LOSSES)}")
    if set(args.bf_heads) - {"0", "1"} or not args.bf_heads:
        fail(f"--bf-heads {','.join(args.bf_heads)}: 0 and/or 1")
    if args.seeds < 1 or args.max_seeds < args.seeds:
        fail(f"--seeds {args.seeds} must be at least 1 and at most --max-seeds {args.max_seeds}")
    if args.imbalance < 1:
        fail(f"--imbalance {args.imbalance:g} must be at least 1")
    check_calibration_steps(args.calibration_steps)


def ft_arms(args) -> list[tuple[str, str, bool]]:
    """(start, loss, bf head) of every fine-tuning arm."""
    return [(start, loss, head == "1") for start in [*args.ft_starts, RANDOM] for loss in args.losses
            for head in args.bf_heads]


def estimate_min(args) -> float:
    """Wall-clock minutes with --seeds seeds (a third seed adds --ft-min per fine-tuning run it needs)."""
    pretrain = len(args.arms) * args.seeds * (args.pretrain_steps * PRETRAIN_STEP_S / 60 + KNN_MIN)
    return pretrain + CALIBRATION_MIN + len(ft_arms(args)) * args.seeds * args.ft_min


def arm_name(start: str, loss: str, bf: bool) -> str:
    return f"{start}, {'CE' if loss == 'ce' else 'Balanced Softmax'}{' + BF head' if bf else ''}"


# ---- 1. the long-tailed list ---------------------------------------------------------------------------

def write_list(args) -> dict:
    """OUT/train_list.txt and what it holds (probe.py's subset record)."""
    root = os.path.join(args.data, "train")
    subset = label_subset(image_folder(root), root, args.subset_seed, imbalance=args.imbalance)
    path = subset.write(args.out)
    print(f"long-tailed list: {subset.record['size']} of {subset.record['available']} images, classes "
          f"{min(subset.record['per_class'].values())} to {max(subset.record['per_class'].values())}, sha256 "
          f"{subset.record['sha256'][:16]} ({path})", flush=True)
    return {**subset.record, "path": path}


def lt_flags(args) -> list[str]:
    return ["--imbalance", repr(args.imbalance), "--subset-seed", str(args.subset_seed)]


def check_same_list(record: dict, results: dict, what: str) -> None:
    if results["subset"]["sha256"] != record["sha256"]:
        fail(f"{what} trained on another subset (sha256 {results['subset']['sha256'][:16]}) than "
             f"{record['path']} ({record['sha256'][:16]})")


# ---- 2. pretraining and kNN ------------------------------------------------------------------------------

def setup(args) -> Setup:
    return Setup(os.path.join(args.data, "train"), os.path.join(args.out, "runs", "pretrain"), procs=args.procs,
                 batch_size=args.batch_size, knn_points=args.knn_points, knn_samples=args.knn_samples,
                 train_args=f"--mixed-precision {args.precision}")


def pretrain_cmd(args, lt: dict, arm: str, seed: int, out_dir: str) -> list[str]:
    s = setup(args)
    steps_per_epoch = lt["size"] // int(s.recipe_value("-b"))
    if steps_per_epoch == 0:
        fail(f"{lt['size']} long-tailed images do not fill one pretraining batch of {s.recipe_value('-b')}; "
             "pass a smaller --batch-size")
    epochs = args.pretrain_steps / steps_per_epoch
    flags = [f.replace("{warmup}", repr(epochs * WARMUP_SHARE)) for f in ARMS[arm]]
    knn_every = max(1, -(-args.pretrain_steps // args.knn_points))
    return train_cmd(s, out_dir, seed, False, args.pretrain_steps, steps_per_epoch, knn_every,
                     extra=["--train-list", lt["path"], "--knn-data", args.data, *flags])


def knn_cmd(args, backbone: str, out_dir: str) -> list[str]:
    return [*launcher(args.procs), "probe.py", "--pretrained", backbone, "--data", args.data, *lt_flags(args),
            "--mode", "knn", "--knn-k", str(KNN_K), "--image-size", "32", "--batch-size", "512", "--workers", "0",
            "--mixed-precision", args.precision, "--output-dir", out_dir]


def groups_of(block: dict) -> dict:
    """{"top1": overall, "many": .., "medium": .., "few": .., "per_class": {class: [train images, top-1]}}."""
    groups = block["groups"] or {}
    return {**{g: (groups.get(g) or {}).get("top1") for g in GROUPS},
            "per_class": {c: [v["train"], v["top1"]] for c, v in block["per_class"].items()}}


def pretrain(args, env, lt: dict, arm: str, seed: int) -> dict:
    """One pretraining run and its kNN; reused when its commands are unchanged."""
    run_dir = os.path.join(args.out, "runs", "pretrain", arm, f"seed{seed}")
    cmd = pretrain_cmd(args, lt, arm, seed, run_dir)
    backbone = os.path.join(run_dir, "backbone.safetensors")
    knn_dir = os.path.join(run_dir, "knn")
    key = shlex.join(cmd) + " && " + shlex.join(knn_cmd(args, backbone, knn_dir))
    record_path = os.path.join(run_dir, "record.json")
    if (record := reusable(record_path, key)) is not None:
        print(f"  pretraining {arm}, seed {seed}: reusing {record_path}", flush=True)
        return record
    fresh_dir(run_dir)
    print(f"  pretraining {arm}, seed {seed}: {args.pretrain_steps} steps", flush=True)
    t = run(cmd, os.path.join(run_dir, "train.log"), env)
    if not os.path.exists(backbone):
        fail(f"pretraining {arm}, seed {seed} left no {backbone}; see {run_dir}/train.log")
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    os.makedirs(knn_dir)
    k = run(knn_cmd(args, backbone, knn_dir), os.path.join(knn_dir, "probe.log"), env)
    results = json.load(open(os.path.join(knn_dir, "results.json")))
    check_same_list(lt, results, f"the kNN of {arm}, seed {seed}")
    top = results["results"]["knn"][f"k{KNN_K}"]
    record = {"arm": arm, "seed": seed, "command": key, "backbone": backbone, "steps": args.pretrain_steps,
              "wall_s": t["wall_s"], "knn_s": k["wall_s"], "knn": {"top1": top["top1"], **groups_of(top["longtail"])},
              "literature": top["longtail"]["literature"]}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"  pretraining {arm}, seed {seed}: kNN top-1 {top['top1']:.2f} (few {number(record['knn']['few'])}), "
          f"{t['wall_s'] / 60:.1f} min", flush=True)
    return record


# ---- 3-4. fine-tuning -----------------------------------------------------------------------------------

def finetune_cmd(args, what: list[str], start: str, loss: str, bf: bool, seed: int, epochs: float, out_dir: str,
                 extra=()) -> list[str]:
    warmup = FT_WARMUP[RANDOM if start == RANDOM else "pretrained"]
    return [*launcher(args.procs), "probe.py", *what, "--data", args.data, *lt_flags(args), "--mode", "finetune",
            "--image-size", "32", "-b", str(args.ft_batch_size), "--epochs", repr(epochs), "--warmup-epochs",
            repr(epochs * warmup), "--loss", loss, "--bf-head", "1" if bf else "0", "--mixed-precision",
            args.precision, "--workers", "0", "--seed", str(seed), "--output-dir", out_dir, "--no-eval-epoch-ends",
            "--log-every", "10", "--save-every", "1000000", "--keep", "1", *extra]


def start_flags(args, backbones: dict, start: str, seed: int) -> list[str]:
    """probe.py's flags of a start: pretraining seed (seed mod --seeds)'s backbone, or the random init."""
    if start == RANDOM:
        return setup(args).random_init_args()
    return ["--pretrained", backbones[start, seed % args.seeds]]


def calibrate(args, env, backbones: dict) -> dict:
    n = args.calibration_steps
    out = os.path.join(args.out, "calibration")
    fresh_dir(out)
    cmd = finetune_cmd(args, start_flags(args, backbones, "moco", 0), "moco", "ce", False, 0, 1000.0, out,
                       ["--max-steps", str(n), "--log-every", "5"])
    t = time_short_run(cmd, out, "probe.log", env, n)
    return {"step_s": t["step_s"], "startup_s": t["startup_s"], "final_eval_exit_s": t["last_window_s"] + t["exit_s"],
            "wall_s": t["wall_s"], "command": t["command"]}


def finetune(args, env, lt: dict, backbones: dict, start: str, loss: str, bf: bool, seed: int, steps: int) -> dict:
    epochs = steps / (lt["size"] // args.ft_batch_size)  # probe.py: round(steps_per_epoch x epochs) steps
    out = os.path.join(args.out, "runs", "finetune", start, loss + ("-bf" if bf else ""), f"seed{seed}")
    cmd = finetune_cmd(args, start_flags(args, backbones, start, seed), start, loss, bf, seed, epochs, out)
    record_path = os.path.join(out, "record.json")
    if (record := reusable(record_path, shlex.join(cmd))) is not None:
        return record
    fresh_dir(out)
    t = run(cmd, os.path.join(out, "probe.log"), env)
    results = json.load(open(os.path.join(out, "results.json")))
    check_same_list(lt, results, f"fine-tuning {arm_name(start, loss, bf)}, seed {seed}")
    ft = results["results"]["finetune"]
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    record = {"start": start, "loss": loss, "bf": bf, "seed": seed, "command": shlex.join(cmd),
              "loaded": results["pretrained"], "recipe": ft["recipe"]["name"], "lr": ft["lr"], "steps": ft["steps"],
              "wall_s": t["wall_s"], "top1": ft["last"]["top1"], **groups_of(ft["longtail"]),
              "literature": ft["longtail"]["literature"]}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"  {arm_name(start, loss, bf)}, seed {seed}: top-1 {record['top1']:.2f}, few {number(record['few'])} "
          f"({record['recipe']}, {record['steps']} steps, {record['wall_s'] / 60:.1f} min)", flush=True)
    return record


# ---- 5. the report --------------------------------------------------------------------------------------

def comparisons(args) -> list[tuple[str, dict, dict]]:
    """(question, arm a, arm b) of every paired difference a - b the report answers."""
    out = []
    for start in args.ft_starts:
        if start != "moco":
            out += [(f"BatchFormer in pretraining ({start} - moco), fine-tuned {arm_name('', loss, bf).strip(', ')}",
                     {"start": start, "loss": loss, "bf": bf}, {"start": "moco", "loss": loss, "bf": bf})
                    for loss in args.losses for bf in (False,) if "0" in args.bf_heads]
    for loss in args.losses:
        if {"0", "1"} <= set(args.bf_heads):
            out += [(f"BatchFormer in the classifier with {'CE' if loss == 'ce' else 'Balanced Softmax'}, {start}",
                     {"start": start, "loss": loss, "bf": True}, {"start": start, "loss": loss, "bf": False})
                    for start in [*args.ft_starts, RANDOM]]
    if set(LOSSES) <= set(args.losses) and "0" in args.bf_heads:
        out += [(f"Balanced Softmax - CE, {start}", {"start": start, "loss": "balanced-softmax", "bf": False},
                 {"start": start, "loss": "ce", "bf": False}) for start in [*args.ft_starts, RANDOM]]
    loss, bf = args.losses[0], args.bf_heads[0] == "1"
    out += [(f"pretrained ({start}) - random init, {arm_name('', loss, bf).strip(', ')}",
             {"start": start, "loss": loss, "bf": bf}, {"start": RANDOM, "loss": loss, "bf": bf})
            for start in args.ft_starts]
    return out


def paired(records: list[dict], a: dict, b: dict, key: str) -> list[float]:
    match = lambda r, m: all(r[k] == v for k, v in m.items())  # noqa: E731
    base = {r["seed"]: r[key] for r in records if match(r, b) and r[key] is not None}
    return [r[key] - base[r["seed"]] for r in records if match(r, a) and r["seed"] in base and r[key] is not None]


def knn_paired(pre: list[dict], arm: str, key: str) -> list[float]:
    base = {r["seed"]: r["knn"][key] for r in pre if r["arm"] == "moco"}
    return [r["knn"][key] - base[r["seed"]] for r in pre if r["arm"] == arm and r["knn"][key] is not None
            and base.get(r["seed"]) is not None]


def beyond(diffs: list[float]) -> bool:
    return len(diffs) > 1 and statistics.mean(diffs) > 2 * std(diffs)


def answers(args, pre: list[dict], records: list[dict]) -> dict:
    """The goals: a few-class gain beyond twice the paired std, and pretrained - random init >= 10 overall."""
    few = {q: paired(records, a, b, "few") for q, a, b in comparisons(args) if "BatchFormer" in q}
    few.update({f"BatchFormer in pretraining ({arm} - moco), kNN": knn_paired(pre, arm, "few")
                for arm in args.arms if arm != "moco"})
    start_gain = {q: paired(records, a, b, "top1") for q, a, b in comparisons(args) if q.startswith("pretrained")}
    return {"few_gain_beyond_2_std": sorted(q for q, d in few.items() if beyond(d)),
            "pretrained_beats_random_by_10": sorted(q for q, d in start_gain.items() if d and statistics.mean(d) >= 10),
            "few_differences": few, "pretrained_minus_random": start_gain}


def group_cells(values: list[dict]) -> str:
    return " | ".join(mean_std([v[k] for v in values if v[k] is not None]) for k in ("top1", *GROUPS))


def markdown(args, info: dict, lt: dict, pre: list[dict], records: list[dict], found: dict) -> str:
    counts = sorted(lt["per_class"].values(), reverse=True)
    text = [f"# Long tails: BatchFormer on CIFAR-10-LT (R = {args.imbalance:g})", "", *provenance(info),
            f"- training images: {lt['size']} of {lt['available']} (`--imbalance {args.imbalance:g} --subset-seed "
            f"{args.subset_seed}`, sha256 {lt['sha256'][:16]}), classes {', '.join(map(str, counts))}, head first "
            f"({', '.join(lt['class_order'])}); val/ balanced",
            "- groups: thirds by class size (many / medium / few; docs/longtail.md); top-1 of a group is the mean of "
            "its classes' top-1; mean ± std over seeds",
            f"- pretraining: {args.pretrain_steps} steps every arm, seeds 0..{args.seeds - 1}; fine-tuning: "
            f"{info['ft_steps_used']} steps every arm, batch {args.ft_batch_size}, each start's recipe; top-1 of the "
            "final model", "",
            f"## Pretraining on the long-tailed images: kNN (k {KNN_K}) top-1 on val/", "",
            "| arm | overall | many | medium | few | − moco overall | − moco few |", "|---|---|---|---|---|---|---|"]
    for arm in args.arms:
        rs = [r["knn"] for r in pre if r["arm"] == arm]
        diff = ("– | –" if arm == "moco" else f"{signed(knn_paired(pre, arm, 'top1'))} | "
                f"{signed(knn_paired(pre, arm, 'few'))}")
        text.append(f"| {arm} | {group_cells(rs)} | {diff} |")
    text += ["", "## Fine-tuning on the long-tailed labels: top-1 on val/", "",
             "| start | loss | BatchFormer head | overall | many | medium | few | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for start, loss, bf in ft_arms(args):
        rs = [r for r in records if (r["start"], r["loss"], r["bf"]) == (start, loss, bf)]
        text.append(f"| {start} | {loss} | {'yes' if bf else 'no'} | {group_cells(rs)} | {len(rs)} |")
    text += ["", "## Paired differences (a − b, by seed)", "", "| question | overall | many | medium | few |",
             "|---|---|---|---|---|"]
    for question, a, b in comparisons(args):
        text.append(f"| {question} | " + " | ".join(signed(paired(records, a, b, k)) for k in ("top1", *GROUPS))
                    + " |")
    text += ["", "## Answers", "",
             "- a few-class gain beyond twice the paired std: "
             + (", ".join(found["few_gain_beyond_2_std"]) or "none"),
             "- a pretrained start ahead of random init by ≥ 10 top-1 overall: "
             + (", ".join(found["pretrained_beats_random_by_10"]) or "none"), "",
             "## Every fine-tuning run", "",
             "| start | loss | BF head | seed | recipe | lr | steps | top-1 | few | wall (min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        text.append(f"| {r['start']} | {r['loss']} | {'yes' if r['bf'] else 'no'} | {r['seed']} | {r['recipe']} | "
                    f"{r['lr']:.4g} | {r['steps']} | {r['top1']:.2f} | {number(r['few'])} | {r['wall_s'] / 60:.1f} |")
    text += ["", "![per-class top-1 against class size](longtail.svg)", ""]
    return "\n".join(text)


def per_class_lines(rows: list[dict]) -> list[tuple[float, float]]:
    """(class size, mean top-1 over the rows' seeds) of each class, by size."""
    by_class: dict[str, list] = {}
    for r in rows:
        for c, (n, top1) in r["per_class"].items():
            if top1 is not None:
                by_class.setdefault(c, [n, []])[1].append(top1)
    return sorted((n, statistics.mean(v)) for n, v in by_class.values())


def svg(args, lt: dict, pre: list[dict], records: list[dict]) -> str:
    """Per-class top-1 against class size (log x): one line per fine-tuning arm, and each pretraining arm's kNN."""
    lines = [(per_class_lines([r["knn"] for r in pre if r["arm"] == arm]), COLOURS["knn", False], DASHES[arm])
             for arm in args.arms]
    lines += [(per_class_lines([r for r in records if (r["start"], r["loss"], r["bf"]) == (start, loss, bf)]),
               COLOURS[loss, bf], DASHES[start]) for start, loss, bf in ft_arms(args)]
    methods = [("kNN k20 (pretraining arm)", "knn", False)] + [
        (arm_name("", loss, bf).strip(", ") + ", fine-tuned", loss, bf) for loss in args.losses
        for bf in (False, True) if ("1" if bf else "0") in args.bf_heads]
    legend = [(label, COLOURS[key, bf], "") for label, key, bf in methods]
    legend += [(start, "#444", DASHES[start]) for start in [*args.arms, RANDOM]]
    sizes = sorted(set(lt["per_class"].values()))
    return line_plot(f"Per-class top-1 against class size, CIFAR-10-LT R {args.imbalance:g}", sizes, str,
                     "training images of the class (log scale)", "top-1 of the class on val (%)", lines, legend,
                     width=900, plot_width=520)


def write_report(args, info: dict, lt: dict, pre: list[dict], records: list[dict]) -> str:
    found = answers(args, pre, records)
    text = markdown(args, info, lt, pre, records, found)
    diffs = {q: {k: paired(records, a, b, k) for k in ("top1", *GROUPS)} for q, a, b in comparisons(args)}
    write_results(args.out, text, {**info, "subset": lt, "pretraining": pre, "finetune": records,
                                   "paired_differences": diffs, "answers": found})
    with open(os.path.join(args.out, "longtail.svg"), "w") as f:
        f.write(svg(args, lt, pre, records))
    return text


def extra_seed_arms(args, records: list[dict], seeds: int) -> set:
    """The fine-tuning arms of every pair whose paired std of overall top-1 is above --std-limit."""
    arms = set()
    for _, a, b in comparisons(args):
        diffs = paired(records, a, b, "top1")
        if len(diffs) >= seeds and std(diffs) > args.std_limit:
            arms |= {(a["start"], a["loss"], a["bf"]), (b["start"], b["loss"], b["bf"])}
    return arms


def main(argv=None) -> int:
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    check_data(args.data)
    os.makedirs(args.out, exist_ok=True)
    env = thread_env(args.threads)
    info = {**run_info("bench/longtail.py", argv), "imbalance": args.imbalance, "subset_seed": args.subset_seed,
            "arms": {a: ARMS[a] for a in args.arms}, "pretrain_steps": args.pretrain_steps, "seeds": args.seeds,
            "ft_starts": args.ft_starts, "losses": args.losses, "bf_heads": args.bf_heads, "ft_min": args.ft_min,
            "ft_steps": args.ft_steps, "ft_batch_size": args.ft_batch_size, "precision": args.precision,
            "estimate_min": round(estimate_min(args))}
    print(f"{info['date']} | {info['hardware']['cpu']}, {info['hardware']['cores']} cores | CIFAR-LT R "
          f"{args.imbalance:g} | about {info['estimate_min']} min", flush=True)
    lt = write_list(args)
    pre = [pretrain(args, env, lt, arm, seed) for seed in range(args.seeds) for arm in args.arms]
    backbones = {(r["arm"], r["seed"]): r["backbone"] for r in pre}
    cal = None if args.ft_steps else calibrate(args, env, backbones)
    steps = args.ft_steps or steps_in_budget(args.ft_min * 60, cal["step_s"], cal["startup_s"]
                                              + cal["final_eval_exit_s"])
    info.update(calibration=cal, ft_steps_used=steps)
    print(f"fine-tuning: {steps} steps a run" + (f" ({cal['step_s']:.3f} s/step)" if cal else ""), flush=True)
    records = [finetune(args, env, lt, backbones, *arm, seed, steps) for seed in range(args.seeds)
               for arm in ft_arms(args)]
    for seed in range(args.seeds, args.max_seeds):
        more = extra_seed_arms(args, records, seed)
        if not more:
            break
        print(f"seed {seed} for {len(more)} arms whose paired std exceeds {args.std_limit:g}", flush=True)
        records += [finetune(args, env, lt, backbones, *arm, seed, steps) for arm in ft_arms(args) if arm in more]
    info["date_end"] = now()
    print(write_report(args, info, lt, pre, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
