"""--bf-lr-scale: a trainable BatchFormer runs in its own optimizer group at the scaled lr, checked at
the default 0.1 (test_bf_variants trains it at 1, where a scale that is never applied goes unseen)."""

import pytest
import torch

import train
from bfcl.schedules import learning_rate
from bfcl.synthetic import make_image_folder

TINY = ["-a", "resnet18", "--stem", "small", "--image-size", "16", "-b", "8", "--moco-mlp-dim", "64",
        "--moco-dim", "32", "--workers", "0", "--log-every", "1", "--epochs", "2", "--warmup-epochs", "1",
        "--add_bf", "1", "--bf-trainable"]


def test_batchformer_group_holds_exactly_its_weights_at_the_default_scale(tmp_path):
    args = train.parse_args(["--data", str(tmp_path), "--output-dir", str(tmp_path / "run"), *TINY])
    assert args.bf_lr_scale == 0.1  # the documented default
    config, _ = train.with_recipe(args)
    plan = train.make_plan(config, 32, 1, "pairs-sum")
    model, optimizer, names = train.build_model_and_optimizer(config, plan, torch.device("cpu"), "no")
    assert [g["lr_scale"] for g in optimizer.param_groups] == [1.0, 0.1]
    bf = {id(p) for p in model.batchformer.parameters()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == bf and len(bf) > 0
    assert not any(id(p) in bf for p in optimizer.param_groups[0]["params"])
    assert names[-len(bf):] == [n for n, _ in model.named_parameters() if n.startswith("batchformer.")]


@pytest.mark.slow
def test_training_sets_the_batchformer_lr_to_the_scaled_one(tmp_path, monkeypatch):
    """train.main for 3 steps: at every optimizer step, the BatchFormer group's lr is 0.1 x the
    scheduled lr of that step (the closed form), and the main group's is the scheduled lr itself."""
    data = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=8, val_per_class=1, size=16)
    seen = []
    build = train.build_optimizer

    def recording_optimizer(name, groups, weight_decay):
        optimizer = build(name, groups, weight_decay)
        step = optimizer.step

        def recorded_step(*args, **kwargs):
            seen.append([g["lr"] for g in optimizer.param_groups])
            return step(*args, **kwargs)

        optimizer.step = recorded_step
        return optimizer

    monkeypatch.setattr(train, "build_optimizer", recording_optimizer)
    assert train.main(["--data", data, "--output-dir", str(tmp_path / "run"), *TINY, "--max-steps", "3"]) == 0
    peak = 0.6 * 8 / 256  # the ResNet recipe's lr x batch / 256
    expected = [learning_rate(s, 8, 4, peak) for s in range(3)]  # 32 images / batch 8: 4 steps an epoch, 2 epochs
    assert len(seen) == 3 and expected[1] > 0
    for lrs, lr in zip(seen, expected):
        assert lrs == pytest.approx([lr, 0.1 * lr], rel=1e-12, abs=0)
