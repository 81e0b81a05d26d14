"""Which files of a folder are images: the ImageFolder layout (one subfolder per class) or any
folder searched recursively, each folder read once whatever its links.

Only regular files (after links) with an image extension (any case: .JPEG, .Png) count; a FIFO
named x.jpg would block a reader. Links to folders are followed, but never into a folder the
walk reads, or will read, at its own place, nor above the data: a loop cannot repeat or multiply
images, and no image gets two labels. What was left out is kept as one line per folder.

The walks yield (folder, its mtime in ns, image file names sorted) in no fixed folder order;
bfcl.index sorts the folders by path, which is torchvision ImageFolder's order.
"""

import os
import stat

from torchvision.datasets.folder import IMG_EXTENSIONS

from bfcl.errors import DataError, one_line  # noqa: F401  (re-exported: bfcl.folders.one_line)
from bfcl.paths import describe_kind, printable


class DataWarning(UserWarning):
    """Something in a data folder that was left out; the data set is still usable."""


def require_folder(path: str, fix: str) -> None:
    """DataError in one line unless `path` is a folder (or a link to one): it does not exist, it
    is a file (or a FIFO, a device...), or it cannot be read. `fix` ends the message."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"data folder {printable(path)} does not exist; {fix}") from None
    except OSError as e:
        raise DataError(f"data folder {printable(path)} cannot be read ({e.strerror}); {fix}") from None
    if not stat.S_ISDIR(mode):
        kind = "a file" if stat.S_ISREG(mode) else describe_kind(mode)
        raise DataError(f"data folder {printable(path)} is {kind}, not a folder; {fix}")


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
    require_folder(root, "pass a folder with one subfolder per class")
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


def walk(folder: str, real: str, data_reals: list[str], visited: set, skipped: list, hidden: bool = True,
         leave_out: frozenset = frozenset()):
    """Yield (folder path, mtime in ns, sorted image file names) of every folder of the tree at
    `folder` (whose real path is `real`). Real subfolders come first, then links to folders, which
    are followed unless their target is in `visited` (read by this walk or another one sharing the
    set), inside or above one of `data_reals`. hidden=False skips names starting with '.';
    folders whose real path is in `leave_out` are skipped without a word."""
    stack, links = [(folder, real)], []
    while stack or links:
        if not stack:
            link = links.pop(0)
            target = os.path.realpath(link)
            if target in leave_out:
                continue
            if target in visited or any(_inside(target, r) or _inside(r, target) for r in data_reals):
                skipped.append(f"{link} -> {target} (a folder read elsewhere in this scan, or above the data)")
            else:
                visited.add(target)
                stack.append((link, target))
            continue
        folder, real = stack.pop()
        try:
            mtime = os.stat(folder).st_mtime_ns  # before the listing: a change while listing shows next time
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            skipped.append(f"{folder} ({e.strerror})")
            continue
        files = []
        for e in entries:
            if not hidden and e.name.startswith("."):
                continue
            if _is_dir(e):
                sub = os.path.join(real, e.name)
                if e.is_symlink():
                    links.append(e.path)
                elif sub in leave_out:
                    continue
                elif sub in visited:  # a bind mount, or another class's folder
                    skipped.append(f"{e.path} (a folder read elsewhere in this scan)")
                else:
                    visited.add(sub)
                    stack.append((e.path, sub))
            elif e.name.lower().endswith(IMG_EXTENSIONS) and _is_file(e):
                files.append(e.name)
        yield folder, mtime, files


def class_walks(root: str):
    """(classes, [(class, index, walk)], skipped) of an ImageFolder-layout directory: one walk per
    class folder, sharing one scan's state so that no folder is read for two classes."""
    classes, reals = _class_folders(root)
    data_reals = [os.path.realpath(root), *reals]
    visited, skipped = set(data_reals), []
    walks = [(c, i, walk(os.path.join(root, c), reals[i], data_reals, visited, skipped))
             for i, c in enumerate(classes)]
    return classes, walks, skipped


def folder_walk(root: str, leave_out: tuple[str, ...] = ()):
    """(walk, skipped) of any folder, searched recursively with hidden files and folders skipped;
    the folders in `leave_out` (e.g. DIR/val, kept for the kNN monitor) are not read."""
    require_folder(root, "pass a folder of images")
    real, skipped = os.path.realpath(root), []
    left = frozenset(os.path.realpath(p) for p in leave_out)
    return walk(root, real, [real], {real}, skipped, hidden=False, leave_out=left), skipped


def refuse_empty(root: str, empty: list[str], skipped: list[str]) -> None:
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        left_out = f" (folders left out, e.g. {skipped[0]})" if skipped else ""
        raise DataError(f"{root} has class folders without images ({shown}){left_out}; remove them or add images")


def check_image_folder(root: str) -> list[str]:
    """The sorted class names of an ImageFolder-layout directory, or DataError. Stops at the
    first image of each class, so it is cheap even for ImageNet."""
    classes, walks, skipped = class_walks(os.path.expanduser(root))
    refuse_empty(root, [c for c, _, w in walks if not any(files for _, _, files in w)], skipped)
    return classes


def check_train_val(data_dir: str) -> list[str]:
    """The class names of DIR/train and DIR/val, which must hold the same class folders; DataError
    in one line otherwise (what the probe and the online kNN monitor need)."""
    require_folder(os.path.expanduser(data_dir), "pass a folder holding train/<class>/ and val/<class>/")
    train_classes = check_image_folder(os.path.join(data_dir, "train"))
    val_classes = check_image_folder(os.path.join(data_dir, "val"))
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))[:3]
        only_val = sorted(set(val_classes) - set(train_classes))[:3]
        raise DataError(f"train/ and val/ have different classes (only in train: {only_train}, only in val: "
                        f"{only_val}); give both the same class folders")
    return train_classes
