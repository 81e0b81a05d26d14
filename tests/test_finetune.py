"""Fine-tuning pieces against worked values (docs/method.md#fine-tuning)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.ops import StochasticDepth

from bfcl.errors import ConfigError
from bfcl.finetune import finetune_recipe
from bfcl.finetune_recipe import (RESNET_RECIPE, VIT_RECIPE, MixupCutmix, add_drop_path, lr_at, recipe_for,
                                  soft_target_cross_entropy, train_transform)
from bfcl.optim import param_groups
from bfcl.views import IMAGENET_MEAN, IMAGENET_STD


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16,
                             mlp_dim=32, num_classes=10)


# ---- recipes ----

def test_recipes():
    assert recipe_for("resnet") is RESNET_RECIPE and recipe_for("vit") is VIT_RECIPE
    assert RESNET_RECIPE.scaled_lr(512) == pytest.approx(0.2)  # 0.1 x 512 / 256
    assert VIT_RECIPE.scaled_lr(1024) == pytest.approx(1e-3)  # 5e-4 x 1024 / 512
    with pytest.raises(ValueError, match="unknown family"):
        recipe_for("convnext")


def test_shortened_schedule_scales_the_recipe_warmup():
    """--epochs 3 without --warmup-epochs: 5 of 90 epochs becomes 5 x 3 / 90 (ResNet), 5 x 3 / 150 (ViT)."""
    recipe, note = finetune_recipe("resnet18", False, epochs=3.0)
    assert (recipe.epochs, recipe.warmup_epochs) == (3.0, pytest.approx(1 / 6))
    assert "0.166667 epochs" in note and "5 of 90" in note and "--epochs 3" in note
    recipe, note = finetune_recipe("vit_tiny", False, epochs=30.0)
    assert recipe.warmup_epochs == pytest.approx(1.0) and "5 of 150" in note
    # an explicit warm-up, the default schedule and a longer one keep the recipe's 5 epochs, with no note
    for given in ({"epochs": 3.0, "warmup_epochs": 1.0}, {"epochs": None, "warmup_epochs": None}, {"epochs": 300.0}):
        recipe, note = finetune_recipe("resnet18", False, **given)
        assert note is None and recipe.warmup_epochs == (given.get("warmup_epochs") or 5)
    with pytest.raises(ConfigError, match="--warmup-epochs 4 must be shorter than --epochs 3"):
        finetune_recipe("resnet18", False, epochs=3.0, warmup_epochs=4.0)
    with pytest.raises(ConfigError, match="unknown fine-tuning setting"):
        finetune_recipe("resnet18", False, warmup=1.0)
    recipe, note = finetune_recipe("resnet18", True, epochs=3.0)
    assert recipe.warmup_epochs == 0 and note is None  # a pretrained ResNet's recipe has no warm-up to scale


# ---- lr_at ----

@pytest.mark.parametrize("step, expected", [
    (0, 0.0),  # warm-up starts from 0
    (5, 0.5),  # half-way through warm-up
    (10, 1.0),  # end of warm-up: the peak
    (55, 0.1 + 0.9 * 0.5),  # middle of the cosine: half-way between peak and min
    (10 + 45 // 2, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 22 / 90))),
    (100, 0.1),  # end: min_lr
])
def test_lr_at_closed_form(step, expected):
    assert lr_at(step, 100, 10, 1.0, 0.1) == pytest.approx(expected, abs=1e-12)


# ---- param_groups ----

def test_vit_layer_decay_groups():
    model = tiny_vit()
    groups, names = param_groups(model, "vit", weight_decay=0.05, layer_decay=0.5)
    named = dict(model.named_parameters())

    # every trainable parameter in exactly one group, and names follow the groups' order
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len(named) == len(names) == len(set(names))
    assert all(p is named[n] for p, n in zip(flat, names))

    group_of = {n: g for g in groups for n, p in named.items() if any(p is q for q in g["params"])}
    expected_scale = {"conv_proj.weight": 0.5 ** 4, "class_token": 0.5 ** 4, "encoder.pos_embedding": 0.5 ** 4,
                      "encoder.layers.encoder_layer_0.mlp.0.weight": 0.5 ** 3,
                      "encoder.layers.encoder_layer_1.ln_1.bias": 0.5 ** 2,
                      "encoder.layers.encoder_layer_2.self_attention.in_proj_weight": 0.5,
                      "encoder.ln.weight": 1.0, "heads.head.weight": 1.0, "heads.head.bias": 1.0}
    for name, scale in expected_scale.items():
        assert group_of[name]["lr_scale"] == pytest.approx(scale), name

    no_wd = {n for n in named if group_of[n]["weight_decay"] == 0.0}
    assert no_wd == {n for n, p in named.items() if p.ndim <= 1} | {"class_token", "encoder.pos_embedding"}
    assert all(group_of[n]["weight_decay"] == 0.05 for n in named if n not in no_wd)
    # 5 layer ids x (decay, no decay), each pair distinct: 10 groups
    assert len(groups) == 10
    assert len({(g["weight_decay"], g["lr_scale"]) for g in groups}) == 10


def test_vit_groups_without_layer_decay_and_frozen_params():
    model = tiny_vit()
    model.conv_proj.weight.requires_grad_(False)
    groups, names = param_groups(model, "vit", weight_decay=0.05)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.0, 1.0), (0.05, 1.0)]  # class_token first
    assert "conv_proj.weight" not in names
    assert len(names) == sum(p.requires_grad for p in model.parameters())


def test_resnet_groups():
    model = torchvision.models.resnet18(num_classes=10)
    groups, names = param_groups(model, "resnet", weight_decay=1e-4)
    # torchvision's reference defaults decay every tensor: 20 convs + 20 BNs x (weight, bias) + fc
    assert [(g["weight_decay"], g["lr_scale"], len(g["params"])) for g in groups] == [(1e-4, 1.0, 62)]
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"] and names[-1] == "fc.bias"
    with pytest.raises(ValueError, match="needs a ViT"):
        param_groups(model, "resnet", weight_decay=1e-4, layer_decay=0.75)


def test_names_index_the_optimizer_state():
    model = tiny_vit()
    groups, names = param_groups(model, "vit", weight_decay=0.05, layer_decay=0.75)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    named = dict(model.named_parameters())
    state = opt.state_dict()["state"]
    assert sorted(state) == list(range(len(names)))
    assert all(state[i]["exp_avg"].shape == named[n].shape for i, n in enumerate(names))


# ---- drop path ----

def test_drop_path_eval_identity_keys_and_rates():
    plain = tiny_vit().eval()
    dropped = copy.deepcopy(plain)
    add_drop_path(dropped, 0.2)
    dropped.eval()
    assert list(dropped.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropped(x), plain(x))
    assert drop_rates(dropped) == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2, 0.2])  # linspace(0, 0.2, 3), both branches
    add_drop_path(dropped, 0.4)  # again: rates updated, nothing added
    assert drop_rates(dropped) == pytest.approx([0.0, 0.0, 0.2, 0.2, 0.4, 0.4])
    assert list(dropped.state_dict()) == list(plain.state_dict())


def drop_rates(vit: VisionTransformer) -> list[float]:
    return [m.p for block in vit.encoder.layers for m in block.modules() if isinstance(m, StochasticDepth)]


def test_drop_path_rate_one_skips_the_last_block_in_training():
    model = tiny_vit()
    add_drop_path(model, 1.0)  # the last block drops both branches for every sample
    model.train()
    seen = {}
    last, first = model.encoder.layers[-1], model.encoder.layers[0]
    last.register_forward_hook(lambda m, inp, out: seen.update(last=(inp[0], out)))
    first.register_forward_hook(lambda m, inp, out: seen.update(first=(inp[0], out)))
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(seen["last"][1], seen["last"][0])
    assert not torch.allclose(seen["first"][1], seen["first"][0])  # rate 0: the block still acts


# ---- Mixup / CutMix ----

LABELS = torch.tensor([0, 1, 2, 3])  # distinct, so target weights read off one column each


def test_mixup_matches_its_targets():
    images = torch.rand(4, 3, 8, 8)
    torch.manual_seed(1)
    mixed, targets = MixupCutmix(num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0)(images, LABELS)
    assert targets.shape == (4, 5) and torch.allclose(targets.sum(1), torch.ones(4))
    lam = targets[0, 0].item()  # own label's weight; row 0 is paired with row 3 (a roll)
    assert 0 < lam < 1 and targets[0, 3].item() == pytest.approx(1 - lam)
    assert torch.allclose(targets[torch.arange(4), LABELS], torch.full((4,), lam))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)


def test_cutmix_pasted_area_matches_its_targets():
    images = torch.rand(4, 3, 16, 16)  # no two pixels equal
    pasted = []
    for seed in range(5):
        torch.manual_seed(seed)
        mixed, targets = MixupCutmix(num_classes=5, mixup_alpha=0.0, cutmix_alpha=1.0)(images, LABELS)
        assert torch.allclose(targets.sum(1), torch.ones(4))
        from_other = (mixed == images.roll(1, 0)).all(1)  # [N, H, W]
        assert torch.equal(from_other | (mixed == images).all(1), torch.ones_like(from_other))
        share = from_other.float().mean((1, 2))
        assert torch.allclose(share, targets[torch.arange(4), LABELS.roll(1)], atol=1e-6)
        pasted.append(share[0].item())
    assert max(pasted) > 0  # some seed pasted a non-empty box


def test_mixup_cutmix_switch_and_determinism():
    images = torch.rand(4, 3, 16, 16)
    mix = MixupCutmix(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    kinds = set()
    for seed in range(12):
        torch.manual_seed(seed)
        a = mix(images, LABELS)
        torch.manual_seed(seed)
        b = mix(images, LABELS)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        untouched = (a[0] == images).all(1).float().mean().item()
        kinds.add("cutmix" if untouched > 0 else "mixup")  # mixup changes every pixel
    assert kinds == {"mixup", "cutmix"}


def test_no_mixing_gives_one_hot():
    images = torch.rand(4, 3, 8, 8)
    mixed, targets = MixupCutmix(num_classes=5, mixup_alpha=0.0, cutmix_alpha=0.0)(images, LABELS)
    assert mixed is images and torch.equal(targets, F.one_hot(LABELS, 5).float())


# ---- loss ----

def test_soft_target_cross_entropy_hard_labels():
    logits, labels = torch.randn(6, 4), torch.randint(0, 4, (6,))
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.equal(soft_target_cross_entropy(logits, labels, 0.1), expected)
    # one-hot rows through the soft path give the same value
    soft = soft_target_cross_entropy(logits, F.one_hot(labels, 4).float(), 0.1)
    assert soft.item() == pytest.approx(expected.item(), rel=1e-6)


def test_soft_target_cross_entropy_by_hand():
    logits = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    targets = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    s, k = 0.1, 3
    loss = 0.0
    for z, t in zip(logits, targets):
        log_z = math.log(sum(math.exp(v) for v in z))
        loss += -sum((ti * (1 - s) + s / k) * (zi - log_z) for zi, ti in zip(z, t)) / len(logits)
    assert loss == pytest.approx(1.118109, abs=1e-6)
    got = soft_target_cross_entropy(torch.tensor(logits), torch.tensor(targets), s)
    assert got.item() == pytest.approx(loss, rel=1e-6)


# ---- transforms ----

def test_train_transform():
    image = Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())
    vit = train_transform(VIT_RECIPE, 32, IMAGENET_MEAN, IMAGENET_STD)
    resnet = train_transform(RESNET_RECIPE, 32, IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(0)
    for transform in (vit, resnet):
        assert transform(image).shape == (3, 32, 32)
    kinds = {name: [type(t) for t in tr.transforms] for name, tr in (("vit", vit), ("resnet", resnet))}
    assert kinds["vit"] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandAugment, T.ToTensor, T.Normalize,
                            T.RandomErasing]
    assert kinds["resnet"] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert vit.transforms[-1].p == 0.25 and vit.transforms[2].magnitude == 9
    assert vit.transforms[0].interpolation == T.InterpolationMode.BICUBIC
    assert resnet.transforms[0].interpolation == T.InterpolationMode.BILINEAR
