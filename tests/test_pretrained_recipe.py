"""Each start gets its own fine-tuning recipe (docs/finetune-recipes.md): SimCLR's semi-supervised recipe
for a pretrained ResNet, torchvision's for a random init, DeiT's for ViTs; flags still override."""

import torchvision.transforms as T

import probe
from bfcl.finetune_recipe import (PRETRAINED_RESNET_RECIPE, RESNET_RECIPE, VIT_RECIPE, recipe_for, recipe_reason,
                                  train_transform)


def test_recipe_for_each_start():
    assert recipe_for("resnet", pretrained=True) is PRETRAINED_RESNET_RECIPE
    assert recipe_for("resnet", pretrained=False) is recipe_for("resnet") is RESNET_RECIPE
    assert recipe_for("vit", pretrained=True) is recipe_for("vit") is VIT_RECIPE
    assert "SimCLR" in recipe_reason("resnet", True) and "from-scratch" in recipe_reason("resnet", False)


def test_pretrained_recipe_is_simclrs_semi_supervised_one():
    r = PRETRAINED_RESNET_RECIPE
    # SimCLR appendix B.5: Nesterov momentum 0.9, no warm-up, no regulariser; crop + flip only. The lr is
    # bfcl's sweep's best, 0.1 per 256 (SimCLR: 0.05 per 256): 1.6 at batch 4096.
    assert r.scaled_lr(4096) == 1.6
    assert (r.optimizer, r.momentum, r.nesterov) == ("sgd", 0.9, True)
    assert (r.weight_decay, r.warmup_epochs, r.label_smoothing, r.mixup, r.cutmix, r.random_erasing) == (0,) * 6
    assert not r.randaugment and r.epochs == 30
    steps = train_transform(r, 32, (0.5,) * 3, (0.25,) * 3).transforms
    assert [type(s) for s in steps] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert not RESNET_RECIPE.nesterov and not VIT_RECIPE.nesterov


def test_probe_flags_choose_and_override_the_recipe():
    finetune = ["--data", "d", "--mode", "finetune"]
    recipe, note = probe.recipe_from_flags(probe.parse_args(["--pretrained", "b.safetensors", *finetune]), "resnet18")
    assert recipe.name == "simclr-semi-supervised" and note is None
    recipe, _ = probe.recipe_from_flags(probe.parse_args(["--random-init", *finetune]), "resnet18")
    assert recipe.name == "torchvision-resnet" and recipe.base_lr == 0.1
    flags = probe.parse_args(["--pretrained", "b", *finetune, "--lr", "0.02", "--epochs", "10"])
    recipe, note = probe.recipe_from_flags(flags, "resnet18")
    assert (recipe.base_lr, recipe.epochs, recipe.warmup_epochs, note) == (0.02, 10, 0, None)  # no warm-up to scale
    recipe, _ = probe.recipe_from_flags(probe.parse_args(["--pretrained", "b", *finetune]), "vit_tiny")
    assert recipe.name == "deit"
