"""The batched tensor augmentation (bfcl/augment.py) against the reference PIL recipe.

Distributions: every setting is read from the reference views (bfcl.views.pretrain_views), and
the batched draws are compared with them (rates within 5 binomial standard errors, crop
geometry by a two-sample Kolmogorov-Smirnov distance against torchvision's own sampler).
Pixels: each op, for fixed parameters, against torchvision.transforms.v2.functional.
"""

import itertools

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F

from bfcl.augment import (BRIGHTNESS, CONTRAST, CROP_UNIFORMS, HUE, SATURATION, BatchedTwoViews, blend, color_jitter,
                          crop_boxes, draw_crop_boxes, gaussian_blur, gaussian_kernels, shift_hue)
from bfcl.views import GaussianBlur, PretrainDataset, pretrain_views
from bfcl.synthetic import make_image_folder

N = 20_000  # parameter rows drawn per distribution check


def reference_settings(view: T.Compose) -> dict:
    """The random settings of one reference view, read from its transform objects."""
    s = {"blur_p": 0.0, "solarize_p": 0.0}
    for t in view.transforms:
        inner = t.transforms[0] if isinstance(t, T.RandomApply) else None
        if isinstance(t, T.RandomResizedCrop):
            s["scale"], s["ratio"] = t.scale, t.ratio
        elif isinstance(inner, T.ColorJitter):
            s["jitter_p"] = t.p
            s["jitter"] = (inner.brightness, inner.contrast, inner.saturation, inner.hue)
        elif isinstance(inner, GaussianBlur):
            s["blur_p"], s["sigma"] = t.p, (inner.sigma_min, inner.sigma_max)
        elif isinstance(t, T.RandomGrayscale):
            s["grey_p"] = t.p
        elif isinstance(t, T.RandomSolarize):
            s["solarize_p"], s["threshold"] = t.p, t.threshold
        elif isinstance(t, T.RandomHorizontalFlip):
            s["flip_p"] = t.p
    return s


@pytest.fixture(scope="module")
def draws():
    """N parameter rows per view for 256 x 256 images, and the reference settings of each view."""
    augment = BatchedTwoViews(image_size=224, crop_min=0.2, source_size=256)
    p = augment.draw(torch.tensor([[256, 256]]).expand(N, 2), torch.Generator().manual_seed(0))
    views = pretrain_views(224, crop_min=0.2, blur=True)
    return [({k: v[:, i] for k, v in p.items()}, reference_settings(views[i])) for i in range(2)]


def assert_rate(flags: torch.Tensor, p: float) -> None:
    rate = flags.float().mean().item()
    tolerance = 5 * (p * (1 - p) / flags.numel()) ** 0.5 + 1e-12
    assert abs(rate - p) <= tolerance, f"rate {rate:.4f}, reference probability {p}"


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf = lambda s: torch.searchsorted(s, grid, right=True).double() / s.numel()
    return (cdf(a) - cdf(b)).abs().max().item()


@pytest.mark.parametrize("view", [0, 1], ids=["view A", "view B"])
def test_rates_match_the_reference_recipe(draws, view):
    p, ref = draws[view]
    assert_rate(p["jitter"], ref["jitter_p"])
    assert_rate(p["grey"], ref["grey_p"])
    assert_rate(p["blur"], ref["blur_p"])
    assert_rate(p["solarize"], ref["solarize_p"])
    assert_rate(p["flip"], ref["flip_p"])


@pytest.mark.parametrize("view", [0, 1], ids=["view A", "view B"])
def test_jitter_factors_order_and_sigma_match_the_reference(draws, view):
    p, ref = draws[view]
    for op, (low, high) in zip((BRIGHTNESS, CONTRAST, SATURATION, HUE), ref["jitter"]):
        f = p["factors"][:, op]
        assert low <= f.min() and f.max() <= high
        uniform = torch.linspace(low, high, N)  # quantiles of U[low, high]
        assert ks_distance(f, uniform) < 0.02, f"op {op}: factors not U[{low}, {high}]"
    # ColorJitter applies its four ops in an order drawn by randperm: all 24 equally likely.
    perms = {tuple(r): 0 for r in itertools.permutations(range(4))}
    for row in p["order"].tolist():
        perms[tuple(row)] += 1
    assert len(perms) == 24 and all(abs(c / N - 1 / 24) < 5 * (1 / 24 / N) ** 0.5 for c in perms.values())
    low, high = ref.get("sigma", (0.1, 2.0))
    assert low <= p["sigma"].min() and p["sigma"].max() <= high
    assert ks_distance(p["sigma"], torch.linspace(low, high, N)) < 0.02


@pytest.mark.parametrize("height, width", [(256, 256), (200, 300), (375, 500)])
def test_crop_geometry_matches_random_resized_crop(draws, height, width):
    ref = draws[0][1]
    torch.manual_seed(1)
    tv = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, height, width), list(ref["scale"]),
                                                      list(ref["ratio"]))
                       for _ in range(5000)], dtype=torch.float64)  # (top, left, h, w)
    boxes = draw_crop_boxes(torch.tensor([[height, width]]).expand(N, 2), ref["scale"][0],
                            torch.Generator().manual_seed(2))
    x0, y0, x1, y1 = boxes.double().unbind(1)
    ours = torch.stack([y0, x0, y1 - y0, x1 - x0], dim=1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    derived = lambda b: {"area share": b[:, 2] * b[:, 3] / (height * width), "aspect": b[:, 3] / b[:, 2],
                         "centre x": (b[:, 1] + b[:, 3] / 2) / width, "centre y": (b[:, 0] + b[:, 2] / 2) / height}
    for (name, a), b in zip(derived(ours).items(), derived(tv).values()):
        assert ks_distance(a, b) < 0.04, f"{name} of the crops differs from torchvision's RandomResizedCrop"


def test_crop_fallback_is_torchvisions_centre_crop():
    """An image too elongated for any try falls back to the same centre crop as torchvision."""
    for height, width in [(10, 400), (400, 10)]:
        box = draw_crop_boxes(torch.tensor([[height, width]]), 0.9, torch.Generator().manual_seed(0))[0]
        top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(1, height, width), [0.9, 1.0], [3 / 4, 4 / 3])
        assert box.tolist() == [left, top, left + w, top + h]


def test_boxes_are_mapped_onto_the_squashed_source():
    augment = BatchedTwoViews(image_size=32, source_size=64)
    sizes = torch.tensor([[100, 300]])
    p = augment.draw(sizes, torch.Generator().manual_seed(3))
    u = torch.rand(2, CROP_UNIFORMS + 14, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    raw = crop_boxes(sizes.repeat_interleave(2, 0), 0.2, u)  # the same draws, in the image's pixels
    assert torch.allclose(p["box"][0], raw * torch.tensor([64 / 300, 64 / 100, 64 / 300, 64 / 100]))


# ---- pixels, for fixed parameters, against torchvision.transforms.v2.functional ----------------

def image(n=2, size=24, seed=0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_brightness_contrast_saturation_and_hue_match_torchvision():
    x = image()
    for op, fn in ((BRIGHTNESS, F.adjust_brightness), (CONTRAST, F.adjust_contrast), (SATURATION, F.adjust_saturation)):
        for factor in (0.6, 1.3):
            ours = blend(x, torch.full((2,), op), torch.full((2,), factor))
            assert torch.allclose(ours, torch.stack([fn(img, factor) for img in x]), atol=1e-6)
    for shift in (-0.1, 0.03, 0.4):
        assert torch.allclose(shift_hue(x, torch.full((2,), shift)), F.adjust_hue(x, shift), atol=1e-5)


def test_color_jitter_applies_each_rows_ops_in_its_own_order():
    x = image(n=24)
    factors = torch.tensor([1.3, 0.7, 1.15, 0.08]).expand(24, 4)
    order = torch.tensor(list(itertools.permutations(range(4))))  # one row per permutation
    on = torch.ones(24, dtype=torch.bool)
    on[5] = False
    ours = color_jitter(x, {"order": order, "factors": factors, "jitter": on})
    fns = {BRIGHTNESS: F.adjust_brightness, CONTRAST: F.adjust_contrast, SATURATION: F.adjust_saturation,
           HUE: F.adjust_hue}
    for i in range(24):
        expected = x[i]
        for op in order[i].tolist() if on[i] else []:
            expected = fns[op](expected, factors[i, op].item())
        assert torch.allclose(ours[i], expected, atol=1e-5), f"order {order[i].tolist()}"


def test_blur_matches_torchvision_gaussian_blur():
    x = image(n=3)
    sigma = torch.tensor([0.4, 1.7, 1.0])
    ours = gaussian_blur(x, gaussian_kernels(sigma, torch.tensor([True, True, False]), 13))
    for i in range(2):
        assert torch.allclose(ours[i], F.gaussian_blur(x[i], [13, 13], [sigma[i].item()] * 2), atol=1e-6)
    assert torch.equal(ours[2], x[2])  # blur off: exactly unchanged


def fixed_params(b: int, box, **on) -> dict:
    """Parameters [b, 2, ...] with every random op off except those named in `on`."""
    off = torch.zeros(b, 2, dtype=torch.bool)
    p = {k: off.clone() for k in ("jitter", "grey", "blur", "solarize", "flip")}
    p.update({k: torch.full((b, 2), v, dtype=torch.bool) for k, v in on.items()})
    p["box"] = torch.tensor(box, dtype=torch.float32).expand(b, 2, 4)
    p["factors"], p["order"] = torch.ones(b, 2, 4), torch.arange(4).expand(b, 2, 4)
    p["sigma"] = torch.ones(b, 2)
    return p


def test_whole_views_match_torchvision_for_fixed_parameters():
    images = (image(n=2, size=32) * 255).round().to(torch.uint8)
    augment = BatchedTwoViews(image_size=16, crop_min=0.2)
    unit = images.float() / 255
    mean, std = augment.mean, augment.std
    # Crop (x 8, y 4)-(16, 16), an upscale: roi_align's samples are torchvision's bilinear ones,
    # except on the outer ring, where roi_align blends in the pixels just outside the box while
    # resized_crop, which cuts first, repeats the box's edge pixels.
    crop = F.resized_crop(unit, top=4, left=8, height=12, width=8, size=[16, 16], antialias=False)
    inner = (..., slice(1, -1), slice(1, -1))
    v1, _ = augment(images, fixed_params(2, [8, 4, 16, 16]))
    assert torch.allclose(v1[inner], F.normalize(crop, mean, std)[inner], atol=1e-5)
    v1, _ = augment(images, fixed_params(2, [8, 4, 16, 16], flip=True, solarize=True, grey=True))
    expected = F.horizontal_flip(F.solarize(F.rgb_to_grayscale(crop, 3), 128 / 255))
    assert torch.allclose(v1[inner], F.normalize(expected, mean, std)[inner], atol=1e-5)
    # A crop at the image's corner has no outside pixels to blend in: equal everywhere.
    corner = F.resized_crop(unit, top=0, left=0, height=12, width=8, size=[16, 16], antialias=False)
    v1, _ = augment(images, fixed_params(2, [0, 0, 8, 12]))
    assert torch.allclose(v1[..., :-1, :-1], F.normalize(corner, mean, std)[..., :-1, :-1], atol=1e-5)
    # A downscale is antialiased by averaging: halving the whole image is a 2 x 2 box filter.
    v1, _ = augment(images, fixed_params(2, [0, 0, 32, 32]))
    assert torch.allclose(v1, F.normalize(torch.nn.functional.avg_pool2d(unit, 2), mean, std), atol=1e-5)


def test_views_shapes_dtype_and_determinism():
    augment = BatchedTwoViews(image_size=32, crop_min=0.2)
    images = (image(n=5, size=32) * 255).to(torch.uint8)
    p = augment.draw(torch.tensor([[32, 32]]).expand(5, 2), torch.Generator().manual_seed(0))
    assert all(v.shape[:2] == (5, 2) for v in p.values())
    v1, v2 = augment(images, p)
    assert v1.shape == v2.shape == (5, 3, 32, 32) and v1.dtype == v2.dtype == torch.float32
    assert torch.isfinite(v1).all() and not torch.equal(v1, v2)
    again = augment(images, augment.draw(torch.tensor([[32, 32]]).expand(5, 2), torch.Generator().manual_seed(0)))
    assert torch.equal(again[0], v1) and torch.equal(again[1], v2)
    chunked = BatchedTwoViews(image_size=32, crop_min=0.2, chunk=3)(images, p)
    assert torch.allclose(chunked[0], v1, atol=1e-6) and torch.allclose(chunked[1], v2, atol=1e-6)


def test_dataset_returns_seeded_uint8_sources_and_parameters(tmp_path):
    root = make_image_folder(str(tmp_path), classes=2, train_per_class=3, val_per_class=1, size=40)
    augment = BatchedTwoViews(image_size=32)
    dataset = PretrainDataset(f"{root}/train", augment.dataset_transforms())
    source, params, label, failed = dataset[(1, 123)]
    assert source.dtype == torch.uint8 and source.shape == (3, 32, 32) and failed == 0
    assert params["box"].shape == (2, 4) and params["flip"].shape == (2,)
    again = dataset[(1, 123)][1]
    assert all(torch.equal(params[k], again[k]) for k in params)  # a function of the sample's seed
    other = dataset[(1, 124)][1]
    assert not torch.equal(params["box"], other["box"])
    batch = torch.utils.data.default_collate([dataset[(i, i)] for i in range(4)])
    v1, v2 = augment(batch[0], batch[1])
    assert v1.shape == v2.shape == (4, 3, 32, 32)


def test_views_run_on_the_images_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    augment = BatchedTwoViews(image_size=32)
    images = (image(n=4, size=32) * 255).to(torch.uint8)
    p = augment.draw(torch.tensor([[32, 32]]).expand(4, 2), torch.Generator().manual_seed(0))
    cpu = augment(images, p)
    gpu = augment(images.cuda(), p)
    assert gpu[0].is_cuda and torch.allclose(gpu[0].cpu(), cpu[0], atol=1e-4)
