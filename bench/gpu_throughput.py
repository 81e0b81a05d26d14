"""The measurements behind bench/gpu.sh; each mode prints one JSON line (and people-readable lines).

    accelerate launch --mixed_precision bf16 bench/gpu_throughput.py synthetic --arch resnet50 --size 224 --batch 256
    accelerate launch --mixed_precision bf16 bench/gpu_throughput.py synthetic --arch vit_small --size 224 --batch 128
    accelerate launch --mixed_precision bf16 bench/gpu_throughput.py trainer --batch 256 -- --data DIR --add_bf 1 ...
    python bench/gpu_throughput.py augment --size 224 --batch 256
    python bench/gpu_throughput.py jpegs DIR --count 8192 --size 256

synthetic: reference_step.py's bare step on random views already on the device, BatchFormer off
  and on, in one process (the same model and math as train.py, no data loading); images/s with
  one device sync per timed block, the phases of a few extra steps, and peak memory.
trainer:   train.py's main() in this process, on a JPEG folder; images/s after the warm-up from
  its metrics.jsonl, and peak memory. --sync-check also counts the host synchronisations
  (torch.cuda.set_sync_debug_mode) by train.py line: outside the log/save sync points there
  should be none.
augment:   views/s of the batched tensor augmentation (bfcl/augment.py) on the device.
jpegs:     a generated JPEG ImageFolder (bfcl.synthetic.pattern_image), written by all cores.
"""

import argparse
import json
import multiprocessing
import os
import resource
import sys
import time
import warnings

import torch

from reference_step import PHASES, build, make_views, run_steps
from trainer_log import trainer_throughput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30


def peak_memory(device: torch.device) -> dict:
    """GiB: torch.cuda.max_memory_allocated on a GPU; the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / GiB, "memory": "cuda max_memory_allocated"}
    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, "memory": "peak RSS"}


def synthetic(args) -> None:
    from accelerate import Accelerator
    accelerator = Accelerator()
    device = accelerator.device
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    views = make_views(args.batch, args.size, device, arch=args.arch)
    for bf_loss in (None, "pairs-sum"):
        model, optimizer = build(args.arch, args.stem, args.mlp_dim, bf_loss, device, image_size=args.size,
                                 patch_size=args.patch_size)
        if args.compile:
            model = torch.compile(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run_steps(model, optimizer, views, args.warmup, bf_loss, accelerator)
        start = time.perf_counter()
        run_steps(model, optimizer, views, args.steps, bf_loss, accelerator)  # one sync per step, at its end
        seconds = time.perf_counter() - start
        phases = run_steps(model, optimizer, views, 3, bf_loss, accelerator, phases=True)
        result = {"mode": "synthetic", "arch": args.arch, "size": args.size, "batch": args.batch,
                  "bf": bf_loss or "off", "precision": accelerator.mixed_precision, "compile": args.compile,
                  "cudnn_benchmark": args.cudnn_benchmark, "img_per_s": args.steps * args.batch / seconds,
                  **peak_memory(device),
                  "phases_ms": {k: 1000 * sorted(v)[1] for k, v in phases.items() if k in PHASES}}
        print(json.dumps(result), flush=True)
        del model, optimizer
        accelerator.free_memory()


def trainer(args) -> None:
    sys.path.insert(0, REPO)
    import train
    out = args.train_args[args.train_args.index("--output-dir") + 1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    syncs = {}
    with warnings.catch_warnings(record=True) as caught:
        if args.sync_check and device.type == "cuda":
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        code = train.main(args.train_args)
        if args.sync_check and device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{os.path.basename(w.filename)}:{w.lineno}"
            syncs[where] = syncs.get(where, 0) + 1
    result = {"mode": "trainer", "args": " ".join(args.train_args), "exit": code,
              **trainer_throughput(os.path.join(out, "metrics.jsonl"), args.batch, args.warmup),
              **peak_memory(device)}
    if args.sync_check:
        result["host_syncs_by_line"] = syncs if device.type == "cuda" else "not checked (no CUDA)"
    print(json.dumps(result), flush=True)


def augment(args) -> None:
    from bfcl.augment import BatchedTwoViews
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for compiled in (False, True) if args.compile else (False,):
        views = BatchedTwoViews(args.size, 0.2, compile=compiled)
        source = views.source_size
        images = torch.randint(0, 256, (args.batch, 3, source, source), dtype=torch.uint8, device=device)
        params = views.draw(torch.tensor([[source, source]]).expand(args.batch, 2), torch.Generator().manual_seed(0))
        for _ in range(2):
            views(images, params)
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            views(images, params)
        sync()
        seconds = (time.perf_counter() - start) / args.steps
        print(json.dumps({"mode": "augment", "device": str(device), "size": args.size, "batch": args.batch,
                          "compile": compiled, "views_per_s": 2 * args.batch / seconds,
                          "ms_per_batch": 1000 * seconds}),
              flush=True)


def _write_images(job) -> None:
    from PIL import Image

    from bfcl.synthetic import pattern_image
    root, classes, size, start, stop = job
    g = torch.Generator().manual_seed(start)
    for i in range(start, stop):
        c = i % classes
        Image.fromarray(pattern_image(c, classes, size, g).numpy()).save(
            os.path.join(root, f"class_{c}", f"{i:06d}.jpg"), quality=90)


def jpegs(args) -> None:
    root = os.path.join(args.root, "train")
    for c in range(args.classes):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
    chunk = -(-args.count // os.cpu_count())
    jobs = [(root, args.classes, args.size, s, min(s + chunk, args.count)) for s in range(0, args.count, chunk)]
    with multiprocessing.Pool() as pool:
        pool.map(_write_images, jobs)
    print(json.dumps({"mode": "jpegs", "root": args.root, "count": args.count, "size": args.size}), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("--arch", default="resnet50")
    s.add_argument("--stem", default="imagenet")
    s.add_argument("--patch-size", type=int, default=16, help="ViTs")
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--mlp-dim", type=int, default=4096)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--compile", action="store_true")
    s.add_argument("--cudnn-benchmark", action="store_true")
    t = sub.add_parser("trainer")
    t.add_argument("--batch", type=int, required=True, help="train.py's -b, for images/s")
    t.add_argument("--warmup", type=int, default=10, help="steps left out of images/s")
    t.add_argument("--sync-check", action="store_true")
    t.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's arguments")
    a = sub.add_parser("augment")
    a.add_argument("--size", type=int, default=224)
    a.add_argument("--batch", type=int, default=256)
    a.add_argument("--steps", type=int, default=10)
    a.add_argument("--compile", action="store_true", help="also measure it under torch.compile")
    j = sub.add_parser("jpegs")
    j.add_argument("root")
    j.add_argument("--count", type=int, default=8192)
    j.add_argument("--size", type=int, default=256)
    j.add_argument("--classes", type=int, default=8)
    args = p.parse_args(argv)
    if args.mode == "trainer" and args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    return args


if __name__ == "__main__":
    args = parse_args()
    {"synthetic": synthetic, "trainer": trainer, "augment": augment, "jpegs": jpegs}[args.mode](args)
