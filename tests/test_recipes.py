"""Named recipes (bfcl/recipes.py): every key is a train.py option that its flag spelling sets to the
recipe's value, explicit flags win over the recipe, and docs/recipes.md lists the same flags."""

import os
import re

import pytest

import train
from bfcl.errors import ConfigError
from bfcl.recipes import RECIPES, apply_recipe, as_flags, flag_words

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flag_words_spell_train_options():
    assert flag_words("batch_size", 256) == ["-b", "256"]
    assert flag_words("arch", "resnet18") == ["-a", "resnet18"]
    assert flag_words("blur", False) == ["--no-blur"]
    assert flag_words("moco_mlp_dim", 2048) == ["--moco-mlp-dim", "2048"]
    assert flag_words("lr", 1.5e-4) == ["--lr", "0.00015"]
    assert flag_words("epochs", 6.0) == ["--epochs", "6"]


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_flags_parse_to_the_recipe_values(name):
    """Each key is a train.py dest and its spelling sets exactly that value (a misspelt key, a flag
    that train.py lacks or a value of the wrong type fails here)."""
    parsed = vars(train.parse_args(["--data", "d", *as_flags(RECIPES[name])]))
    for dest, value in RECIPES[name].items():
        assert dest in parsed, f"recipe {name}: {dest} is not a train.py option"
        assert parsed[dest] == value and type(parsed[dest]) is type(value), (name, dest, parsed[dest], value)


def test_small_images_is_the_measured_recipe():
    """bench/quality.py measured these values (docs/results.md); a change here changes what the
    README's quickstart and the figures refer to."""
    assert as_flags(RECIPES["small-images"]) == (
        "-a resnet18 --stem imagenet --image-size 32 -b 256 --optimizer lars --lr 4.8 --wd 1e-05 --moco-t 0.2 "
        "--moco-m 0.8 --moco-mlp-dim 2048 --crop-min 0.2 --no-blur --mixed-precision auto --augment batched "
        "--workers 0 --epochs 6 --warmup-epochs 0.6").split()


def test_explicit_flags_override_the_recipe_and_the_notes_say_so():
    values, notes = apply_recipe("small-images", {"batch_size": 64, "data": "d", "lr": 4.8})
    assert values["batch_size"] == 64 and values["data"] == "d" and values["lr"] == 4.8
    assert values["moco_m"] == 0.8 and values["warmup_epochs"] == 0.6 and values["epochs"] == 6.0
    assert notes["recipe"].startswith("small-images: -a resnet18 ") and " -b " not in notes["recipe"]
    assert "--lr" not in notes["recipe"]  # given, though equal: not the recipe's doing
    assert notes["recipe overridden"] == "-b 64 (recipe: 256)"


def test_epochs_without_warmup_keep_the_recipes_warmup_share():
    values, notes = apply_recipe("small-images", {"epochs": 20.0})
    assert values["warmup_epochs"] == pytest.approx(2.0)
    assert "--warmup-epochs 2 (the recipe's 10 % of --epochs 20)" in notes["recipe overridden"]
    values, _ = apply_recipe("small-images", {"epochs": 20.0, "warmup_epochs": 1.0})
    assert values["warmup_epochs"] == 1.0


def test_no_override_no_override_note_and_unknown_names_are_refused():
    values, notes = apply_recipe("moco-v3-vit-small", {})
    assert values == RECIPES["moco-v3-vit-small"] and notes["recipe overridden"] is None
    with pytest.raises(ConfigError, match="small-images"):
        apply_recipe("small-image", {})


@pytest.mark.parametrize("name", list(RECIPES))
def test_docs_recipes_md_lists_each_recipe_with_its_flags(name):
    text = open(os.path.join(REPO, "docs", "recipes.md")).read()
    match = re.search(rf"`--recipe {re.escape(name)}` sets `([^`]+)`", text)
    assert match, f"docs/recipes.md should say: `--recipe {name}` sets `<its flags>`"
    assert match.group(1).split() == as_flags(RECIPES[name])
