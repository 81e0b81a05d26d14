"""What embed, --neighbours and --duplicates cost and how well they work (issue 35), on 2 CPU cores.

    .venv/bin/python bench/embed_bench.py --out bench-results/embed --pretrained runs/q/backbone.safetensors
    .venv/bin/python bench/embed_bench.py --only neighbours --sizes 10000 50000 100000

Parts (--only PART runs one; each writes its own entry of results.json and results.md in --out):
  neighbours  --neighbours 10 over N random rows of width 512, for each --sizes N: seconds and peak
              memory (ru_maxrss of a fresh process, above the rows themselves), matmul in float32
              and, where the CPU has native bf16, bfloat16 (certified, bfcl/neighbours.py), with
              the share of rows whose answer differs from float32's. Grows as N² (the matmul).
  speed       the embed pass (bfcl.embed.embed_images: reading, decoding, transform, forward,
              files) against the bare forward pass of the same backbone on the same batches,
              decoded beforehand: images/s each and their ratio. Grows as N.
  retrieval   CIFAR-10 val (labels only to score): precision@10 and mAP@100 of each row's
              neighbours, for every --pretrained backbone and random init. mAP@100: the mean
              over queries of sum_{i<=100} precision@i · relevant_i / 100 (every class has 999
              others, so 100 relevant images are possible).
  duplicates  the first --dup-images CIFAR-10 train images copied, --dup-per-kind of them each
              planted again as a JPEG at quality 40, resized to 24 px, a 90 % centre crop, a
              horizontal flip, or with colour changed (brightness x1.1, saturation x0.9);
              precision (pairs in one group that are planted pairs; natural near-duplicates in
              CIFAR-10 count as false) and recall per kind of duplicate_groups over a sweep of T.

Threads: torch.set_num_threads(--threads), 2 by default.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from bfcl.embed import embed_images, load  # noqa: E402
from bfcl.evaluation import load_backbone  # noqa: E402
from bfcl.index import index_folder, index_image_folder  # noqa: E402
from bfcl.neighbours import duplicate_groups, neighbours  # noqa: E402
from bfcl.pretrained import set_head  # noqa: E402
from bfcl.precision import cpu_has_native_bf16, cpu_name  # noqa: E402
from bfcl.views import eval_transform  # noqa: E402

DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "cifar10"))
PARTS = ("neighbours", "speed", "retrieval", "duplicates")
THRESHOLDS = (0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.998)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def neighbours_child(n: int, matmul: str, block: int, threads: int) -> dict:
    """One search in this (fresh) process: seconds, peak memory above the rows, agreement with fp32."""
    torch.set_num_threads(threads)
    x = torch.randn(n, 512, generator=torch.Generator().manual_seed(0))
    before = rss_mb()
    start = time.time()
    indices, _ = neighbours(x, 10, block=block, matmul=matmul)
    seconds = time.time() - start
    result = {"n": n, "matmul": matmul, "block": block, "seconds": round(seconds, 2),
              "peak_mb_above_rows": round(rss_mb() - before), "rows_mb": round(x.numel() * 4 / 2**20)}
    if matmul == "bfloat16" and n <= 20000:  # the check costs a float32 search more
        result["rows_differing_from_float32"] = int((neighbours(x, 10, block=block)[0] != indices).any(1).sum())
    return result


def part_neighbours(args) -> dict:
    runs = []
    for n in args.sizes:
        for matmul in ("float32", "bfloat16") if cpu_has_native_bf16() else ("float32",):
            cmd = [sys.executable, __file__, "--child", str(n), matmul, "--block", str(args.block),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    return {"runs": runs}


def backbone_for(pretrained: str | None, args):
    return load_backbone(pretrained, arch=args.arch, stem=args.stem, image_size=args.image_size, seed=0)


def part_speed(args) -> dict:
    backbone = backbone_for(args.pretrained[0] if args.pretrained else None, args)
    index = index_image_folder(os.path.join(args.data, "train"))
    index = index.subset(range(min(args.images, len(index))))
    out = os.path.join(args.out, "speed-embed")
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    result = embed_images(backbone, index, out, image_size=args.image_size, batch_size=args.batch_size,
                          workers=args.workers)
    embed_s = time.time() - start
    model = backbone.model(num_classes=1, image_size=args.image_size)
    set_head(model, torch.nn.Identity())
    model.eval()
    transform = eval_transform(args.image_size)
    images = torch.stack([transform(Image.open(index.path(i)).convert("RGB")) for i in range(len(index))])
    start = time.time()
    with torch.no_grad():
        for batch in images.split(args.batch_size):
            model(batch)
    forward_s = time.time() - start
    return {"images": len(index), "workers": args.workers, "batch_size": args.batch_size,
            "embed_images_per_s": round(len(index) / embed_s, 1),
            "forward_images_per_s": round(len(index) / forward_s, 1),
            "ratio": round(forward_s / embed_s, 3), "rows": result.rows}


def retrieval_scores(indices: torch.Tensor, labels: torch.Tensor) -> dict:
    """precision@10 and mAP@100 (docstring) of neighbour lists [N, >=100] against labels [N]."""
    relevant = (labels[indices[:, :100]] == labels[:, None]).float()  # [N, 100]
    precision_at = relevant.cumsum(1) / torch.arange(1, 101)
    return {"precision@10": round(100 * relevant[:, :10].mean().item(), 2),
            "mAP@100": round(100 * (precision_at * relevant).sum(1).div(100).mean().item(), 2)}


def part_retrieval(args) -> dict:
    index = index_image_folder(os.path.join(args.data, "val"))
    if args.val_images < len(index):  # a seeded sample keeps every class (a quick check, not the measure)
        index = index.subset(sorted(torch.randperm(len(index), generator=torch.Generator().manual_seed(0))
                                    [:args.val_images].tolist()))
    results = {}
    for k, pretrained in enumerate([None] + list(args.pretrained)):
        out = os.path.join(args.out, "retrieval", str(k))
        shutil.rmtree(out, ignore_errors=True)
        embed_images(backbone_for(pretrained, args), index, out, image_size=args.image_size,
                     batch_size=args.batch_size, workers=args.workers, backbone_file=pretrained)
        emb = load(out)
        indices, _ = neighbours(emb.matrix, 100, matmul=args.matmul)
        results[pretrained or "random init"] = retrieval_scores(indices, emb.labels)
        print(pretrained or "random init", results[pretrained or "random init"], flush=True)
    return results


EDITS = {
    "jpeg": (lambda im: im, {"format": "JPEG", "quality": 40}),
    "resize": (lambda im: im.resize((24, 24), Image.BICUBIC), {}),
    "crop90": (lambda im: im.crop((2, 2, 30, 30)) if im.size == (32, 32) else
               im.crop((im.width // 20, im.height // 20, im.width - im.width // 20, im.height - im.height // 20)), {}),
    "flip": (ImageOps.mirror, {}),
    "colour": (lambda im: ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.1)).enhance(0.9), {}),
}


def plant(args, root: str) -> tuple[list[tuple[str, str, str]], int]:
    """Copy the first --dup-images train images into root/orig/, and --dup-per-kind edited copies of
    distinct ones per kind into root/<kind>/: ([(original, copy, kind)] relative paths, images)."""
    source = index_image_folder(os.path.join(args.data, "train"))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(source), generator=g)[:args.dup_images].tolist()
    os.makedirs(os.path.join(root, "orig"), exist_ok=True)
    for k, i in enumerate(order):
        Image.open(source.path(i)).convert("RGB").save(os.path.join(root, "orig", f"{k:05d}.png"))
    picks = torch.randperm(len(order), generator=g)[:args.dup_per_kind * len(EDITS)].tolist()
    pairs = []
    for e, (kind, (edit, save)) in enumerate(EDITS.items()):
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        for k in picks[e * args.dup_per_kind:(e + 1) * args.dup_per_kind]:
            name = f"{kind}/{k:05d}.{'jpg' if save else 'png'}"
            edit(Image.open(os.path.join(root, "orig", f"{k:05d}.png"))).save(os.path.join(root, name), **save)
            pairs.append((f"orig/{k:05d}.png", name, kind))
    return pairs, len(order) + len(pairs)


def part_duplicates(args) -> dict:
    root, out = os.path.join(args.out, "duplicates-data"), os.path.join(args.out, "duplicates-embed")
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    pairs, _ = plant(args, root)
    pretrained = args.pretrained[0] if args.pretrained else None
    embed_images(backbone_for(pretrained, args), index_folder(root), out, image_size=args.image_size,
                 batch_size=args.batch_size, workers=args.workers, backbone_file=pretrained)
    emb = load(out)
    row = {p: i for i, p in enumerate(emb.paths)}
    indices, scores = neighbours(emb.matrix, 10, matmul=args.matmul)
    sweep = []
    for t in THRESHOLDS:
        group_of = {i: g for g, members in enumerate(duplicate_groups(indices, scores, t)) for i in members}
        found = [group_of.get(row[a], -1) == group_of.get(row[b], -2) for a, b, _ in pairs]
        predicted = sum(len(m) * (len(m) - 1) // 2 for m in _groups(group_of))
        recall = {kind: round(sum(f for f, (_, _, k) in zip(found, pairs) if k == kind) / args.dup_per_kind, 3)
                  for kind in EDITS}
        sweep.append({"T": t, "precision": round(sum(found) / predicted, 4) if predicted else None,
                      "recall": round(sum(found) / len(pairs), 3), "recall_by_kind": recall, "pairs_found": predicted})
        print(sweep[-1], flush=True)
    return {"images": len(emb.paths), "planted_per_kind": args.dup_per_kind, "backbone": pretrained or "random init",
            "sweep": sweep}


def _groups(group_of: dict) -> list[list[int]]:
    members: dict[int, list[int]] = {}
    for i, g in group_of.items():
        members.setdefault(g, []).append(i)
    return list(members.values())


def markdown(results: dict) -> str:
    lines = [f"# embed benchmark, {results['date']}", "", f"`{results['command']}`", "",
             f"{results['cpu']}, {results['threads']} threads, torch {results['torch']}", ""]
    if "neighbours" in results:
        lines += ["| N | matmul | seconds | peak MB above the rows | rows differing from fp32 |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['matmul']} | {r['seconds']} | {r['peak_mb_above_rows']} | "
                  f"{r.get('rows_differing_from_float32', '')} |" for r in results["neighbours"]["runs"]]
    if "speed" in results:
        s = results["speed"]
        lines += ["", "| images | embed img/s | bare forward img/s | ratio |", "|---|---|---|---|",
                  f"| {s['images']} | {s['embed_images_per_s']} | {s['forward_images_per_s']} | {s['ratio']} |"]
    if "retrieval" in results:
        lines += ["", "| backbone | precision@10 | mAP@100 |", "|---|---|---|"]
        lines += [f"| {b} | {r['precision@10']} | {r['mAP@100']} |" for b, r in results["retrieval"].items()
                  if b != "run"]
    if "duplicates" in results:
        lines += ["", "| T | precision | recall | " + " | ".join(EDITS) + " |", "|---" * (3 + len(EDITS)) + "|"]
        lines += [f"| {r['T']} | {r['precision']} | {r['recall']} | " + " | ".join(str(v) for v in
                  r["recall_by_kind"].values()) + " |" for r in results["duplicates"]["sweep"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results/embed")
    p.add_argument("--only", choices=PARTS, action="append", help="run this part only (repeatable)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000, 100000])
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 as train/<class>/ and val/<class>/")
    p.add_argument("--pretrained", nargs="*", default=[], help="backbone files to score (random init always)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", default="imagenet", help="bench/quality.py's recipe: the ImageNet stem at 32 px")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--images", type=int, default=50000, help="speed: how many train images")
    p.add_argument("--val-images", type=int, default=10000, help="retrieval: how many val images (all: 10000)")
    p.add_argument("--dup-images", type=int, default=3000)
    p.add_argument("--dup-per-kind", type=int, default=200)
    p.add_argument("--matmul", choices=("float32", "bfloat16"), default="float32", help="retrieval, duplicates")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(neighbours_child(int(args.child[0]), args.child[1], args.block, args.threads)))
        return 0
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    file = os.path.join(args.out, "results.json")
    results = json.load(open(file)) if os.path.exists(file) else {}
    results.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                    "command": " ".join([os.path.relpath(sys.executable, REPO), *sys.argv]), "cpu": cpu_name(),
                    "threads": args.threads, "torch": torch.__version__, "python": platform.python_version()})
    for part in args.only or PARTS:
        started = time.time()
        results[part] = globals()[f"part_{part}"](args)
        results[part]["run"] = {"date": results["date"], "command": results["command"],
                                "minutes": round((time.time() - started) / 60, 1)}
        with open(file, "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
