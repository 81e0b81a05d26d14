"""CPU speed benchmark: train.py against a bare step, BatchFormer's cost, the two augmentation
paths, and the memory of the ImageNet recipe. It prints figures; nothing here asserts a time.

    make bench-speed                      # = .venv/bin/python bench/speed.py, then sections 1-2 with --arch vit_tiny
    .venv/bin/python bench/speed.py --arch vit_tiny --only trainer,bf      # the ViT line alone
    .venv/bin/python bench/speed.py --only trainer --trainer-runs 1      # one section, shorter

1. train.py (a subprocess, on a generated 32 px JPEG folder, data loading, logging every 2 steps
   and a checkpoint at the epoch end on) against reference_step.py's bare step on views already
   in memory: same small-stem ResNet-18, batch, LARS and math. The trainer's images/s cover every
   step after the warm-up, read from its metrics.jsonl log times. Both use --threads compute
   threads; the trainer's loader gets --workers processes.
2. BatchFormer (--add_bf 1, pairs-sum) against --add_bf 0: bare steps, alternating, median of
   the paired ratios.
3. Views per second on ONE core (one thread): the per-image PIL recipe against the batched
   tensor path (bfcl/augment.py) at 32, 96 and 224 px, from decoded images.
4. Peak memory of the ImageNet recipe (ResNet-50, 224 px, BatchFormer on, LARS) at small batches
   on this CPU, extrapolated to 256 per process (see memory_estimate for how).
5. torch.compile (inductor) and NHWC in fp32: bare steps of the CIFAR-10 recipe's model
   (ResNet-18, ImageNet stem, 32 px, MLP 2048, LARS, batch --compile-batch, --threads threads), eager
   against compiled and against channels-last, in alternating blocks of 3 steps, in a child process
   with an empty inductor cache: the first two compiled steps are the cold compile time.

Measured 2026-11-27 with `make bench-speed` (263 s) on an AMD EPYC KVM guest, 2 cores, torch
2.14.1, shared with other jobs (load average 2.5-3), defaults above:
  trainer/reference throughput ratio 0.942 (runs 0.942, 0.855, 0.968; trainer 7.0-10.2 img/s);
  per step: data wait 1.5%, forward 48%, backward 46%, optimizer 1.2%, momentum update 0.7%,
  logging 0.0%, checkpoint 2.7% (one per 8 steps here);
  BatchFormer overhead -1.7% (paired steps -3.5%, +1.9%, -1.7%: below the noise);
  views/s on one core, PIL / batched (incl. loader side): 32 px 2126 / 4525, 96 px 1013 / 1214,
  224 px 258 / 216;
  memory, ResNet-50 + BatchFormer, 256 per process: ~48 GiB fp32 RSS on a CPU, ~21 GiB of
  tensors in bf16 on a GPU (164 MiB of fp32 activations per image, 0.61 GiB static).
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bfcl.precision import cpu_name
from reference_step import PHASES, build, make_views, run_steps
from trainer_log import trainer_throughput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("trainer", "bf", "augment", "memory", "compile")
# --arch: the small-image models of sections 1 and 2, as train.py flags and as reference_step.build arguments.
ARCH_FLAGS = {"resnet18": ["-a", "resnet18", "--stem", "small"],
              "vit_tiny": ["-a", "vit_tiny", "--patch-size", "8", "--optimizer", "adamw", "--lr", "5e-4",
                           "--wd", "0.1"]}
ARCH_NAMES = {"resnet18": "resnet18 small stem", "vit_tiny": "vit_tiny patch 8"}
BASE_LR = {"resnet18": 0.6, "vit_tiny": 5e-4}  # train.py's lr in run_trainer (the ResNet default, the ViT flag above)


def build_small(arch: str, bf_loss, device):
    """Section 1 and 2's model + optimizer, as train.py builds it for run_trainer's flags."""
    return build(arch, "small", 512, bf_loss, device, image_size=32, patch_size=8)
STEPS_PER_EPOCH = 6  # of the trainer's generated data set: with the default 2 + 6 steps, an epoch ends mid-run


def hardware() -> str:
    model = cpu_name()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores; torch {torch.__version__}; {datetime.date.today().isoformat()}; "
            f"load average {load} (other processes share this machine)")


def median(xs) -> float:
    return statistics.median(xs)


# ---- 1. trainer against the bare step ------------------------------------------------------

def run_trainer(data: str, out: str, args) -> dict:
    """train.py in a subprocess under cProfile; returns its images/s after the warm-up (from
    metrics.jsonl) and, from the profile, seconds per step in each part of the loop."""
    cmd = ["train.py", "--data", data, "--output-dir", out, "--resume", "none", *ARCH_FLAGS[args.arch],
           "--image-size", "32", "--no-blur", "--moco-mlp-dim", "512",
           "-b", str(args.batch), "--epochs", "10", "--warmup-epochs", "1", "--workers", str(args.workers),
           "--log-every", "2", "--max-steps", str(args.warmup + args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    profile = out + ".prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", profile, *cmd], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return {**trainer_throughput(os.path.join(out, "metrics.jsonl"), args.batch, args.warmup),
            "parts": loop_parts(profile, args.warmup + args.steps), "command": " ".join(cmd)}


# The parts of train.py's loop, as (file path ending, function) entries of the profile.
LOOP_PARTS = {
    "data wait": [("torch/utils/data/dataloader.py", "__next__"), ("torch/utils/data/dataloader.py", "__iter__")],
    "forward (model + loss)": [("bfcl/model.py", "forward"), ("bfcl/loss.py", "moco_loss")],
    "backward": [("accelerate/accelerator.py", "backward")],
    "optimizer": [("bfcl/optim.py", "step"), ("torch/optim/adamw.py", "step"), ("torch/optim/adam.py", "step")],
    "momentum update": [("bfcl/model.py", "update_momentum_encoder")],
    "logging (sync point + log)": [("accelerate/accelerator.py", "reduce"), ("bfcl/progress.py", "log")],
    "checkpoint": [("train.py", "save")],
}


def loop_parts(profile_path: str, steps: int) -> dict:
    """Seconds per step in each of LOOP_PARTS, and the rest of train.py's train() as "other"."""
    import pstats
    stats = pstats.Stats(profile_path).stats  # (file, line, function) -> (calls, ..., total, cumulative, callers)
    cumulative = lambda file, function: sum(v[3] for (f, _, fn), v in stats.items()
                                            if f.endswith(file) and fn == function)
    parts = {name: sum(cumulative(*entry) for entry in entries) / steps for name, entries in LOOP_PARTS.items()}
    parts["other"] = cumulative("train.py", "train") / steps - sum(parts.values())
    return parts


def run_reference(args, steps: int) -> dict:
    """reference_step.py's bare step in a fresh process with the trainer's thread settings."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--reference-probe", str(steps),
                          "--batch", str(args.batch), "--warmup", str(args.warmup), "--arch", args.arch],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def trainer_schedule(args):
    """The lr and momentum of run_trainer's steps (10 epochs, 1 of warm-up, its base lr)."""
    from bfcl.schedules import learning_rate, momentum
    peak, total = BASE_LR[args.arch] * args.batch / 256, 10 * STEPS_PER_EPOCH
    return lambda step: (learning_rate(step, total, STEPS_PER_EPOCH, peak), momentum(step, total, 0.99, True))


def reference_probe(args) -> None:
    """Child process: the trainer's warm-up steps, then `--reference-probe` timed bare steps with
    the trainer's lr and momentum; prints JSON."""
    device = torch.device("cpu")
    model, optimizer = build_small(args.arch, None, device)
    views = make_views(args.batch, 32, device)
    schedule = trainer_schedule(args)
    run_steps(model, optimizer, views, args.warmup, None, schedule=schedule)
    times = run_steps(model, optimizer, views, args.reference_probe, None, phases=True, schedule=schedule,
                      first_step=args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        times["checkpoint"] = [time_checkpoint(model, optimizer, tmp)]
    print(json.dumps(times))


def trainer_vs_reference(args) -> None:
    from bfcl.synthetic import make_image_folder
    print(f"\n## 1. train.py against the bare reference step ({ARCH_NAMES[args.arch]}, 32 px, batch {args.batch}, "
          f"{args.threads} compute thread(s), {args.workers} loader worker(s))")
    # Reference, trainer, reference, trainer, ..., reference: each a fresh process, so that load
    # changes on this shared machine hit both alike; each trainer run is compared with the
    # reference runs on either side of it.
    refs, runs = [run_reference(args, args.reference_steps)], []
    with tempfile.TemporaryDirectory() as tmp:
        # STEPS_PER_EPOCH classes x batch images: the measured steps cross an epoch end (a
        # checkpoint, then a new loader whose workers start up).
        data = make_image_folder(os.path.join(tmp, "data"), classes=STEPS_PER_EPOCH, train_per_class=args.batch,
                                 val_per_class=1, size=32)
        for i in range(args.trainer_runs):
            runs.append(run_trainer(data, os.path.join(tmp, f"run{i}"), args))
            refs.append(run_reference(args, args.reference_steps))
    ratios = []
    for i, run in enumerate(runs):
        ref_ips = args.batch / median(refs[i]["step"] + refs[i + 1]["step"])
        ratios.append(run["img_per_s"] / ref_ips)
        print(f"run {i + 1}: trainer {run['img_per_s']:.2f} img/s (steps {run['steps'][0]}-{run['steps'][1]}), "
              f"reference {ref_ips:.2f} img/s (bare steps before and after), ratio {ratios[-1]:.3f}")
    print(f"command: python {runs[0]['command']}")
    print(f"{ARCH_NAMES[args.arch]} line: trainer/reference throughput ratio {median(ratios):.3f} "
          f"(median of {len(ratios)} runs)")
    run = sorted(runs, key=lambda r: r["img_per_s"])[len(runs) // 2]  # the median run
    step = sum(run["parts"].values())
    print(f"breakdown of the median run's loop, per step (cProfile, all {args.warmup + args.steps} steps):")
    for name, seconds in run["parts"].items():
        print(f"  {name:28s} {seconds:8.3f} s  {seconds / step:6.1%}")
    bare = {name: median(sum((r[name] for r in refs), [])) for name in PHASES}
    print("  bare step for comparison: " + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in bare.items()))
    print(f"  (one checkpoint write of this model takes {median(sum((r['checkpoint'] for r in refs), [])):.2f} s; "
          f"train.py writes one every --save-every steps and at each epoch end)")


def time_checkpoint(model, optimizer, tmp: str) -> float:
    from bfcl.checkpoint import optimizer_state_tensors, save_checkpoint
    from bfcl.optim import param_groups
    state = model.state_dict()
    start = time.perf_counter()
    opt = optimizer_state_tensors(optimizer, param_groups(model)[1])
    save_checkpoint(os.path.join(tmp, "ckpt"), 1, state, opt, {"config": {}}, 1)
    return time.perf_counter() - start


# ---- 2. BatchFormer's cost -------------------------------------------------------------------

def batchformer_overhead(args) -> None:
    print(f"\n## 2. BatchFormer overhead (bare step, {ARCH_NAMES[args.arch]}, 32 px, batch {args.batch}, "
          f"{args.threads} thread(s))")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    views = make_views(args.batch, 32, device)
    runs = {bf: build_small(args.arch, bf, device) for bf in (None, "pairs-sum")}
    for bf, (model, optimizer) in runs.items():
        run_steps(model, optimizer, views, 1, bf)  # warm-up
    times = {bf: [] for bf in runs}
    for _ in range(args.bf_pairs):  # alternate, so that load changes hit both alike
        for bf, (model, optimizer) in runs.items():
            times[bf] += run_steps(model, optimizer, views, 1, bf)["step"]
    ratios = [on / off for off, on in zip(times[None], times["pairs-sum"])]
    print(f"--add_bf 0: {median(times[None]):.3f} s/step   --add_bf 1: {median(times['pairs-sum']):.3f} s/step")
    print(f"BatchFormer overhead: {median(ratios) - 1:+.1%} (median of {len(ratios)} paired steps; "
          f"pairs {', '.join(f'{r - 1:+.1%}' for r in ratios)})")


# ---- 3. augmentation: PIL per image against batched tensors --------------------------------

def augmentation_speed(args) -> None:
    from PIL import Image

    from bfcl.augment import BatchedTwoViews
    from bfcl.views import eval_resize, pretrain_views
    from bfcl.synthetic import pattern_image
    print("\n## 3. Two-view augmentation, views per second on one core (1 thread), from decoded images")
    print(f"{'size':>5} {'source':>7} {'PIL per image':>14} {'batched':>9} {'batched+loader':>15} {'speed-up':>9}")
    torch.set_num_threads(1)
    n = args.aug_images
    for size in (32, 96, 224):
        source = eval_resize(size)
        g = torch.Generator().manual_seed(0)
        pil_images = [Image.fromarray(pattern_image(i % 4, 4, source, g).numpy()) for i in range(n)]
        view1, view2 = pretrain_views(size, 0.2, blur=True)
        batched = BatchedTwoViews(size, 0.2, blur=True)
        to_source, draw_params = batched.dataset_transforms()

        def pil():
            for img in pil_images:
                view1(img), view2(img)

        def loader_side():
            return [to_source(img) for img in pil_images], [draw_params(img) for img in pil_images]

        images, params = loader_side()
        images = torch.stack(images)
        params = torch.utils.data.default_collate(params)
        timings = {name: best_of(fn, args.repeats) for name, fn in
                   (("pil", pil), ("batched", lambda: batched(images, params)), ("loader", loader_side))}
        pil_vps = 2 * n / timings["pil"]
        batched_vps = 2 * n / timings["batched"]
        total_vps = 2 * n / (timings["batched"] + timings["loader"])
        print(f"{size:>5} {source:>7} {pil_vps:>14.0f} {batched_vps:>9.0f} {total_vps:>15.0f} "
              f"{total_vps / pil_vps:>8.1f}x")
    print(f"(batches of {n} images = {2 * n} views; median of {args.repeats} runs. 'batched': the device part only, "
          "on this CPU; 'batched+loader' adds the loader side (squash to the source size, draw parameters), "
          "i.e. the whole batched path on one core. PIL: pretrain_views, blur on.)")


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


# ---- 4. memory of the ImageNet recipe ------------------------------------------------------

def memory_probe(batch: int) -> None:
    """One process: ResNet-50 MoCo v3 + BatchFormer, 224 px, two LARS steps at `batch`; prints JSON."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    model, optimizer = build("resnet50", "imagenet", 4096, "pairs-sum", device)
    views = make_views(batch, 224, device)
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    run_steps(model, optimizer, views, 1, "pairs-sum")  # the first step creates the LARS state
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_steps(model, optimizer, views, 1, "pairs-sum")
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    print(json.dumps({"batch": batch, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "saved_for_backward": sum(saved.values()),
                      "static": parameter_bytes + buffer_bytes + 2 * trainable_bytes}))  # + grads + LARS momentum


def memory_estimate(args) -> None:
    """Peak RSS at a few small batches, a straight line through them, read at 256.

    The line's intercept is what does not grow with the batch (weights, gradients, LARS state,
    the momentum encoder, libraries); its slope is the memory per image (activations kept for
    backward, temporaries). A GPU's peak (torch.cuda.max_memory_allocated) excludes the libraries
    and the CUDA context, and bf16 autocast stores most activations in half the bytes, so the
    bf16 figure below takes the static tensors plus half of the fp32 activations kept for backward.
    """
    GiB = 2**30
    print("\n## 4. Peak memory per process, ImageNet recipe (ResNet-50, 224 px, BatchFormer on, LARS)")
    rows = []
    for batch in args.memory_batches:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-probe", str(batch)], cwd=REPO,
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"batch {batch:>3}: peak RSS {r['peak_rss'] / GiB:6.2f} GiB; tensors kept for backward "
              f"{r['saved_for_backward'] / GiB:5.2f} GiB; weights+grads+LARS+buffers {r['static'] / GiB:5.2f} GiB")
    xs = [r["batch"] for r in rows]
    slope, intercept = fit_line(xs, [r["peak_rss"] for r in rows])
    act_slope, _ = fit_line(xs, [r["saved_for_backward"] for r in rows])
    static = rows[0]["static"]
    print(f"fit: peak RSS = {intercept / GiB:.2f} GiB + {slope / 2**20:.0f} MiB x batch; "
          f"activations kept for backward {act_slope / 2**20:.0f} MiB per image (fp32)")
    print(f"estimate at 256 per process: fp32 {(intercept + 256 * slope) / GiB:.1f} GiB (CPU RSS); "
          f"bf16 autocast on a GPU ~{(static + 256 * act_slope / 2) / GiB:.1f} GiB of tensors "
          f"(static {static / GiB:.2f} GiB + half the fp32 activations), before allocator slack and cuDNN workspace")


def fit_line(xs, ys) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def compile_probe(args) -> None:
    """Child process: eager, compiled and channels-last fp32 bare steps on the same views; prints JSON."""
    device = torch.device("cpu")
    build_fp32 = lambda: build("resnet18", "imagenet", 2048, None, device, image_size=32)
    (eager, opt_e), (compiled, opt_c), (nhwc, opt_n) = build_fp32(), build_fp32(), build_fp32()
    nhwc = nhwc.to(memory_format=torch.channels_last)
    views = make_views(args.compile_batch, 32, device)
    views_nhwc = tuple(v.contiguous(memory_format=torch.channels_last) for v in views)
    compiled_model = torch.compile(compiled)
    first = run_steps(compiled_model, opt_c, views, 2, None)["step"]
    run_steps(eager, opt_e, views, 2, None), run_steps(nhwc, opt_n, views_nhwc, 2, None)
    times = {"eager": [], "compiled": [], "channels_last": [], "compile_first_steps": first}
    for block in range(args.compile_blocks):
        step = 2 + 3 * block
        times["eager"] += run_steps(eager, opt_e, views, 3, None, first_step=step)["step"]
        times["compiled"] += run_steps(compiled_model, opt_c, views, 3, None, first_step=step)["step"]
        times["channels_last"] += run_steps(nhwc, opt_n, views_nhwc, 3, None, first_step=step)["step"]
    print(json.dumps(times))


def compile_speed(args) -> None:
    print(f"\n## 5. torch.compile and channels-last, fp32 bare steps (resnet18 ImageNet stem, 32 px, batch "
          f"{args.compile_batch}, {args.threads} thread(s), cold inductor cache)")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-probe", "--threads",
                              str(args.threads), "--compile-batch", str(args.compile_batch), "--compile-blocks",
                              str(args.compile_blocks)], env=env, check=True, capture_output=True, text=True).stdout
    t = json.loads(out.strip().splitlines()[-1])
    ips = {k: args.compile_batch / median(t[k]) for k in ("eager", "compiled", "channels_last")}
    compile_s = sum(t["compile_first_steps"]) - 2 * median(t["compiled"])
    budget = 15 * 60
    gain = (budget - compile_s) * ips["compiled"] / (budget * ips["eager"])
    print(f"eager {ips['eager']:.1f} img/s, compiled {ips['compiled']:.1f} img/s (x{ips['compiled'] / ips['eager']:.2f}"
          f" warm), channels-last {ips['channels_last']:.1f} img/s (x{ips['channels_last'] / ips['eager']:.2f})")
    print(f"compile time (first two compiled steps less two warm ones): {compile_s:.0f} s; images in a 15-minute "
          f"run, compiled / eager: {gain:.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--arch", default="resnet18", choices=tuple(ARCH_FLAGS), help="the model of sections 1 and 2")
    p.add_argument("--batch", type=int, default=32, help="batch of the trainer and the bare steps")
    p.add_argument("--threads", type=int, default=1, help="compute threads of the trainer and the bare steps")
    p.add_argument("--workers", type=int, default=1, help="the trainer's loader processes")
    p.add_argument("--warmup", type=int, default=2, help="trainer steps left out of its images/s")
    p.add_argument("--steps", type=int, default=6, help="measured trainer steps (after --warmup)")
    p.add_argument("--trainer-runs", type=int, default=3, help="trainer runs, each between two reference runs")
    p.add_argument("--reference-steps", type=int, default=3, help="timed steps per reference run")
    p.add_argument("--bf-pairs", type=int, default=3, help="BatchFormer on/off step pairs")
    p.add_argument("--aug-images", type=int, default=16, help="images per augmentation batch")
    p.add_argument("--repeats", type=int, default=3, help="augmentation timings per path and size")
    p.add_argument("--memory-batches", type=int, nargs="+", default=[2, 4], help="batches of the memory probes")
    p.add_argument("--compile-batch", type=int, default=128, help="batch of section 5 (the CIFAR recipe's per process)")
    p.add_argument("--compile-blocks", type=int, default=4, help="alternating blocks of 3 steps in section 5")
    p.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--reference-probe", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args.memory_probe)
    if args.reference_probe:
        return reference_probe(args)
    if args.compile_probe:
        torch.set_num_threads(args.threads)
        return compile_probe(args)
    only = args.only.split(",")
    unknown = set(only) - set(SECTIONS)
    if unknown:
        sys.exit(f"error: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    start = time.time()
    print(f"# bench/speed.py on {hardware()}")
    if "trainer" in only:
        trainer_vs_reference(args)
    if "bf" in only:
        batchformer_overhead(args)
    if "augment" in only:
        augmentation_speed(args)
    if "memory" in only:
        memory_estimate(args)
    if "compile" in only:
        compile_speed(args)
    print(f"\n(total {time.time() - start:.0f} s; load average now {', '.join(f'{x:.1f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
