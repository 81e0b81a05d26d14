"""Embeddings of any image collection with a frozen backbone, written so that any tool can join
rows to files, and read back in a notebook.

    emb = bfcl.embed.load("runs/embed")                 # matrix [N, C], paths, labels, metadata
    bfcl.embed.most_similar(emb, "2021/07/IMG_0042.jpg", k=5)   # [(path, cosine), ...] best first

embed_images writes into its output folder:
    embeddings.safetensors  "embeddings" [N, C] (float32 or float16, L2-normalised unless asked not
                            to), "labels" [N] int64 where the layout has classes; metadata: the
                            backbone (file, file SHA-256, weights SHA-256, arch, stem), image size
                            and crop, normalised, dtype, rows, the SHA-256 of images.txt and of the
                            image list
    images.txt              row i's path relative to the data root, one a line
    unreadable.txt          path<TAB>reason of each image that could not be read; they get NO row,
                            so row i is always line i of images.txt (simplest to join on)
    shards/00000.safetensors ...  while running: shard_size images each, raw fp32 features; a rerun
                            skips the finished ones (checked by their SHA-256), so a killed run
                            resumes; deleted once embeddings.safetensors is in place.

Every file is written under a temporary name and renamed; embeddings.safetensors last, and it
names the SHA-256 of images.txt, which load() checks: a half-finished rewrite is never trusted.
Several processes (accelerate/torchrun) split each shard like bfcl.evaluation.shard and write
the rows one process would: every batch is one a single process with the same batch size sees.
"""

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open

from bfcl.checkpoint import CheckpointError, _sha256, save_file_atomic
from bfcl.embed_shards import (FORMAT, IndexImages, embed_shard, finished_shard, list_sha256, read_metadata,
                               refuse_other, save_shard, shard_names, weights_sha256, write_text_atomic)
from bfcl.evaluation import Backbone, default_image_size
from bfcl.errors import DataError
from bfcl.images import DEFAULT_MAX_PIXELS, UnreadableImage, read_image
from bfcl.index import INDEX_FILE, ImageIndex, saved_or_built
from bfcl.pretrained import set_head
from bfcl.views import eval_resize

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class EmbedResult:
    rows: int  # readable images = rows written
    width: int  # feature width C
    unreadable: list[str]  # their paths
    shards_computed: int
    shards_reused: int  # finished by an earlier, interrupted run
    seconds: float
    images_per_s: float  # over the images computed in this run


@dataclass(frozen=True)
class Embeddings:
    matrix: torch.Tensor  # [N, C]
    paths: list[str]  # N, relative to the data root
    labels: torch.Tensor | None  # [N] int64, or None
    metadata: dict


def embed_index(data: str, train_list: str | None, output_dir: str) -> tuple[ImageIndex, str]:
    """(index, what happened) of the images train.py would read from --data / --train-list,
    saved in output_dir as train.py does (the same layouts and rules); DataError for a folder
    without images."""
    return saved_or_built(data, train_list, os.path.join(output_dir, INDEX_FILE), rebuild_ok=True)


def image_size_for(backbone: Backbone, index: ImageIndex, image_size: int | None, max_pixels: int) -> tuple[int, str]:
    """default_image_size, with the small stem's data side read off the index's first readable image
    (default_image_size reads train/, which a folder or a list has not)."""
    if image_size or backbone.info.get("image_size") or backbone.stem != "small":
        return default_image_size(backbone, "", image_size, max_pixels)
    for i in range(min(len(index), 100)):
        try:
            return min(read_image(index.path(i), max_pixels).size), f"side of {index.paths[i]} (small stem)"
        except UnreadableImage:
            continue
    raise DataError(f"none of the first 100 images of {index.root} can be read (e.g. {index.path(0)}); "
                    "check the data, or pass --image-size")


def _backbone_meta(backbone: Backbone, backbone_file: str | None, image_size: int) -> dict:
    file_sha = _sha256(backbone_file) if backbone_file and os.path.isfile(backbone_file) else ""
    return {"backbone_file": backbone_file or backbone.info.get("source", ""), "backbone_file_sha256": file_sha,
            "arch": backbone.arch, "stem": backbone.stem, "image_size": str(image_size),
            "crop": f"resize {eval_resize(image_size)}, centre crop {image_size}"}


def embed_images(backbone: Backbone, images: ImageIndex, output_dir: str, *, image_size: int | None = None,
                 batch_size: int = 256, workers: int = 0, dtype: torch.dtype = torch.float32, normalise: bool = True,
                 shard_size: int = 65536, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 backbone_file: str | None = None, accelerator=None, progress=None) -> EmbedResult:
    """Embed every image of `images` (bfcl.index, in its order) with the frozen backbone and write
    the files of the module docstring into output_dir. Every process calls it; the main one writes.

    Input per image: the eval transform (Resize + CenterCrop `image_size`, default the backbone's
    recorded size or 224). Output: [rows, C] features of the pooled backbone (the head removed).
    batch_size is per process; shard_size is rounded down to whole batches (at least one).
    Unreadable images (bfcl.images.read_image) get no row and are listed in unreadable.txt.
    progress(n), on the main process only, is told of every n images done by all processes
    (those of shards an interrupted run finished too): n sums to len(images). A rerun of a
    finished embedding (same backbone, images, size, dtype, normalisation) computes nothing.
    Raises DataError for an empty index or no readable image, and CheckpointError if output_dir
    holds embeddings of another backbone or image list.
    """
    started, n = time.time(), len(images)
    if n == 0:
        raise DataError(f"{images.root} holds no images; point --data at a folder of images")
    if dtype not in DTYPES.values():
        raise ValueError(f"embedding dtype {dtype} is not one of {', '.join(DTYPES)}")
    main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    shard_size = max(1, shard_size // batch_size) * batch_size  # each shard whole batches: one process's batches
    image_size = image_size or int(backbone.info.get("image_size") or 224)
    want = {"format": FORMAT, "weights_sha256": weights_sha256(backbone.state),
            "list_sha256": list_sha256(images.paths[i] for i in range(n)), "image_size": image_size,
            "shard_size": shard_size}
    final, shard_dir = os.path.join(output_dir, "embeddings.safetensors"), os.path.join(output_dir, "shards")
    ranges = [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]
    files = [os.path.join(shard_dir, f"{s:05d}.safetensors") for s in range(len(ranges))]
    todo = done = error = None
    if main:  # decided once, so that every process joins the same gathers
        try:
            for file in [final] + sorted(os.path.join(shard_dir, f) for f in shard_names(shard_dir)):
                meta = read_metadata(file)
                if meta.get("format") == FORMAT:
                    refuse_other(output_dir, file, meta, want)
        except CheckpointError as e:
            error = str(e)
        done = None if error else _finished_result(output_dir, want, dtype, normalise, len(ranges), started)
        if error is None and done is None:
            os.makedirs(shard_dir, exist_ok=True)
            todo = [s for s, (start, stop) in enumerate(ranges) if finished_shard(files[s], want, start, stop) is None]
    todo, done, error = _shared(accelerator, [todo, done, error])
    if error is not None:  # raised on every process, not only where it was found
        raise CheckpointError(error)
    if done is not None:  # a rerun of a finished embedding: nothing to do
        return done
    if progress is not None and main and len(todo) < len(ranges):
        progress(n - sum(ranges[s][1] - ranges[s][0] for s in todo))  # finished by an interrupted run
    model = backbone.model(num_classes=1, image_size=image_size)
    set_head(model, torch.nn.Identity())  # features, not class scores
    model.to(device).eval()
    dataset = IndexImages(images, image_size, max_pixels)
    for s in todo:
        start, stop = ranges[s]
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            part = embed_shard(model, dataset, start, stop, batch_size, workers, accelerator, device, progress)
        if main:
            save_shard(files[s], part, want, start, stop)
    computed = sum(ranges[s][1] - ranges[s][0] for s in todo)
    result = error = None
    if main:
        try:
            rows, width, unreadable = _assemble(images, output_dir, files, ranges, want, dtype, normalise,
                                                _backbone_meta(backbone, backbone_file, image_size))
            shutil.rmtree(shard_dir, ignore_errors=True)
            seconds = time.time() - started
            result = EmbedResult(rows, width, unreadable, len(todo), len(ranges) - len(todo), seconds,
                                 computed / seconds if computed else 0.0)
        except DataError as e:  # no image could be read
            error = str(e)
    result, error = _shared(accelerator, [result, error])  # also waits for the main process's writes
    if error is not None:
        raise DataError(error)
    return result


def _shared(accelerator, objects: list) -> list:
    """The main process's objects, on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return objects
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list(objects)


def _finished_result(output_dir: str, want: dict, dtype, normalise: bool, shards: int,
                     started: float) -> EmbedResult | None:
    """The result of an earlier run that wrote exactly these embeddings (same backbone, images,
    image size, dtype and normalisation; images.txt intact), or None."""
    meta = read_metadata(os.path.join(output_dir, "embeddings.safetensors"))
    same = [meta.get(k) == str(want[k]) for k in ("format", "weights_sha256", "list_sha256", "image_size")]
    if not all(same) or meta.get("dtype") != str(dtype).removeprefix("torch.") or \
            meta.get("normalised") != ("yes" if normalise else "no"):
        return None
    try:
        load(output_dir)  # checks images.txt against the file
        with open(os.path.join(output_dir, "unreadable.txt"), "rb") as f:
            unreadable = [os.fsdecode(line.split(b"\t")[0]) for line in f.read().split(b"\n")[:-1]]
    except (CheckpointError, OSError):
        return None
    return EmbedResult(int(meta["rows"]), int(meta["width"]), unreadable, 0, shards, time.time() - started, 0.0)


def _assemble(images: ImageIndex, output_dir: str, files, ranges, want: dict, dtype, normalise: bool,
              backbone_meta: dict) -> tuple[int, int, list[str]]:
    """Join the shards into embeddings.safetensors, images.txt and unreadable.txt: (rows, width,
    unreadable paths). embeddings.safetensors is written last; it names images.txt's SHA-256."""
    feats, readable, reasons = [], [], {}
    for file, (start, stop) in zip(files, ranges):
        part = finished_shard(file, want, start, stop)
        if part is None:
            raise CheckpointError(f"shard {file} changed while embedding; is another run writing there?")
        feats.append(part["features"])
        readable.append(part["readable"].bool())
        reasons.update(part["unreadable"])
    readable = torch.cat(readable)
    rows = readable.nonzero().flatten().tolist()
    if not rows:
        raise DataError(f"none of the {len(images)} images of {images.root} could be read (e.g. "
                        f"{images.path(0)}: {reasons.get('0', '?')}); check the data folder")
    matrix = torch.cat(feats)[readable]
    matrix = (F.normalize(matrix, dim=1) if normalise else matrix).to(dtype)
    paths = [images.paths[i] for i in rows]
    write_text_atomic(os.path.join(output_dir, "images.txt"), paths)
    unreadable = [images.paths[int(i)] for i in reasons]
    write_text_atomic(os.path.join(output_dir, "unreadable.txt"),
                       (f"{p}\t{r}" for p, r in zip(unreadable, reasons.values())))
    tensors = {"embeddings": matrix}
    if images.classes:
        tensors["labels"] = torch.tensor([images.labels[i] for i in rows], dtype=torch.long)
    meta = {**{k: str(v) for k, v in want.items() if k != "shard_size"}, **backbone_meta,
            "normalised": "yes" if normalise else "no", "dtype": str(dtype).removeprefix("torch."),
            "rows": str(len(rows)), "width": str(matrix.shape[1]), "unreadable": str(len(unreadable)),
            "images_sha256": list_sha256(paths), "root": images.root, "classes": json.dumps(images.classes)}
    save_file_atomic(tensors, os.path.join(output_dir, "embeddings.safetensors"), meta)
    return len(rows), matrix.shape[1], unreadable


def load(output_dir: str) -> Embeddings:
    """The embeddings embed_images wrote: matrix [N, C], paths (row i's, relative to the data
    root), labels [N] or None, metadata. CheckpointError if images.txt does not belong to them."""
    file, listing = os.path.join(output_dir, "embeddings.safetensors"), os.path.join(output_dir, "images.txt")
    meta = read_metadata(file)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{file} is missing or not a bfcl embeddings file; run probe.py --mode embed first")
    if not os.path.isfile(listing) or _sha256(listing) != meta["images_sha256"]:
        raise CheckpointError(f"{listing} is missing or does not belong to {file} (an interrupted rewrite?); "
                              "run the embedding again")
    with safe_open(file, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with open(listing, "rb") as f:
        paths = [os.fsdecode(line) for line in f.read().split(b"\n")[:-1]]
    return Embeddings(tensors["embeddings"], paths, tensors.get("labels"), meta)


def most_similar(emb: Embeddings, path_or_index: "str | int", k: int = 5) -> list[tuple[str, float]]:
    """The k rows most cosine-similar to one image (its row, its path as in images.txt, or that
    path joined to the data root), itself left out: [(path, cosine)], best first."""
    i = path_or_index
    if isinstance(i, str):
        rel = os.path.relpath(i, emb.metadata["root"]) if os.path.isabs(i) else i
        if rel not in emb.paths:
            raise KeyError(f"{path_or_index} is not one of the {len(emb.paths)} embedded images")
        i = emb.paths.index(rel)
    x = F.normalize(emb.matrix.float(), dim=1)
    s = x @ x[i]
    s[i] = float("-inf")
    order = s.sort(descending=True, stable=True).indices[:k].tolist()  # equal scores: lower row first
    return [(emb.paths[j], float(s[j])) for j in order]
