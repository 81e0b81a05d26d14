"""How the image index (bfcl/index.py) holds at ImageNet scale: synthetic trees of empty files,
nested like ImageNet (train/<1000 classes>/) and like a photo dump (YYYY/MM-DD/, ~100 a day),
indexed cold (walking the tree) and warm (the saved index, checked with one stat per folder);
then the memory of the main process and of 8 forked DataLoader workers that each read every
sample's path and label. Prints a markdown table; deletes its trees.

    python bench/data_index.py                       # 100 k and 1.28 M files, both shapes (make bench-data-index)
    python bench/data_index.py --sizes 20000 --workers 2

Measured (docs/data.md; AMD EPYC, 2 shared cores, 2026-12-01): at 1.28 M files 11.6 s cold, 0.27 s
warm, 60 MB on disk, 62 MB in the main process, and 8 workers add 4.9 % to it.

"Cold" walks a tree the page cache still holds (it was just written): on a network file system
or after a reboot the walk waits for metadata reads too. Memory: "dataset" is the main process's
RSS growth from loading the index; "worker private" is the most any worker's private (unshared)
memory grew while it touched every sample, which is what workers add.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bfcl.precision import cpu_name  # noqa: E402

# Run in a fresh interpreter, so that its memory is the index's and nothing left from building trees.
MEASURE = r"""
import json, os, sys, time
import torch
from torch.utils.data import DataLoader, IterableDataset
from bfcl.index import ImageIndex, saved_or_built

def memory_kib():
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Rss", "Private_Clean", "Private_Dirty"):
                fields[key] = int(value.split()[0])
    return fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]

class Touch(IterableDataset):
    def __init__(self, index):
        self.index = index
    def __iter__(self):
        _, private_before = memory_kib()
        total = 0
        for i in range(len(self.index)):
            total += len(self.index.path(i)) + self.index.label(i)
        rss, private = memory_kib()
        yield rss, private - private_before

data, file, mode, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rss_before, _ = memory_kib()
start = time.perf_counter()
index, note = saved_or_built(data, None, file, rebuild_ok=True)
seconds = time.perf_counter() - start
rss_after, _ = memory_kib()
result = {"seconds": seconds, "note": note, "images": len(index), "folders": len(index.folders),
          "dataset_kib": rss_after - rss_before}
if mode == "warm":
    loader = DataLoader(Touch(index), batch_size=None, num_workers=workers, multiprocessing_context="fork")
    rows = list(loader)
    result["worker_rss_kib"] = [int(r) for r, _ in rows]
    result["worker_private_kib"] = [int(p) for _, p in rows]
    result["main_rss_kib"] = memory_kib()[0]
print(json.dumps(result))
"""


def make_tree(root: str, shape: str, files: int) -> str:
    """Empty files: 'imagenet' root/train/n<c>/n<c>_<i>.JPEG over 1000 classes; 'dump'
    root/YYYY/MM-DD/IMG_<i>.jpg, 100 a day from 2000-01-01. Returns what --data would be."""
    if shape == "imagenet":
        for c in range(1000):
            folder = os.path.join(root, "train", f"n{c:08d}")
            os.makedirs(folder)
            for i in range(c, files, 1000):
                open(os.path.join(folder, f"n{c:08d}_{i}.JPEG"), "wb").close()
        return root
    day, per_day = 0, 100
    for first in range(0, files, per_day):
        year, rest = divmod(day, 360)
        folder = os.path.join(root, f"{2000 + year}", f"{1 + rest // 30:02d}-{1 + rest % 30:02d}")
        os.makedirs(folder)
        for i in range(first, min(first + per_day, files)):
            open(os.path.join(folder, f"IMG_{i:08d}.jpg"), "wb").close()
        day += 1
    return root


def measure(data: str, file: str, mode: str, workers: int) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", MEASURE, data, file, mode, str(workers)], cwd=repo,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1280000", help="file counts, comma-separated")
    p.add_argument("--shapes", default="imagenet,dump", help="imagenet (1000 class folders), dump (YYYY/MM-DD)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--tmp", default=None, help="where the trees go (default: the system's temporary folder)")
    args = p.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        for files in map(int, args.sizes.split(",")):
            tmp = tempfile.mkdtemp(prefix="bfcl-index-", dir=args.tmp)
            try:
                start = time.perf_counter()
                data = make_tree(os.path.join(tmp, "data"), shape, files)
                made = time.perf_counter() - start
                file = os.path.join(tmp, "out", "image-index.safetensors")
                cold = measure(data, file, "cold", args.workers)
                warm = measure(data, file, "warm", args.workers)
                assert warm["note"].startswith("read from") and warm["images"] == cold["images"] == files, warm
                rows.append({"shape": shape, "files": files, "folders": cold["folders"], "made_s": made,
                             "cold_s": cold["seconds"], "warm_s": warm["seconds"],
                             "index_mb": os.path.getsize(file) / 1e6, "dataset_mb": warm["dataset_kib"] / 1024,
                             "cold_dataset_mb": cold["dataset_kib"] / 1024,
                             "worker_private_mb": max(warm["worker_private_kib"]) / 1024,
                             "workers_add": sum(warm["worker_private_kib"]) / max(1, warm["dataset_kib"]),
                             "worker_rss_mb": max(warm["worker_rss_kib"]) / 1024})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            finally:
                shutil.rmtree(tmp)
    print(f"\nImage index, {cpu_name()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, "
          f"{args.workers} loader workers (fork)\n")
    print("| tree | files | folders | cold index | warm (saved index) | index on disk | dataset memory, main "
          f"| private growth per worker (max) | {args.workers} workers add |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tree = "ImageNet-like, 1000 classes" if r["shape"] == "imagenet" else "photo dump, YYYY/MM-DD"
        print(f"| {tree} | {r['files']:,} | {r['folders']:,} | {r['cold_s']:.1f} s | {r['warm_s']:.2f} s "
              f"| {r['index_mb']:.1f} MB | {r['dataset_mb']:.0f} MB | {r['worker_private_mb']:.1f} MB "
              f"| {100 * r['workers_add']:.1f} % |")


if __name__ == "__main__":
    main()
