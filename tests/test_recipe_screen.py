"""bench/recipe_screen.py without training: which runs a --variants spec asks for, the train.py
flags each gets at a given run length, and the table's paired differences on worked numbers."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import recipe_screen  # noqa: E402


def test_variant_list_puts_the_recipe_first_once_and_keeps_combinations():
    names = recipe_screen.variant_list("blur, crop-min-0.08+wd-1e-4,blur,recipe")
    assert names == ["recipe", "blur", "crop-min-0.08+wd-1e-4"]


def test_variant_list_without_the_recipe_keeps_only_the_named_runs():
    assert recipe_screen.variant_list("momentum-0.9+crop-min-0.08", with_recipe=False) == [
        "momentum-0.9+crop-min-0.08"]
    with pytest.raises(SystemExit) as e:
        recipe_screen.parse_args(["--no-recipe", "--variants", ""])
    assert "--no-recipe" in str(e.value) and "--variants" in str(e.value)


def test_unknown_variant_is_a_one_line_error_naming_it(capsys):
    with pytest.raises(SystemExit) as e:
        recipe_screen.variant_list("blur+crop-min-0.5")
    message = str(e.value)
    assert "'crop-min-0.5'" in message and "crop-min-0.08" in message and "\n" not in message


def test_flags_fill_in_the_warmup_of_the_run_length():
    # 2 epochs: warm-up 10 % = 0.2 epochs, half of it 0.1; a combination applies both in order.
    assert recipe_screen.flags("momentum-0.99-short-warmup+wd-1e-4", 2.0) == [
        "--moco-m", "0.99", "--warmup-epochs", "0.1", "--wd", "1e-4"]
    assert recipe_screen.flags("recipe", 2.0) == []


def test_report_pairs_each_variant_with_the_recipe_of_its_seed():
    def run(name, seed, knn, linear):
        return {"name": name, "seed": seed, "knn_top1": knn, "linear_top1": linear, "steps": 10, "wall_s": 90.0}
    records = [run("recipe", 0, 40.0, 45.0), run("recipe", 1, 42.0, 46.0),
               run("blur", 0, 41.0, 44.0), run("blur", 1, 45.0, 47.0),
               run("wd-1e-4", 0, 39.0, 45.0), run("wd-1e-4", 1, 41.0, 46.0)]
    info = {"data_name": "toy", "steps": 10, "epochs": 0.5, "command": "c", "date": "d", "date_end": "e",
            "git": "g", "recipe": "r", "hardware": {"cpu": "cpu", "bf16": "native", "cores": 2}}
    text, ranking = recipe_screen.report(info, records, ["recipe", "blur", "wd-1e-4"], seeds=2)
    # blur: kNN differences +1 and +3 -> 2.0 ± 1.4; fast-linear -1 and +1 -> 0.0 ± 1.4.
    assert "| blur | `--blur` | 43.0 ± 2.8 | 2.0 ± 1.4 | 45.5 ± 2.1 | 0.0 ± 1.4 | 10 | 1.5, 1.5 |" in text
    assert "| recipe | `–` | 41.0 ± 1.4 | – | 45.5 ± 0.7 | – |" in text
    assert ranking["ranking"] == ["blur", "wd-1e-4"]
    assert ranking["summary"]["wd-1e-4"]["knn_diff_mean"] == pytest.approx(-1.0)
    assert ranking["summary"]["wd-1e-4"]["knn_diff_std"] == pytest.approx(0.0)


def test_report_without_the_recipe_ranks_by_knn_and_pairs_nothing():
    def run(name, seed, knn, linear):
        return {"name": name, "seed": seed, "knn_top1": knn, "linear_top1": linear, "steps": 10, "wall_s": 600.0}
    records = [run("blur", 0, 41.0, 44.0), run("wd-1e-4", 0, 43.5, 45.0)]
    info = {"data_name": "toy", "steps": 10, "epochs": 0.5, "command": "c", "date": "d", "date_end": "e",
            "git": "g", "recipe": "r", "hardware": {"cpu": "cpu", "bf16": "native", "cores": 2}}
    text, ranking = recipe_screen.report(info, records, ["blur", "wd-1e-4"], seeds=1)
    assert "| wd-1e-4 | `--wd 1e-4` | 43.5 | – | 45.0 | – | 10 | 10.0 |" in text
    assert "Ranking by kNN (no recipe run here to pair with): wd-1e-4, blur." in text
    assert ranking["ranking"] == ["wd-1e-4", "blur"] and "knn_diff_mean" not in ranking["summary"]["blur"]
