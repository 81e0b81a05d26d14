"""The pieces of bfcl.embed that work on shards: the data set of an index's images, the
identity of a job (backbone weights, image list), one shard computed across processes, and its
file written, found and verified. A shard file holds "features" [n, C] raw fp32 (zeros where
unreadable), "readable" [n] uint8, and in its metadata the job's identity, its index range, the
SHA-256 of its features and the unreadable images' reasons.
"""

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, Subset

from bfcl.checkpoint import CheckpointError, save_file_atomic
from bfcl.evaluation import gather_in_order, shard
from bfcl.images import UnreadableImage, read_image
from bfcl.index import ImageIndex
from bfcl.paths import atomic_open
from bfcl.views import eval_transform

FORMAT = "bfcl-embeddings-1"


def weights_sha256(state: dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: the backbone's identity,
    whatever file (or none, for random init) it came from."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def list_sha256(paths) -> str:
    """SHA-256 of the paths written one a line, as in images.txt."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fsencode(p) + b"\n")
    return h.hexdigest()


class IndexImages(Dataset):
    """Item i of the index: (image [3, S, S] or zeros, 1 if read else 0, reason or "")."""

    def __init__(self, index: ImageIndex, image_size: int, max_pixels: int | None):
        self.index, self.size, self.max_pixels = index, image_size, max_pixels
        self.transform = eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        rel = self.index.paths[i]
        if "\n" in rel or "\r" in rel:  # images.txt could not name it on one line
            return torch.zeros(3, self.size, self.size), 0, "the path holds a line break"
        try:
            return self.transform(read_image(self.index.path(i), self.max_pixels)), 1, ""
        except UnreadableImage as e:
            return torch.zeros(3, self.size, self.size), 0, e.reason


def write_text_atomic(path: str, lines) -> None:
    with atomic_open(path, "wb") as f:
        for line in lines:
            f.write(os.fsencode(line) + b"\n")


def refuse_other(output_dir: str, file: str, meta: dict, want: dict) -> None:
    """CheckpointError if `file`'s metadata names another backbone or image list than `want`."""
    for key, what in (("weights_sha256", "backbone weights"), ("list_sha256", "image list")):
        if meta.get(key) != want[key]:
            raise CheckpointError(
                f"{file} holds embeddings of another {what} (SHA-256 {meta.get(key)}, this run's {want[key]}); "
                f"delete {os.path.join(output_dir, 'embeddings.safetensors')} and {os.path.join(output_dir, 'shards')}"
                " to start over, or choose another --output-dir")


def read_metadata(file: str) -> dict:
    """A safetensors file's metadata; {} for a missing, torn or foreign file."""
    try:
        with safe_open(file, framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 (a torn or foreign file is simply not trusted)
        return {}


def finished_shard(file: str, want: dict, start: int, stop: int) -> dict | None:
    """The shard's tensors and metadata if `file` is a complete shard of exactly this job, else None."""
    meta = read_metadata(file)
    if any(meta.get(k) != str(want[k]) for k in want) or meta.get("range") != f"{start}:{stop}":
        return None
    try:
        t = load_file(file)
    except Exception:  # noqa: BLE001
        return None
    if t["features"].shape[0] != stop - start or tensor_sha256(t["features"]) != meta.get("features_sha256"):
        return None
    return {**t, "unreadable": json.loads(meta["unreadable"])}


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@torch.no_grad()
def embed_shard(model, dataset, start: int, stop: int, batch_size: int, workers: int, accelerator, device,
                 progress) -> dict:
    """Raw fp32 features [stop - start, C], readable flags and reasons of images start..stop-1,
    this process's share computed here and the rest gathered from the others."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = [start + i for i in shard(stop - start, batch_size, rank, world)]
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, num_workers=workers)
    feats, ok, unreadable = [torch.zeros(0, model.feature_dim)], [torch.zeros(0, dtype=torch.uint8)], {}
    done = 0
    for step, (images, read, reasons) in enumerate(loader):
        feats.append(model(images.to(device)).float().cpu())
        ok.append(read.to(torch.uint8))
        unreadable.update({mine[done + j]: r for j, r in enumerate(reasons) if r})
        done += len(read)
        if progress is not None and rank == 0:  # rank 0 has every round of batches (shard)
            first = step * world * batch_size
            progress(min(first + world * batch_size, stop - start) - first)  # this round, all processes
    feats, ok = torch.cat(feats), torch.cat(ok)
    if world > 1:
        from accelerate.utils import gather_object
        feats, ok = gather_in_order(accelerator, [i - start for i in mine], stop - start, feats, ok)
        unreadable = {k: v for part in gather_object([unreadable]) for k, v in part.items()}
    return {"features": feats, "readable": ok, "unreadable": {str(k): v for k, v in sorted(unreadable.items())}}


def save_shard(file: str, part: dict, want: dict, start: int, stop: int) -> None:
    meta = {**{k: str(v) for k, v in want.items()}, "range": f"{start}:{stop}",
            "features_sha256": tensor_sha256(part["features"]), "unreadable": json.dumps(part["unreadable"])}
    save_file_atomic({"features": part["features"], "readable": part["readable"]}, file, meta)


def shard_names(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
