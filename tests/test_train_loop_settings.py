"""What train.py's loop applies, step by step, against the flags and the closed-form schedules: one
in-process run of 3 steps records the optimizer groups' lr at every step (a trainable BatchFormer at
the default --bf-lr-scale 0.1), the momentum of every momentum update, and the views the dataset was
given. Resume tests cannot see these: a run and its resume share any such bug."""

import pytest
import torch

import train
from bfcl.model import MoCo
from bfcl.schedules import learning_rate, momentum
from scripts import TINY

pytestmark = pytest.mark.slow

STEPS = 3


@pytest.fixture(scope="module")
def recorded(tiny_data, tmp_path_factory):
    seen = {"lrs": [], "m": [], "views": None}
    build, update, dataset = train.build_optimizer, MoCo.update_momentum_encoder, train.PretrainDataset

    def recording_optimizer(name, groups, weight_decay):
        optimizer = build(name, groups, weight_decay)
        step = optimizer.step

        def recorded_step(*args, **kwargs):
            seen["lrs"].append([g["lr"] for g in optimizer.param_groups])
            return step(*args, **kwargs)

        optimizer.step = recorded_step
        return optimizer

    def recording_update(self, m):
        seen["m"].append(m)
        return update(self, m)

    def recording_dataset(root, views, *args, **kwargs):
        seen["views"] = views
        return dataset(root, views, *args, **kwargs)

    out = tmp_path_factory.mktemp("recorded")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "build_optimizer", recording_optimizer)
        patch.setattr(MoCo, "update_momentum_encoder", recording_update)
        patch.setattr(train, "PretrainDataset", recording_dataset)
        assert train.main(["--data", tiny_data, "--output-dir", str(out), *TINY, "--bf-trainable", "--no-blur",
                           "--crop-min", "0.5", "--max-steps", str(STEPS)]) == 0
    return seen


def test_batchformer_lr_is_the_scaled_one_at_every_step(recorded):
    """Group 1 (BatchFormer) at 0.1 x the scheduled lr, group 0 at the scheduled lr itself."""
    peak = 0.6 * 8 / 256  # the ResNet recipe's lr x batch / 256
    expected = [learning_rate(s, 8, 4, peak) for s in range(STEPS)]  # 4 steps an epoch, 2 epochs, 1 warm-up
    assert len(recorded["lrs"]) == STEPS and expected[1] > 0
    for lrs, lr in zip(recorded["lrs"], expected):
        assert lrs == pytest.approx([lr, 0.1 * lr], rel=1e-12, abs=0)


def test_momentum_update_follows_the_cosine_schedule(recorded):
    """--moco-m 0.99 raised to 1 on a half-cosine over the 8 steps (--moco-m-cos, the default)."""
    expected = [momentum(s, 8, 0.99, True) for s in range(STEPS)]
    assert expected[0] == 0.99 and expected[2] > expected[1] > 0.99
    assert recorded["m"] == pytest.approx(expected, rel=1e-12, abs=0)


def test_views_take_crop_min_and_no_blur_from_the_flags(recorded):
    views = recorded["views"]
    assert len(views) == 2
    for view in views:
        crops = [t for t in view.transforms if isinstance(t, torch.nn.Module) and hasattr(t, "scale")]
        assert [c.scale for c in crops] == [(0.5, 1.0)]  # RandomResizedCrop from --crop-min 0.5
        applied = [type(t.transforms[0]).__name__ for t in view.transforms if hasattr(t, "transforms")]
        assert "GaussianBlur" not in applied and "ColorJitter" in applied  # --no-blur, the rest kept
