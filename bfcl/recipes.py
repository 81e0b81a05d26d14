"""Named recipes: sets of train.py option values under one name, `train.py --recipe NAME`.

A recipe is a plain dict from train.py option names (argparse dests: `batch_size` for -b,
`blur` False for --no-blur) to values. Flags given on the command line override it, and the
start-up summary says what the recipe set and what was overridden. docs/recipes.md tells where
each recipe comes from and what it measured; tests/test_recipes.py checks that every key is a
train.py option and that docs/recipes.md lists the same values.

    values, notes = apply_recipe("small-images", {"epochs": 20.0})
    # values: the recipe with --epochs 20 and a warm-up of 2 epochs (the recipe's 10 %)
"""

from bfcl.errors import ConfigError

# MoCo v3's published settings (its README's commands, facebookresearch/moco-v3) and bfcl's
# measured small-image settings (bench/quality.py runs the first; docs/recipes.md has the figures).
RECIPES: dict[str, dict] = {
    # ResNet-18 on 32 px images on a CPU: measured on CIFAR-10, 2 cores (docs/recipes.md#small-images).
    # Launched as 2 torchrun processes x 1 thread, images loaded in-process; 6 epochs are 15 minutes there.
    "small-images": {
        "arch": "resnet18", "stem": "imagenet", "image_size": 32, "batch_size": 256, "optimizer": "lars",
        "lr": 4.8, "wd": 1e-5, "moco_t": 0.2, "moco_m": 0.8, "moco_mlp_dim": 2048, "crop_min": 0.2,
        "blur": False, "mixed_precision": "auto", "augment": "batched", "workers": 0,
        "epochs": 6.0, "warmup_epochs": 0.6,
    },
    # ViT-Tiny with 8x8 patches of 32 px images: MoCo v3's ViT optimiser values and the small-image
    # measurements (docs/recipes.md#vit-tiny-small-images); bench/quality.py --vit runs it.
    "vit-tiny-small-images": {
        "arch": "vit_tiny", "patch_size": 8, "image_size": 32, "batch_size": 256, "optimizer": "adamw",
        "lr": 5e-4, "wd": 0.1, "moco_t": 0.2, "moco_m": 0.8, "moco_mlp_dim": 1024, "crop_min": 0.2,
        "blur": False, "mixed_precision": "auto", "augment": "batched", "workers": 0,
        "epochs": 2.0, "warmup_epochs": 0.2,
    },
    # MoCo v3's ResNet-50, 100 epochs at batch 4096 on 16 GPUs: train.py's defaults, spelled out.
    "moco-v3-resnet50": {
        "arch": "resnet50", "image_size": 224, "batch_size": 4096, "optimizer": "lars", "lr": 0.6, "wd": 1e-6,
        "moco_t": 1.0, "moco_m": 0.99, "moco_mlp_dim": 4096, "crop_min": 0.2, "epochs": 100.0, "warmup_epochs": 10.0,
    },
    # MoCo v3's ViT-Small/16, 300 epochs at batch 1024 on 8 GPUs (12 heads).
    "moco-v3-vit-small": {
        "arch": "vit_small", "patch_size": 16, "image_size": 224, "batch_size": 1024, "optimizer": "adamw",
        "lr": 1.5e-4, "wd": 0.1, "moco_t": 0.2, "moco_m": 0.99, "moco_mlp_dim": 4096, "crop_min": 0.08,
        "epochs": 300.0, "warmup_epochs": 40.0,
    },
    # MoCo v3's ViT-Base/16, 300 epochs at batch 4096 (several nodes).
    "moco-v3-vit-base": {
        "arch": "vit_base", "patch_size": 16, "image_size": 224, "batch_size": 4096, "optimizer": "adamw",
        "lr": 1.5e-4, "wd": 0.1, "moco_t": 0.2, "moco_m": 0.99, "moco_mlp_dim": 4096, "crop_min": 0.08,
        "epochs": 300.0, "warmup_epochs": 40.0,
    },
}

# Short options, for the notes; every other dest `x_y` is written `--x-y`.
_SHORT = {"arch": "-a", "batch_size": "-b"}


def flag_words(dest: str, value) -> list[str]:
    """One option as train.py's command line spells it: ('batch_size', 256) -> ['-b', '256'],
    ('blur', False) -> ['--no-blur'], ('lr', 0.00015) -> ['--lr', '0.00015']."""
    name = _SHORT.get(dest, "--" + dest.replace("_", "-"))
    if isinstance(value, bool):
        return [name if value else "--no-" + name[2:]]
    return [name, f"{value:g}" if isinstance(value, float) else str(value)]


def as_flags(values: dict) -> list[str]:
    """A recipe as command-line words, in the recipe's order."""
    return [word for dest, value in values.items() for word in flag_words(dest, value)]


def apply_recipe(name: str, given: dict) -> tuple[dict, dict[str, str | None]]:
    """The option values of recipe `name` with the explicitly given ones on top, and the start-up
    summary's notes on what the recipe set and what was overridden.

    given: {dest: value} of the options typed on the command line (not their defaults).
    Returns (values, notes): values = the recipe's options, then `given` (every given option,
    recipe key or not); notes = {"recipe": ..., "recipe overridden": ... or None}.

    An --epochs given without --warmup-epochs keeps the recipe's warm-up share of the run, longer or
    shorter (the small-image recipes' length is a time budget, their warm-up a share of it), so that
    `--recipe small-images --epochs 20` warms up for 2 epochs, not 0.6. Without a recipe, train.py
    keeps MoCo v3's warm-up epochs for longer runs and scales only shorter ones (bfcl.runs.scaled_warmup).
    ConfigError for an unknown name, naming the recipes there are.
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)} (docs/recipes.md)")
    recipe = RECIPES[name]
    values = {**recipe, **given}
    scaled = "epochs" in given and "warmup_epochs" not in given and "warmup_epochs" in recipe
    if scaled:
        values["warmup_epochs"] = given["epochs"] * recipe["warmup_epochs"] / recipe["epochs"]
    kept = {k: v for k, v in recipe.items() if k not in given and not (scaled and k == "warmup_epochs")}
    overridden = [" ".join(flag_words(k, given[k])) + f" (recipe: {' '.join(flag_words(k, v)[-1:])})"
                  for k, v in recipe.items() if k in given and given[k] != v]
    if scaled:
        overridden.append(f"--warmup-epochs {values['warmup_epochs']:g} (the recipe's "
                          f"{100 * recipe['warmup_epochs'] / recipe['epochs']:g} % of --epochs {given['epochs']:g})")
    notes = {"recipe": f"{name}: {' '.join(as_flags(kept))}",
             "recipe overridden": ", ".join(overridden) or None}
    return values, notes
