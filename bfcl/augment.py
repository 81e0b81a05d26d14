"""MoCo v3's two-view augmentation on batches of uint8 tensors, on any device; and multi-crop's
views (BatchedMultiViews: more global views, DINO's local crops; docs/multicrop.md#views).

The per-image PIL recipe (bfcl.views.pretrain_views) runs in the data-loading processes and
is the usual bottleneck at 224 px. This module splits the work in two:

- in the loader, per image: decode, resize to a fixed square `source_size`, and draw the
  random parameters of both views (`BatchedTwoViews.dataset_transforms`, which plugs into
  PretrainDataset in place of the PIL views, so the draws stay seeded per sample);
- on the training device, per batch: crop, jitter, grey, blur, solarize, flip and normalise all
  2B views at once (`BatchedTwoViews.__call__`), with no host synchronisation.

The parameter distributions are those of docs/method.md#resnet-recipe and of torchvision's transforms
(RandomResizedCrop's ten tries and fallback, ColorJitter's random order, ...); the pixels differ
slightly from the PIL path: float arithmetic instead of uint8 rounding, a bilinear crop with
box-filter antialiasing (roi_align) instead of PIL's, and a truncated Gaussian instead of
PIL's three box blurs. Crops are drawn in the ORIGINAL image's pixel coordinates and mapped onto
the square source, so squashing an image to S x S changes no crop's shape or position; only
detail finer than the source resolution is lost.

Gaussian blur kernel: 2·ceil(3·σ_max)+1 = 13 taps for σ_max = 2 (±3σ at the largest σ, reflect
padding as in torchvision's gaussian_blur). PIL's GaussianBlur(radius=σ), the reference path,
is three box blurs with the same σ in output pixels, whose support is also about ±3σ. SimCLR's
"10% of the side" rule gives 23 taps at 224 px (the same blur, the Gaussian beyond ±6 px holds
<0.3% of the mass) but only 3 taps at 32 px, where it truncates σ = 2 heavily; the σ-derived
size matches the reference at every image size.
"""

import math

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.ops import roi_align

from bfcl.compiling import CompileOrEager
from bfcl.views import IMAGENET_MEAN, IMAGENET_STD, eval_resize

# ColorJitter(0.4, 0.4, 0.2, 0.1): factor ranges in the op order brightness, contrast,
# saturation, hue (the op ids used in `order`).
JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
JITTER_LOW = torch.tensor([low for low, _ in JITTER_RANGES])
JITTER_WIDTH = torch.tensor([high - low for low, high in JITTER_RANGES])
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))  # RandomResizedCrop's aspect-ratio range, in logs
CROP_UNIFORMS = 22  # uniforms per crop: ten tries of (area, log ratio), then (top, left)
SIGMA_RANGE = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128 / 255


def draw_crop_boxes(sizes: torch.Tensor, crop_min: float, generator=None, crop_max: float = 1.0) -> torch.Tensor:
    """RandomResizedCrop's box for each row of sizes [n, 2] = (height, width) in pixels.
    Returns boxes [n, 4] = (x0, y0, x1, y1) in pixel units, float (see crop_boxes)."""
    return crop_boxes(sizes, crop_min,
                      torch.rand(sizes.shape[0], CROP_UNIFORMS, dtype=torch.float64, generator=generator), crop_max)


def crop_boxes(sizes: torch.Tensor, crop_min: float, u: torch.Tensor, crop_max: float = 1.0) -> torch.Tensor:
    """torchvision's RandomResizedCrop rule, from uniforms u [n, 22] in [0, 1).

    Ten tries of area share ~ U[crop_min, crop_max] (scale=(crop_min, crop_max); 1 for the global
    views, --local-crop-scale's for local crops) and log aspect ratio ~ U[log 3/4, log 4/3]; the
    first try that fits wins, at a uniform integer position; if none fits, the centre crop at
    the nearest allowed aspect ratio. Returns boxes [n, 4] = (x0, y0, x1, y1), float.
    Plain Python per row: a loader draws one image at a time, where tensor ops cost more.
    """
    boxes = []
    for (height, width), r in zip(sizes.tolist(), u.tolist()):
        for t in range(10):
            area = height * width * (crop_min + (crop_max - crop_min) * r[t])
            aspect = math.exp(LOG_RATIO[0] + (LOG_RATIO[1] - LOG_RATIO[0]) * r[10 + t])
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = math.floor(r[20] * (height - h + 1)), math.floor(r[21] * (width - w + 1))
                break
        else:  # the whole image, narrowed to the allowed aspect range, centred
            w = round(height * 4 / 3) if width / height > 4 / 3 else width
            h = round(width / (3 / 4)) if width / height < 3 / 4 else height
            top, left = (height - h) // 2, (width - w) // 2
        boxes.append((left, top, left + w, top + h))
    return torch.tensor(boxes, dtype=torch.float32).view(-1, 4)


def draw_view_params(sizes: torch.Tensor, crop_min: float, blur_p, solarize_p, generator=None,
                     crop_max: float = 1.0) -> dict:
    """Random parameters of one view per row: sizes [n, 2] (height, width) of the images,
    blur_p and solarize_p [n] the recipe's probabilities for each row.

    Returns a dict of tensors, all with leading dim n: box [n, 4] (x0, y0, x1, y1 in the
    image's pixels), jitter [n] bool (ColorJitter applied, p 0.8), factors [n, 4] (brightness,
    contrast, saturation, hue), order [n, 4] (a random permutation of the four op ids, as
    ColorJitter's randperm), grey [n] bool (p 0.2), blur [n] bool, sigma [n], solarize [n]
    bool, flip [n] bool (p 0.5). All from one torch.rand call (cheap per sample in a loader).
    """
    u = torch.rand(sizes.shape[0], CROP_UNIFORMS + 14, dtype=torch.float64, generator=generator)
    v = u[:, CROP_UNIFORMS:].float()
    return {
        "box": crop_boxes(sizes, crop_min, u, crop_max),
        "jitter": v[:, 0] < 0.8,
        "factors": JITTER_LOW + JITTER_WIDTH * v[:, 1:5],
        "order": v[:, 5:9].argsort(dim=1),  # a uniform random permutation per row
        "grey": v[:, 9] < 0.2,
        "blur": v[:, 10] < torch.as_tensor(blur_p),
        "sigma": SIGMA_RANGE[0] + (SIGMA_RANGE[1] - SIGMA_RANGE[0]) * v[:, 11],
        "solarize": v[:, 12] < torch.as_tensor(solarize_p),
        "flip": v[:, 13] < 0.5,
    }


def blend(x: torch.Tensor, kind: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's brightness / contrast / saturation adjustment with one op and factor per row.

    x [N, 3, H, W] floats in [0, 1]; kind [N] op id; factor [N]. Each is
    clamp(f·x + (1 - f)·ref) with ref = 0 (brightness), the image's mean grey (contrast) or the
    pixel's grey (saturation); factor 1 leaves a row unchanged, saturation 0 turns it grey.
    """
    grey = F.rgb_to_grayscale(x)  # [N, 1, H, W]
    mean = grey.mean(dim=(-2, -1), keepdim=True)
    rest = (1 - factor).view(-1, 1, 1, 1)  # the weight of ref, split by op kind below
    kind = kind.view(-1, 1, 1, 1)
    grey.mul_(torch.where(kind == SATURATION, rest, 0.0))
    grey.add_(mean.mul_(torch.where(kind == CONTRAST, rest, 0.0)))
    return x.mul(factor.view(-1, 1, 1, 1)).add_(grey).clamp_(0, 1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue with one shift per row: x [N, 3, H, W] in [0, 1], shift [N] in
    turns (±0.5). Hue goes round the HSV hexagon; value (max) and chroma (max - min) are kept."""
    r, g, b = x.unbind(dim=1)
    high, low = x.amax(dim=1), x.amin(dim=1)  # (aminmax over dim 1 is slow on CPUs)
    chroma = high - low
    # Hue in sixths of a turn, times chroma; grey pixels (chroma 0) get 0 and stay grey.
    hue = torch.where(high == r, g - b,
                      torch.where(high == g, (b - r).add_(chroma, alpha=2), (r - g).add_(chroma, alpha=4)))
    hue.div_(chroma.clamp(min=torch.finfo(x.dtype).tiny)).add_(6 * shift.view(-1, 1, 1))
    out = torch.empty_like(x)
    for c, offset in enumerate((5, 3, 1)):  # R, G, B: the closed form of HSV -> RGB
        k = torch.remainder(hue + offset, 6)
        k = torch.minimum(k, 4 - k).clamp_(0, 1)
        torch.sub(high, k.mul_(chroma), out=out[:, c])
    return out


def color_jitter(x: torch.Tensor, p: dict) -> torch.Tensor:
    """ColorJitter with each row's own factors and op order, on rows where p["jitter"].

    Without host synchronisation, rows cannot be grouped by order. Instead: the ops a row runs
    before its hue shift (slots 0-2 of its order), one hue shift for all rows (0 where off), then
    the ops after it (slots 1-3). Rows with nothing to do in a round get factor 1 (identity).
    """
    order, factors, on = p["order"], p["factors"], p["jitter"]
    hue_slot = (order == HUE).int().argmax(dim=1)
    for slot, before in ((0, True), (1, True), (2, True), (None, None), (1, False), (2, False), (3, False)):
        if slot is None:
            x = shift_hue(x, torch.where(on, factors[:, HUE], torch.zeros_like(factors[:, HUE])))
            continue
        kind = order[:, slot]
        active = on & ((slot < hue_slot) if before else (slot > hue_slot))
        factor = torch.where(active, factors.gather(1, kind[:, None])[:, 0], torch.ones_like(factors[:, 0]))
        x = blend(x, kind, factor)
    return x


def gaussian_kernels(sigma: torch.Tensor, on: torch.Tensor, size: int) -> torch.Tensor:
    """1-D Gaussian kernels [N, size] (normalised to sum 1); rows with on=False get a delta."""
    t = torch.arange(size, device=sigma.device, dtype=torch.float32) - size // 2
    kernel = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (t == 0).float().expand_as(kernel)
    return torch.where(on[:, None], kernel, delta)


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur with one kernel per row: x [N, C, H, W], kernels [N, K] -> [N, C, H, W].
    Reflect padding, as torchvision's gaussian_blur."""
    n, c, h, w = x.shape
    k = kernels.shape[1]
    weight = kernels.repeat_interleave(c, dim=0)[:, None, None, :]  # [N·C, 1, 1, K]: one filter per channel
    x = nnf.pad(x.reshape(1, n * c, h, w), (k // 2, k // 2, 0, 0), mode="reflect")
    x = nnf.conv2d(x, weight, groups=n * c)
    x = nnf.pad(x, (0, 0, k // 2, k // 2), mode="reflect")
    x = nnf.conv2d(x, weight.transpose(2, 3), groups=n * c)
    return x.view(n, c, h, w)


def augment_rows(crops: torch.Tensor, p: dict, blur_size: int, mean, std) -> torch.Tensor:
    """Everything after the crop, one parameter row per image: crops [N, 3, S, S] in [0, 1]
    -> normalised views [N, 3, S, S]. Order as in the recipe: jitter, grey, blur, solarize, flip."""
    x = color_jitter(crops, p)
    x = blend(x, torch.full_like(p["order"][:, 0], SATURATION), torch.where(p["grey"], 0.0, 1.0))
    x = gaussian_blur(x, gaussian_kernels(p["sigma"], p["blur"], blur_size))
    x = torch.where(p["solarize"].view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD), 1 - x, x)
    x = torch.where(p["flip"].view(-1, 1, 1, 1), F.horizontal_flip(x), x)
    return F.normalize(x, mean, std)


class BatchedTwoViews:
    """MoCo v3's views A (blur p 1, no solarize) and B (blur p 0.1, solarize p 0.2), batched.

    dataset_transforms() -> (to_source, draw_params), the `views` pair for PretrainDataset:
        to_source(PIL image) -> uint8 [3, S, S] (the image squashed to the square source size);
        draw_params(PIL image) -> dict of [2, ...] tensors (row 0 view A, row 1 view B), drawn
        from torch's RNG, which PretrainDataset seeds per sample.
    __call__(images uint8 [B, 3, S, S], params dict of [B, 2, ...]) -> (view1, view2), each
        float [B, 3, image_size, image_size], normalised, on the images' device.
    chunk: rows processed at once after the crop (None: all).
    compile: torch.compile the ops after the crop, fusing their dozens of elementwise passes.
    """

    def __init__(self, image_size: int = 224, crop_min: float = 0.2, blur: bool = True,
                 source_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD, chunk: int | None = None,
                 compile: bool = False):
        self.image_size, self.crop_min = image_size, crop_min
        self.source_size = source_size or eval_resize(image_size)  # 256 for 224 px, the image size below 96
        self.blur_p = (1.0, 0.1) if blur else (0.0, 0.0)
        self.solarize_p = (0.0, 0.2)
        self.blur_size = min(2 * math.ceil(3 * SIGMA_RANGE[1]) + 1, 2 * (image_size // 2) - 1)  # reflect pad < side
        self.mean, self.std, self.chunk = list(mean), list(std), chunk
        self.augment_rows = CompileOrEager(augment_rows, "the batched views") if compile else augment_rows

    def draw(self, sizes: torch.Tensor, generator=None) -> dict:
        """Parameters of both views for images of sizes [n, 2] (height, width): dict of [n, 2, ...]
        with boxes already mapped onto the S x S source."""
        n = sizes.shape[0]
        rows = sizes.repeat_interleave(2, dim=0)  # [2n, 2]: A, B, A, B, ...
        p = draw_view_params(rows, self.crop_min, torch.tensor(self.blur_p).repeat(n),
                             torch.tensor(self.solarize_p).repeat(n), generator)
        scale = self.source_size / rows.flip(1).repeat(1, 2).float()  # (x, y, x, y) scales to S
        p["box"] = p["box"] * scale
        return {k: v.view(n, 2, *v.shape[1:]) for k, v in p.items()}

    def dataset_transforms(self):
        def to_source(img):
            size = (self.source_size, self.source_size)
            return F.pil_to_tensor(img if img.size == size else img.resize(size, Image.Resampling.BILINEAR))

        def draw_params(img):
            p = self.draw(torch.tensor([[img.height, img.width]]))
            return {k: v[0] for k, v in p.items()}

        return to_source, draw_params

    def __call__(self, images: torch.Tensor, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        b = images.shape[0]
        device = images.device
        # [B, 2, ...] -> [2B, ...], view-major: rows [0, B) view A, [B, 2B) view B.
        p = {k: v.to(device, non_blocking=True).transpose(0, 1).reshape(2 * b, *v.shape[2:]) for k, v in params.items()}
        source = images.float().div_(255)
        image_index = torch.arange(b, device=device, dtype=torch.float32).repeat(2)[:, None]
        boxes = torch.cat([image_index, p["box"]], dim=1)  # [2B, 5] = (image, x0, y0, x1, y1)
        views = self._views(source, boxes, p, self.image_size, self.blur_size)
        return views[:b], views[b:]

    def _views(self, source: torch.Tensor, boxes: torch.Tensor, p: dict, size: int, blur_size: int) -> torch.Tensor:
        """Crop boxes [R, 5] = (image, x0, y0, x1, y1) of source [B, 3, S, S] to size x size, then
        augment_rows with p's rows [R, ...]: views [R, 3, size, size], self.chunk rows at a time."""
        chunk = self.chunk or boxes.shape[0]
        views = []
        for start in range(0, boxes.shape[0], chunk):
            rows = {k: v[start:start + chunk] for k, v in p.items()}
            # aligned=True: box edges are pixel edges, samples at output pixel centres (bilinear,
            # as interpolate(align_corners=False)); sampling_ratio=-1 averages ceil(box/out)
            # samples per output pixel, so downscaling is antialiased with a box filter.
            crops = roi_align(source, boxes[start:start + chunk], size, spatial_scale=1.0,
                              sampling_ratio=-1, aligned=True)
            views.append(self.augment_rows(crops, rows, blur_size, self.mean, self.std))
        return torch.cat(views) if len(views) > 1 else views[0]


# DINO's local crops at 224 px: 96 px, area share (0.05, 0.4), blur with probability 0.5, no
# solarization (docs/multicrop.md).
LOCAL_SCALE = (0.05, 0.4)
LOCAL_BLUR_P = 0.5


def local_crop_size(image_size: int, patch_size: int | None = None) -> int:
    """--local-crop-size's default: DINO's 96 px of 224, scaled to the image size and rounded;
    for a ViT (patch_size given) rounded to a whole number of patches, at least one.
    32 px -> 14 (ViT patch 4: 12, patch 8: 16), 64 px -> 27 (patch 8: 24), 224 px -> 96 (patch 16: 96)."""
    size = image_size * 96 / 224
    return patch_size * max(1, round(size / patch_size)) if patch_size else round(size)


class BatchedMultiViews(BatchedTwoViews):
    """Multi-crop (train.py --global-views V, --local-crops N): V global views at image_size,
    recipes A, B, A, B, ... (V = 2 is MoCo v3's pair), and N local views at local_size with area
    share local_scale, DINO's local recipe (blur p 0.5 where blur is on, no solarization), made
    by the same batched augmentation (docs/multicrop.md#views).

    dataset_transforms()'s draw_params gives [V + N, ...] rows per image: the globals' first,
    drawn as BatchedTwoViews draws its two (for V = 2 the same values from the same seed), then
    the locals'. __call__(images [B, 3, S, S], params [B, V + N, ...]) -> (globals, locals):
    a list of V tensors [B, 3, image_size, image_size], and None or one tensor
    [N·B, 3, local_size, local_size], view-major (rows [l·B, (l+1)·B) are local view l).
    """

    def __init__(self, image_size: int = 224, crop_min: float = 0.2, blur: bool = True, global_views: int = 2,
                 local_crops: int = 0, local_size: int | None = None, local_scale=LOCAL_SCALE,
                 source_size: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD, chunk: int | None = None,
                 compile: bool = False):
        super().__init__(image_size, crop_min, blur, source_size, mean, std, chunk, compile)
        self.global_views, self.local_crops = global_views, local_crops
        self.local_size = local_size or local_crop_size(image_size)
        self.local_scale = tuple(local_scale)
        self.local_blur_p = LOCAL_BLUR_P if blur else 0.0
        self.local_blur_size = min(2 * math.ceil(3 * SIGMA_RANGE[1]) + 1, 2 * (self.local_size // 2) - 1)

    def _draw(self, sizes: torch.Tensor, views: int, crop_min: float, crop_max: float, blur_p, solarize_p,
              generator) -> dict:
        n = sizes.shape[0]
        rows = sizes.repeat_interleave(views, dim=0)  # [views·n, 2]: image-major
        p = draw_view_params(rows, crop_min, torch.tensor(blur_p).repeat(n), torch.tensor(solarize_p).repeat(n),
                             generator, crop_max)
        p["box"] = p["box"] * (self.source_size / rows.flip(1).repeat(1, 2).float())
        return {k: v.view(n, views, *v.shape[1:]) for k, v in p.items()}

    def draw(self, sizes: torch.Tensor, generator=None) -> dict:
        v = self.global_views
        recipes = [(self.blur_p[i % 2], self.solarize_p[i % 2]) for i in range(v)]  # A, B, A, B, ...
        p = self._draw(sizes, v, self.crop_min, 1.0, [b for b, _ in recipes], [s for _, s in recipes], generator)
        if self.local_crops:
            n = self.local_crops
            local = self._draw(sizes, n, self.local_scale[0], self.local_scale[1], [self.local_blur_p] * n,
                               [0.0] * n, generator)
            p = {k: torch.cat([p[k], local[k]], dim=1) for k in p}
        return p

    def __call__(self, images: torch.Tensor, params: dict):
        b, device = images.shape[0], images.device
        v, n = self.global_views, self.local_crops
        # [B, V + N, ...] -> [(V + N)·B, ...], view-major
        p = {k: t.to(device, non_blocking=True).transpose(0, 1).reshape((v + n) * b, *t.shape[2:])
             for k, t in params.items()}
        source = images.float().div_(255)
        image_index = torch.arange(b, device=device, dtype=torch.float32).repeat(v + n)[:, None]
        boxes = torch.cat([image_index, p["box"]], dim=1)
        first = {k: t[:v * b] for k, t in p.items()}
        views = self._views(source, boxes[:v * b], first, self.image_size, self.blur_size)
        local = None
        if n:
            rest = {k: t[v * b:] for k, t in p.items()}
            local = self._views(source, boxes[v * b:], rest, self.local_size, self.local_blur_size)
        return list(views.split(b)), local
