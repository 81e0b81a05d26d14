"""The fine-tuning recipes' augmentation settings as documented (docs/recipes.md#fine-tuning-recipes,
bfcl/finetune_recipe.py, docs/method.md#fine-tuning): RandAugment 2 ops at m9 of 11 bins (DeiT's strength), bicubic,
the mean colour as fill; RandomErasing p 0.25 with per-pixel normal noise; Mixup 0.8 / CutMix 1.0 with
switch prob 0.5. Each is checked on what the objects do, not only on the dataclass fields."""

import statistics

import pytest
import torch
import torchvision.transforms as T

from bfcl.finetune_recipe import RESNET_RECIPE, VIT_RECIPE, MixupCutmix, train_transform
from bfcl.views import IMAGENET_MEAN, IMAGENET_STD


def steps_of(recipe, kind):
    return [t for t in train_transform(recipe, 32, IMAGENET_MEAN, IMAGENET_STD).transforms if isinstance(t, kind)]


def test_recipe_fields_as_documented():
    documented = dict(randaugment=True, random_erasing=0.25, mixup=0.8, cutmix=1.0, mix_switch_prob=0.5,
                      label_smoothing=0.1, drop_path=0.1, interpolation="bicubic")
    assert {k: getattr(VIT_RECIPE, k) for k in documented} == documented
    off = dict(randaugment=False, random_erasing=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0, interpolation="bilinear")
    assert {k: getattr(RESNET_RECIPE, k) for k in off} == off
    assert steps_of(RESNET_RECIPE, T.RandAugment) == [] and steps_of(RESNET_RECIPE, T.RandomErasing) == []


def test_randaugment_is_two_ops_at_deits_m9_strength_bicubic_with_the_mean_fill():
    [randaugment] = steps_of(VIT_RECIPE, T.RandAugment)
    assert (randaugment.num_ops, randaugment.magnitude) == (2, 9)
    assert randaugment.interpolation == T.InterpolationMode.BICUBIC
    assert randaugment.fill == [round(255 * m) for m in IMAGENET_MEAN]  # timm's img_mean
    # m9 is 90 % of each op's range, as timm's rand-m9 (magnitudes over 10): rotate 27 degrees,
    # shear 0.27, enhance +-0.81. torchvision's default 31 bins would make m9 30 %.
    space = randaugment._augmentation_space(randaugment.num_magnitude_bins, (32, 32))
    strength = {op: space[op][0][randaugment.magnitude].item() for op in ("Rotate", "ShearX", "Brightness")}
    assert strength == pytest.approx({"Rotate": 27.0, "ShearX": 0.27, "Brightness": 0.81}, rel=1e-6)


def test_random_erasing_hits_a_quarter_of_the_images_with_normal_noise():
    [erasing] = steps_of(VIT_RECIPE, T.RandomErasing)
    assert (erasing.scale, erasing.ratio) == ((0.02, 0.33), (0.3, 3.3))  # timm's area and aspect ranges
    torch.manual_seed(0)
    image = torch.full((3, 32, 32), 0.5)
    erased, noise = 0, []
    for _ in range(800):
        out = erasing(image.clone())
        changed = out != image
        if changed.any():
            erased += 1
            noise.append(out[changed])
    rate = erased / 800
    assert abs(rate - 0.25) < 5 * (0.25 * 0.75 / 800) ** 0.5, rate
    noise = torch.cat(noise)
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1.0) < 0.05  # N(0, 1) per pixel (remode pixel)


LABELS = torch.tensor([0, 1, 2, 3])


def draw(mix, seed):
    """(kind, lam) of one batch: CutMix leaves some pixels untouched, Mixup none; lam is row 0's own weight."""
    torch.manual_seed(seed)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    mixed, targets = mix(images, LABELS)
    kind = "cutmix" if (mixed == images).all(1).any() else "mixup"
    return kind, targets[0, 0].item()


def test_mixup_and_cutmix_alphas_and_switch_probability():
    mix = MixupCutmix(4, VIT_RECIPE.mixup, VIT_RECIPE.cutmix, VIT_RECIPE.mix_switch_prob)
    kinds = [draw(mix, s)[0] for s in range(600)]
    share = kinds.count("cutmix") / len(kinds)
    assert abs(share - 0.5) < 5 * (0.25 / 600) ** 0.5, share
    # the switch probability is P(CutMix), not P(Mixup)
    skewed = MixupCutmix(4, VIT_RECIPE.mixup, VIT_RECIPE.cutmix, 0.2)
    share = [draw(skewed, s)[0] for s in range(600)].count("cutmix") / 600
    assert abs(share - 0.2) < 5 * (0.2 * 0.8 / 600) ** 0.5, share


def test_mixup_lambda_follows_beta_of_the_recipe_alpha():
    """Beta(0.8, 0.8) has variance 1 / (4 (2 alpha + 1)) = 0.0962; Beta(1, 1) 0.0833, Beta(0.2, 0.2) 0.179."""
    mix = MixupCutmix(4, VIT_RECIPE.mixup, 0.0)
    lams = [draw(mix, s)[1] for s in range(3000)]
    assert all(draw(mix, s)[0] == "mixup" for s in range(5))
    assert abs(statistics.mean(lams) - 0.5) < 0.02
    assert statistics.variance(lams) == pytest.approx(1 / (4 * (2 * 0.8 + 1)), abs=0.006)
