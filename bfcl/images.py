"""Image files as input: the guarded reader, and the index of an image folder.

Every read goes through read_image, which refuses decompression bombs before decoding and
turns any decoder failure into UnreadableImage; LabelledImages replaces such an image by the
next readable one and counts it. Folders are scanned by scan_image_folder, in torchvision
ImageFolder's order but reading each folder once, whatever its links.
"""

import contextlib
import copy
import os
import stat
import threading
import warnings
from dataclasses import dataclass

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

class DataError(ValueError):
    """A data folder that cannot be used; the message says what is wrong and how to fix it."""


class DataWarning(UserWarning):
    """Something in a data folder that was left out; the data set is still usable."""


class UnreadableImage(DataError):
    """One image file that cannot be decoded, or is over the pixel cap. Pickles (DataLoader workers)."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"cannot read {self.path}: {self.reason}"


# PIL's own default: it warns above this many pixels and refuses above twice as many.
DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # 89,478,485, e.g. 9459 x 9459
_PIL_LIMIT_LOCK = threading.Lock()


def _new_lock_after_fork() -> None:  # a fork while another thread held the lock would leave it held
    global _PIL_LIMIT_LOCK
    _PIL_LIMIT_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


@contextlib.contextmanager
def _pil_pixel_limit(limit: int | None):
    """PIL's global decompression-bomb limit set to `limit` (None: off) and PIL's warnings
    silenced, for this block only. The warnings (its bomb warning, "Corrupt EXIF data",
    "Truncated File Read", ...) would repeat for every read of the file, and under -W error
    turn a usable image into a failed one. The lock keeps threads from seeing each other's
    setting; DataLoader workers are processes, so it costs nothing there."""
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def read_image(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at `path` as RGB, or UnreadableImage with a one-line reason.

    The size is checked from the header, before any pixel is decoded, so a decompression bomb
    (a small file that declares 64000 x 64000 pixels) costs nothing. PIL's own check is off while
    the header is read (it would raise its own error, or a warning that -W error turns into one)
    and set to our cap while decoding, where PIL checks frame and tile sizes (GIF, TIFF, ICO).
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO named x.jpg would block forever
            raise UnreadableImage(path, "not a regular file")
        with _pil_pixel_limit(None):
            img = Image.open(path)  # reads the header only
        with img, _pil_pixel_limit(max_pixels):
            width, height = img.size
            if max_pixels and width * height > max_pixels:
                raise UnreadableImage(path, f"{width}x{height} pixels, over the {max_pixels}-pixel cap; "
                                            "raise --max-image-pixels to allow it")
            return img.convert("RGB")
    except UnreadableImage:
        raise
    except Exception as e:  # noqa: BLE001
        # PIL's decoders raise many types on malformed bytes (OSError, ValueError, SyntaxError,
        # EOFError, struct.error, IndexError, ZeroDivisionError, DecompressionBombError, ...);
        # this block runs only PIL on the file's content, so any exception is the file's fault.
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UnreadableImage(path, f"{type(e).__name__}: {reason}" if reason else type(e).__name__) from None


@dataclass
class FolderScan:
    """An ImageFolder-layout directory as torchvision's ImageFolder lists it (classes sorted,
    files sorted within each folder, folders in sorted path order), plus what was left out."""

    root: str
    classes: list[str]
    class_to_idx: dict[str, int]
    samples: list[tuple[str, int]]  # (path, class index)
    skipped: list[str]  # "link -> target (why)" or "folder (error)", one per folder left out


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()  # follows links; False for FIFOs, devices and broken links
    except OSError:
        return False


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_folders(root: str) -> tuple[list[str], list[str]]:
    """(sorted class names, their real paths), or DataError."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist; pass a folder with one subfolder per class")
    try:
        classes = sorted(e.name for e in os.scandir(root) if _is_dir(e))
    except OSError as e:
        raise DataError(f"data folder {root} cannot be listed ({e.strerror}); check its permissions") from None
    if not classes:
        raise DataError(f"{root} has no class subfolders; expected {root}/<class>/<image>.jpg")
    root_real = os.path.realpath(root)
    reals = [os.path.realpath(os.path.join(root, c)) for c in classes]
    owner = {}
    for c, real in zip(classes, reals):
        if _inside(root_real, real):
            raise DataError(f"class folder {os.path.join(root, c)} links to {real}, which holds the data folder; "
                            "point it at the class's images")
        if real in owner:
            raise DataError(f"class folders {owner[real]} and {c} of {root} are the same folder; their images "
                            "would carry two labels. Remove one")
        owner[real] = c
    return classes, reals


def _walk_class(folder: str, real: str, data_reals: list[str], visited: set, skipped: list):
    """Yield (folder path, sorted image file names) of one class's tree.

    Links to folders are followed (data sets are often symlinked together), but only after the
    class's real subfolders, and never into a folder this scan has read or will read at its own
    place: one already visited, one inside the data folder or a class folder, or one above
    them. A loop therefore cannot repeat or multiply images, and no image gets two labels.
    Only regular files (after links) with an image extension count; a FIFO would block a reader.
    """
    stack, links = [(folder, real)], []
    while stack or links:
        if not stack:
            link = links.pop(0)
            target = os.path.realpath(link)
            if target in visited or any(_inside(target, r) or _inside(r, target) for r in data_reals):
                skipped.append(f"{link} -> {target} (a folder read elsewhere in this scan, or above the data)")
            else:
                visited.add(target)
                stack.append((link, target))
            continue
        folder, real = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            skipped.append(f"{folder} ({e.strerror})")
            continue
        files = []
        for e in entries:
            if _is_dir(e):
                if e.is_symlink():
                    links.append(e.path)
                elif os.path.join(real, e.name) in visited:  # a bind mount, or another class's folder
                    skipped.append(f"{e.path} (a folder read elsewhere in this scan)")
                else:
                    visited.add(os.path.join(real, e.name))
                    stack.append((e.path, os.path.join(real, e.name)))
            elif e.name.lower().endswith(IMG_EXTENSIONS) and _is_file(e):
                files.append(e.name)
        yield folder, files


def _class_trees(root: str):
    """(classes, [(class, index, walk generator)], skipped list) sharing one scan's state."""
    classes, reals = _class_folders(root)
    data_reals = [os.path.realpath(root), *reals]
    visited, skipped = set(data_reals), []
    walks = [(c, i, _walk_class(os.path.join(root, c), reals[i], data_reals, visited, skipped))
             for i, c in enumerate(classes)]
    return classes, walks, skipped


def _refuse_empty(root: str, empty: list[str], skipped: list[str]) -> None:
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        left_out = f" (folders left out, e.g. {skipped[0]})" if skipped else ""
        raise DataError(f"{root} has class folders without images ({shown}){left_out}; remove them or add images")


def check_image_folder(root: str) -> list[str]:
    """The sorted class names of an ImageFolder-layout directory, or DataError. Stops at the
    first image of each class, so it is cheap even for ImageNet."""
    classes, walks, skipped = _class_trees(os.path.expanduser(root))
    _refuse_empty(root, [c for c, _, walk in walks if not any(files for _, files in walk)], skipped)
    return classes


def check_train_val(data_dir: str) -> list[str]:
    """The class names of DIR/train and DIR/val, which must hold the same class folders; DataError
    in one line otherwise (what the probe and the online kNN monitor need)."""
    train_classes = check_image_folder(os.path.join(data_dir, "train"))
    val_classes = check_image_folder(os.path.join(data_dir, "val"))
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:3]
        only_val = sorted(set(val_classes) - set(train_classes))[:3]
        raise DataError(f"train/ and val/ have different classes (only in train: {only_train}, only in val: "
                        f"{only_val}); give both the same class folders")
    return train_classes


def scan_image_folder(root: str) -> FolderScan:
    """Every image of an ImageFolder-layout directory, in torchvision ImageFolder's order (see
    _walk_class for links). Folder links skipped and folders that cannot be listed are kept in
    .skipped and reported in one DataWarning; the data set is still usable without them."""
    root = os.path.expanduser(root)
    classes, walks, skipped = _class_trees(root)
    samples, empty = [], []
    for c, index, walk in walks:
        found = [(os.path.join(folder, f), index) for folder, files in sorted(walk) for f in files]
        samples += found
        if not found:
            empty.append(c)
    _refuse_empty(root, empty, skipped)
    if skipped:
        warnings.warn(f"{root}: left out {len(skipped)} folder(s) (e.g. {skipped[0]}), so that each image is "
                      "read once; fix or remove them if images are missing", DataWarning, stacklevel=2)
    return FolderScan(root, classes, {c: i for i, c in enumerate(classes)}, samples, skipped)


class LabelledImages(Dataset):
    """Images of a folder with their class, like torchvision's ImageFolder (same .classes,
    .class_to_idx, .samples, .targets and sample order), read with read_image.

    Other code uses only len(), .classes, .class_to_idx, .targets (indexable ints), .path(i),
    .read(i), .subset(indices), .transform and __getitem__; the rest (how paths are stored) may change.

    __getitem__(i) -> (transform(image), label, failed_reads). An unreadable image is replaced by
    the next readable one (with its own label) and counted in failed_reads, as in PretrainDataset;
    more than max_retries in a row raise DataError. `transform` may be set after copy.copy().
    """

    max_retries = 10

    def __init__(self, root_or_scan: "str | FolderScan", transform=None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        scan = root_or_scan if isinstance(root_or_scan, FolderScan) else scan_image_folder(root_or_scan)
        self.root, self.classes, self.class_to_idx = scan.root, scan.classes, scan.class_to_idx
        self.samples, self.skipped = scan.samples, scan.skipped
        self.targets = [label for _, label in self.samples]
        self.transform, self.max_pixels = transform, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> str:
        """The file of sample `index`."""
        return self.samples[index][0]

    def subset(self, indices: list[int]) -> "LabelledImages":
        """A copy holding only these samples, in this order (same classes and transform)."""
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        part.targets = [label for _, label in part.samples]
        return part

    def read(self, index: int) -> tuple[Image.Image, int, int]:
        """(RGB image, label, failed_reads) of sample `index` or of the next readable one."""
        for failed in range(self.max_retries + 1):
            path, label = self.samples[(index + failed) % len(self.samples)]
            try:
                return read_image(path, self.max_pixels), label, failed
            except UnreadableImage as e:
                last = e
        raise DataError(f"{self.max_retries + 1} unreadable images in a row from {self.samples[index][0]} "
                        f"(last: {last}); check the data folder")

    def __getitem__(self, index: int):
        img, label, failed = self.read(index)
        return (self.transform(img) if self.transform is not None else img), label, failed


def image_folder(root: str, transform=None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LabelledImages:
    """LabelledImages of `root` (items are (image, label, failed_reads) triples)."""
    return LabelledImages(root, transform, max_pixels)
