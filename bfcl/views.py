"""What a sample becomes: the MoCo v3 two-view augmentation, the probe's transforms, and a
seeded, resumable, sharded batch order.

Every random choice is a function of (seed, epoch, position in the epoch): the batch order is
a seeded permutation, and each sample's augmentation runs under its own seed. A resumed run
therefore sees exactly the images and crops it would have seen, with any number of workers.
The images themselves come from bfcl.images (LabelledImages).
"""

import random

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from bfcl.images import DEFAULT_MAX_PIXELS, LabelledImages
from bfcl.index import ImageIndex

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur with σ ~ U[sigma_min, sigma_max], drawn from torch's RNG (seeded per sample)."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 2.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = self.sigma_min + (self.sigma_max - self.sigma_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def pretrain_views(image_size: int = 224, crop_min: float = 0.2, blur: bool = True,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[T.Compose, T.Compose]:
    """MoCo v3's asymmetric BYOL-style views: recipe A for view 1, B for view 2 (PIL -> [3, S, S]).

    A and B differ only in blur probability (1.0 vs 0.1) and solarization (never vs 0.2).
    blur=False drops the blur from both, which suits 32 px images (SimCLR's CIFAR recipe).
    """
    def recipe(blur_p: float, solarize_p: float) -> T.Compose:
        steps = [
            T.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        if blur and blur_p > 0:
            steps.append(T.RandomApply([GaussianBlur(0.1, 2.0)], p=blur_p))
        if solarize_p > 0:
            steps.append(T.RandomSolarize(threshold=128, p=solarize_p))
        steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
        return T.Compose(steps)

    return recipe(blur_p=1.0, solarize_p=0.0), recipe(blur_p=0.1, solarize_p=0.2)


def eval_resize(image_size: int) -> int:
    """Resize side before the centre crop: 256 for 224 (the ImageNet ratio); none below 96 px,
    where images such as CIFAR's are already at their training size."""
    return image_size if image_size < 96 else round(image_size * 256 / 224)


def eval_transform(image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """Resize + CenterCrop + Normalize, the linear-probe validation transform."""
    return T.Compose([T.Resize(eval_resize(image_size)), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean, std)])


def probe_train_transform(image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """RandomResizedCrop (scale 0.08-1) + flip, the linear-probe training transform."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of `epoch`'s permutation."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + position) % 2**31


class PretrainDataset(Dataset):
    """Two augmented views of the images of an index (an ImageFolder directory by default),
    indexed by (index, seed) pairs; the label is -1 where the layout has none.

    __getitem__((i, seed)) -> (view1 [3, S, S], view2 [3, S, S], label, failed_reads).
    An unreadable image (see read_image) is replaced by the next readable one and counted in
    failed_reads, so one corrupt JPEG cannot stop a run; the script decides how many failures
    are too many. The replacement is augmented with sample i's seed.
    """

    def __init__(self, root_or_index: "str | ImageIndex", views: tuple, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.folder = LabelledImages(root_or_index, None, max_pixels)
        self.view1, self.view2 = views

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key):
        index, seed = key
        img, label, failed = self.folder.read(index)
        v1, v2 = seeded(seed, lambda: (self.view1(img), self.view2(img)))
        return v1, v2, label, failed


class SeededImages(Dataset):
    """LabelledImages with one augmentation, indexed by (index, seed) pairs like PretrainDataset
    (for EpochBatchSampler): __getitem__((i, seed)) -> (image [3, S, S], label, failed_reads),
    the transform run under the sample's own seed, so a resumed fine-tuning sees the same crops."""

    def __init__(self, images: LabelledImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index, seed = key
        img, label, failed = self.images.read(index)
        return seeded(seed, lambda: self.images.transform(img)), label, failed


def seeded(seed: int, fn):
    """fn() with torch's CPU and Python's RNGs seeded for this call only; the caller's state is kept."""
    with torch.random.fork_rng(devices=[]):
        state = random.getstate()
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds every device (slow)
        random.seed(seed)
        try:
            return fn()
        finally:
            random.setstate(state)


class EpochBatchSampler:
    """This process's share of each global batch, in a seeded per-epoch order.

    Step s of an epoch takes global positions [s·B, (s+1)·B) of the permutation; process r
    takes the r-th contiguous slice of b = B / P. The union over processes is therefore the
    same global batch for any P. The tail that does not fill a global batch is dropped.
    Yields lists of (index, augmentation seed); start_step skips the steps already done.
    """

    def __init__(self, num_samples, global_batch, rank, world_size, seed, epoch, start_step=0):
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.local_batch = rank, global_batch // world_size
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.steps_per_epoch = num_samples // global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)  # a tensor: 10 MB at 1.28 M, not 50 MB of ints
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.global_batch + self.rank * self.local_batch
            indices = order[first:first + self.local_batch].tolist()
            yield [(i, sample_seed(self.seed, self.epoch, first + k)) for k, i in enumerate(indices)]
