"""Image files as input: the guarded reader, and the images of an index as a data set.

Every read goes through read_image, which refuses decompression bombs before decoding and
turns any decoder failure into UnreadableImage; LabelledImages replaces such an image by the
next readable one and counts it. Which files are images, and in what order, is bfcl.index's
(and bfcl.folders') business.
"""

import contextlib
import copy
import os
import stat
import threading
import warnings

from PIL import Image
from torch.utils.data import Dataset

from bfcl.errors import DataError
from bfcl.paths import printable
from bfcl.index import ImageIndex, index_image_folder


class UnreadableImage(DataError):
    """One image file that cannot be decoded, or is over the pixel cap. Pickles (DataLoader workers)."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"cannot read {printable(self.path)}: {self.reason}"


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


class LabelledImages(Dataset):
    """The images of an ImageIndex (or of an ImageFolder-layout directory), read with read_image.
    For an ImageFolder: torchvision ImageFolder's .classes, .class_to_idx, .targets and order.

    Other code uses only len(), .classes, .class_to_idx, .targets (indexable ints, an array('q');
    -1 where the layout has no labels), .path(i), .read(i), .subset(indices), .transform and __getitem__; how the
    paths are stored (bfcl.index: packed tensors, shared by forked DataLoader workers) may change.

    __getitem__(i) -> (transform(image), label, failed_reads). An unreadable image is replaced by
    the next readable one (with its own label) and counted in failed_reads, as in PretrainDataset;
    more than max_retries in a row raise DataError. `transform` may be set after copy.copy().
    """

    max_retries = 10

    def __init__(self, root_or_index: "str | ImageIndex", transform=None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        index = root_or_index if isinstance(root_or_index, ImageIndex) else index_image_folder(root_or_index)
        self.index, self.root, self.classes, self.skipped = index, index.root, index.classes, index.skipped
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = index.labels
        self.transform, self.max_pixels = transform, max_pixels

    def __len__(self) -> int:
        return len(self.index)

    def path(self, index: int) -> str:
        """The file of sample `index`."""
        return self.index.path(index)

    def subset(self, indices: list[int]) -> "LabelledImages":
        """A copy holding only these samples, in this order (same classes and transform)."""
        part = copy.copy(self)
        part.index = self.index.subset(indices)
        part.targets = part.index.labels
        return part

    def read(self, index: int) -> tuple[Image.Image, int, int]:
        """(RGB image, label, failed_reads) of sample `index` or of the next readable one."""
        for failed in range(self.max_retries + 1):
            i = (index + failed) % len(self.index)
            try:
                return read_image(self.index.path(i), self.max_pixels), self.index.label(i), failed
            except UnreadableImage as e:
                last = e
        raise DataError(f"{self.max_retries + 1} unreadable images in a row, {printable(self.index.path(index))} to "
                        f"{printable(last.path)} (the last: {last.reason}); replace or remove them, or check "
                        f"the data folder {printable(self.root)}")

    def __getitem__(self, index: int):
        img, label, failed = self.read(index)
        return (self.transform(img) if self.transform is not None else img), label, failed


def image_folder(root: str, transform=None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LabelledImages:
    """LabelledImages of an ImageFolder-layout `root` (items are (image, label, failed_reads) triples)."""
    return LabelledImages(root, transform, max_pixels)


def scan_image_folder(root: str) -> ImageIndex:
    """The index of an ImageFolder-layout directory (bfcl.index.index_image_folder)."""
    return index_image_folder(root)
