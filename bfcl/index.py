"""The list of a data set's images: built once, held in a few packed tensors, saved beside the
run and checked against the disk cheaply.

Three layouts of --data DIR (find_layout):
  imagefolder  DIR/train/<class>/...: labels from the class folders, torchvision ImageFolder's order
  folder       any other folder, searched recursively (hidden files and folders skipped, DIR/val
               left out: it holds the kNN monitor's queries); no labels; folders in path order
  list         --train-list FILE: one image path a line, relative to DIR and inside it, in the file's order
               (bfcl/lists.py); no labels

Memory: the paths, relative to the root, are one uint8 tensor of bytes plus an int64 tensor of
end offsets; the labels one array('q') (-1: none), which reads as Python ints. A Python list of
(path, label) tuples is copied page by page into every DataLoader worker as reading it updates
reference counts; these buffers are only read, so forked workers share their pages.

A saved index (save, load) records what it was built from: the root's real path and the mtime
of every folder it read, or the list file's SHA-256. stale() compares that with the disk: one
stat per folder, no listing. A file changed in place keeps its folder's mtime; that is fine,
since only names are indexed.
"""

import ctypes
import hashlib
import json
import os
import warnings
from array import array

import torch
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError, safe_open

from bfcl.checkpoint import _sha256, save_file_atomic  # the checkpoints' own file hash
from bfcl.folders import DataError, DataWarning, class_walks, folder_walk, refuse_empty, require_folder
from bfcl.lists import read_list
from bfcl.paths import printable

INDEX_FORMAT = "bfcl-image-index-1"
LAYOUTS = {"imagefolder": "ImageFolder", "folder": "folder searched recursively", "list": "list file"}


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (the caller keeps the tensor alive)."""
    size = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * size).from_address(t.data_ptr())).cast("B") if size else memoryview(b"")


def _tensor(buffer: "bytearray | array", dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(buffer, dtype=dtype).clone() if len(buffer) else torch.zeros(0, dtype=dtype)


class PackedStrings:
    """Strings stored as one uint8 tensor of their bytes (os.fsencode) and an int64 tensor of end
    offsets: item i is data[ends[i-1]:ends[i]]. Read through memoryviews (~1 us an item)."""

    def __init__(self, data: torch.Tensor, ends: torch.Tensor):
        self.data, self.ends, self._views = data.contiguous(), ends.contiguous(), None

    def __len__(self) -> int:
        return self.ends.numel()

    def __getitem__(self, i: int) -> str:
        if self._views is None:
            self._views = _bytes_view(self.data), _bytes_view(self.ends).cast("q")
        data, ends = self._views
        i = range(len(ends))[i]  # negative indices; IndexError past the end
        return os.fsdecode(data[ends[i - 1] if i else 0:ends[i]].tobytes())

    def select(self, indices) -> "PackedStrings":
        packer = Packer()
        for i in indices:
            packer.add(self[i])
        return packer.strings()

    def __getstate__(self):  # memoryviews do not pickle (DataLoader workers started by spawn)
        return {"data": self.data, "ends": self.ends}

    def __setstate__(self, state):
        self.__init__(state["data"], state["ends"])


class Packer:
    """Builds PackedStrings one string at a time, without keeping a Python object per string."""

    def __init__(self):
        self.data, self.ends = bytearray(), array("q")

    def add(self, s: "str | bytes", prefix: bytes = b"") -> None:
        self.data += prefix
        self.data += os.fsencode(s)
        self.ends.append(len(self.data))

    def strings(self) -> PackedStrings:
        return PackedStrings(_tensor(self.data, torch.uint8), _tensor(self.ends, torch.int64))


class ImageIndex:
    """Every image of a data set: path(i) (root joined with the packed relative path), labels
    (array of N int64; -1 where the layout has none), classes, and what the scan left out."""

    def __init__(self, root: str, layout: str, paths: PackedStrings, labels: array, classes: list[str],
                 skipped: list[str], source: dict, folders: PackedStrings, folder_mtimes: torch.Tensor):
        self.root, self.layout, self.paths, self.labels = root, layout, paths, labels
        self.classes, self.skipped, self.source = classes, skipped, source
        self.folders, self.folder_mtimes = folders, folder_mtimes  # for stale(); empty for a list

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def label(self, i: int) -> int:
        return self.labels[i]

    def subset(self, indices) -> "ImageIndex":
        """These samples only, in this order (same root, classes and source)."""
        return ImageIndex(self.root, self.layout, self.paths.select(indices),
                          array("q", (self.labels[i] for i in indices)),
                          self.classes, self.skipped, self.source, self.folders, self.folder_mtimes)

    def identity(self) -> dict:
        """What a run trains on, for its checkpoints: the number of images and the SHA-256 of their
        paths relative to the root and their labels, in order (so the same files moved to another
        folder are the same run; a file added, removed, renamed or reordered is not)."""
        h = hashlib.sha256()
        for t in (self.paths.ends, self.paths.data):
            h.update(_bytes_view(t))
        h.update(self.labels.tobytes())
        return {"count": len(self), "sha256": h.hexdigest()}

    def describe(self) -> str:
        what = f"{len(self.classes)} classes, " if self.classes else ""
        source = self.source.get("list_file") or self.root
        return f"{LAYOUTS[self.layout]} {printable(source)}: {what}{len(self)} images"

    def save(self, file: str) -> None:
        """One safetensors file, written atomically (a temporary name, then a rename)."""
        tensors = {"path_bytes": self.paths.data, "path_ends": self.paths.ends,
                   "labels": _tensor(self.labels, torch.int64),
                   "folder_bytes": self.folders.data, "folder_ends": self.folders.ends,
                   "folder_mtimes": self.folder_mtimes}
        meta = {"format": INDEX_FORMAT, "root": self.root, "layout": self.layout, "classes": json.dumps(self.classes),
                "skipped": json.dumps(self.skipped[:100]), "skipped_count": str(len(self.skipped)),
                "source": json.dumps(self.source)}
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
        save_file_atomic(tensors, file, meta)

    @staticmethod
    def load(file: str, root: str | None = None) -> "ImageIndex":
        """The index saved in `file`, or DataError in one line. `root`: the data root as this run
        names it (the same folder; another working directory may name it differently)."""
        try:
            with safe_open(file, framework="pt") as f:
                # cloned: into this process's memory now, which forked workers share, not pages of a
                # file mapping that each worker would fault in (from a network file system, perhaps)
                meta, t = f.metadata() or {}, {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
            if meta.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {INDEX_FORMAT}")
            skipped = json.loads(meta["skipped"])
            skipped += [f"... {int(meta['skipped_count']) - len(skipped)} more"] * (int(meta["skipped_count"]) > 100)
            labels = array("q", _bytes_view(t["labels"]).tobytes())
            return ImageIndex(root or meta["root"], meta["layout"], PackedStrings(t["path_bytes"], t["path_ends"]),
                              labels, json.loads(meta["classes"]), skipped, json.loads(meta["source"]),
                              PackedStrings(t["folder_bytes"], t["folder_ends"]), t["folder_mtimes"])
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise DataError(f"image index {file} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is "
                            "rebuilt from the data on the next start") from None

    def stale(self, layout: str, root: str, list_file: str | None) -> str | None:
        """Why this index no longer describes the data (layout, root or list file differ, a folder
        it read changed or is gone), or None when it still does."""
        now = source_of(layout, root, list_file, hash_list=False)
        for key in ("layout", "root_real", "list_file"):
            if now.get(key) != self.source.get(key):
                return f"it was built from {key.replace('_', ' ')} {self.source.get(key)}, this run has {now.get(key)}"
        if list_file is not None and not (os.path.isfile(list_file) and
                                          _sha256(list_file) == self.source["list_sha256"]):
            return f"{list_file} changed since it was built"
        mtimes = self.folder_mtimes.tolist()
        for i in range(len(self.folders)):
            folder = os.path.join(self.root, self.folders[i])
            try:
                if os.stat(folder).st_mtime_ns != mtimes[i]:
                    return f"{folder} changed since it was built (files added, removed or renamed)"
            except OSError:
                return f"{folder} is gone"
        return None


def source_of(layout: str, root: str, list_file: str | None, hash_list: bool = True) -> dict:
    source = {"layout": layout, "root_real": os.path.realpath(root)}
    if list_file is not None:
        source["list_file"] = os.path.abspath(list_file)
        if hash_list:
            source["list_sha256"] = _sha256(list_file)
    return source


def find_layout(data: str, train_list: str | None = None) -> tuple[str, str]:
    """(layout, root) of --data: 'list' with --train-list, 'imagefolder' when DIR/train exists,
    else 'folder' (DIR itself, searched recursively)."""
    data = os.path.expanduser(data)
    require_folder(data, "pass a folder of images")
    if train_list is not None:
        return "list", data
    train = os.path.join(data, "train")
    return ("imagefolder", train) if os.path.isdir(train) else ("folder", data)


def _pack_folders(root: str, listings, packer: Packer, labels: array, label: int, folders: Packer,
                  mtimes: array) -> int:
    """Add the images of (folder, mtime, names) listings in folder path order; the count added.
    names: a list, or bytes joined by NUL (never in a file name), split here one folder at a time."""
    added = 0
    for folder, mtime, names in sorted(listings, key=lambda listing: listing[0]):
        if isinstance(names, bytes):
            names = names.split(b"\0") if names else []
        rel = folder[len(root):].lstrip(os.sep)
        folders.add(rel)
        mtimes.append(mtime)
        prefix = os.fsencode(rel + os.sep) if rel else b""
        for name in names:
            packer.add(name, prefix)
        labels.extend([label] * len(names))
        added += len(names)
    return added


def _warn_skipped(root: str, skipped: list[str]) -> None:
    if skipped:
        warnings.warn(f"{root}: left out {len(skipped)} folder(s) (e.g. {skipped[0]}), so that each image is "
                      "read once; fix or remove them if images are missing", DataWarning, stacklevel=3)


def _index(root, layout, packer, labels, classes, skipped, source, folders, mtimes) -> ImageIndex:
    return ImageIndex(root, layout, packer.strings(), labels, classes, skipped, source,
                      folders.strings(), _tensor(mtimes, torch.int64))


def index_image_folder(root: str) -> ImageIndex:
    """Every image of an ImageFolder-layout directory (root/<class>/...), in torchvision
    ImageFolder's order. Folders left out (see bfcl.folders) are reported in one DataWarning."""
    root = os.path.expanduser(root)
    classes, walks, skipped = class_walks(root)
    packer, labels, folders, mtimes, empty = Packer(), array("q"), Packer(), array("q"), []
    folders.add("")
    mtimes.append(os.stat(root).st_mtime_ns)  # a class folder added or removed
    for c, i, walk in walks:
        listings = [(folder, mtime, files) for folder, mtime, files in walk]
        if not _pack_folders(root, listings, packer, labels, i, folders, mtimes):
            empty.append(c)
    refuse_empty(root, empty, skipped)
    _warn_skipped(root, skipped)
    return _index(root, "imagefolder", packer, labels, classes, skipped, source_of("imagefolder", root, None),
                  folders, mtimes)


def index_folder(root: str, leave_out: tuple[str, ...] = ()) -> ImageIndex:
    """Every image under `root`, searched recursively (hidden files and folders skipped, the
    folders in `leave_out` not read), folders in path order, files sorted; no labels."""
    root = os.path.expanduser(root)
    walk, skipped = folder_walk(root, leave_out)
    # names joined by NUL until the folders are sorted: no Python object per file meanwhile
    listings = [(folder, mtime, b"\0".join(map(os.fsencode, files))) for folder, mtime, files in walk]
    packer, labels, folders, mtimes = Packer(), array("q"), Packer(), array("q")
    if not _pack_folders(root, listings, packer, labels, -1, folders, mtimes):
        left_out = f" (folders left out, e.g. {skipped[0]})" if skipped else ""
        raise DataError(f"{root} holds no images (searched recursively for .jpg, .png, ... in any case; hidden files "
                        f"and folders skipped){left_out}; point --data at a folder of images")
    _warn_skipped(root, skipped)
    return _index(root, "folder", packer, labels, [], skipped, source_of("folder", root, None), folders, mtimes)


def index_list(root: str, list_file: str) -> ImageIndex:
    """The images named in `list_file`, one path a line relative to `root` and inside it, in the
    file's order (bfcl.lists.read_list's rules). A line naming no regular file is a DataError."""
    root = os.path.expanduser(root)
    packer = Packer()
    for number, rel in read_list(list_file, root):
        if not os.path.isfile(os.path.join(root, rel)):
            raise DataError(f"--train-list {printable(list_file)} line {number}: {printable(rel)} is not a file in "
                            f"{printable(root)}; fix or remove the line")
        packer.add(rel)
    empty = Packer()
    return _index(root, "list", packer, array("q", [-1]) * len(packer.ends), [], [],
                  source_of("list", root, list_file), empty, array("q"))


def build_index(layout: str, root: str, list_file: str | None = None, leave_out: tuple[str, ...] = ()) -> ImageIndex:
    if layout == "imagefolder":
        return index_image_folder(root)
    if layout == "list":
        return index_list(root, list_file)
    return index_folder(root, leave_out)


def saved_or_built(data: str, train_list: str | None, file: str, rebuild_ok: bool) -> tuple[ImageIndex, str]:
    """(index, what happened) for --data/--train-list: the one saved in `file` if it still
    describes the data, else a new one, saved to `file`. A stale saved index is rebuilt only
    where rebuild_ok (a fresh run, or --force-resume); otherwise DataError saying why, since a
    resumed run would see other images in another order. One that cannot be read is rebuilt:
    the checkpoint records which images it was trained on (ImageIndex.identity), and a resume
    compares the new index with that, not with this file."""
    layout, root = find_layout(data, train_list)
    note = f"built, saved to {file}"
    if os.path.exists(file):
        try:
            index = ImageIndex.load(file, root)
            why = index.stale(layout, root, train_list)
        except DataError as e:
            index, why, rebuild_ok = None, str(e), True
        if why is None:
            return index, f"read from {file}"
        if not rebuild_ok:
            raise DataError(f"the saved image index {file} is out of date: {why}. Resuming would read other images "
                            "in another order: restore the data, pass --force-resume to rebuild the index, or start "
                            "a new --output-dir")
        note = f"rebuilt ({why}), saved to {file}"
    leave_out = (os.path.join(root, "val"),) if layout == "folder" else ()
    index = build_index(layout, root, train_list, leave_out)
    index.save(file)
    return index, note


INDEX_FILE = "image-index.safetensors"  # the saved index's name in a run's output folder


def training_index(data: str, train_list: str | None, output_dir: str, accelerator,
                   rebuild_ok: bool) -> tuple[ImageIndex, str]:
    """(index of the images of data / train_list, how it was obtained), on every process of
    `accelerator` (an accelerate.Accelerator). Only the main process walks the data: it reads the
    index saved in output_dir/INDEX_FILE if that still matches the data, else builds and saves it
    (saved_or_built; a stale one is rebuilt only where rebuild_ok); the others then read the file,
    which a resume or a restart after preemption reads too (the output folder is shared by every
    node, as for checkpoints). Reading a file beats broadcasting: no pickled copy of the index in
    every process, and no second format. A DataError on the main process is raised on all of them."""
    file = os.path.join(output_dir, INDEX_FILE)
    outcome = None
    if accelerator.is_main_process:
        try:
            index, note = saved_or_built(data, train_list, file, rebuild_ok)
            outcome = ("ok", note)
        except DataError as e:
            outcome = ("error", str(e))
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list([outcome])[0]
    if outcome[0] == "error":
        raise DataError(outcome[1])
    if not accelerator.is_main_process:
        index = ImageIndex.load(file, find_layout(data, train_list)[1])
    return index, outcome[1]
