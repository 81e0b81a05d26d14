"""--bf-lr-scale: a trainable BatchFormer runs in its own optimizer group at the scaled lr, checked at
the default 0.1 (test_bf_variants trains it at 1, where a scale that is never applied goes unseen).
That the loop sets that group's lr at every step: test_train_loop_settings.py."""

import torch

import train
from scripts import BF_TRAINABLE_TINY


def test_batchformer_group_holds_exactly_its_weights_at_the_default_scale(tmp_path):
    args = train.parse_args(["--data", str(tmp_path), "--output-dir", str(tmp_path / "run"), *BF_TRAINABLE_TINY])
    assert args.bf_lr_scale == 0.1  # the documented default
    config, _ = train.with_recipe(args)
    plan = train.make_plan(config, 32, 1, "pairs-sum", "off")
    model, optimizer, names = train.build_model_and_optimizer(config, plan, torch.device("cpu"))
    assert [g["lr_scale"] for g in optimizer.param_groups] == [1.0, 0.1]
    bf = {id(p) for p in model.batchformer.parameters()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == bf and len(bf) > 0
    assert not any(id(p) in bf for p in optimizer.param_groups[0]["params"])
    assert names[-len(bf):] == [n for n, _ in model.named_parameters() if n.startswith("batchformer.")]
