"""Multi-crop (issue 37, docs/multicrop.md): local crops and more global views against MoCo v3's two
views at equal wall-clock, paired by seed.

    make bench-multicrop                                         # 15 min per run, 2 seeds, every arm
    .venv/bin/python bench/multicrop.py --budget-min 15 --seeds 2 --variants local-2,local-6 --out DIR

bench/bf_study.py's study with these arms (ARMS below) in place of its BatchFormer variants: every
run is bench/quality.py's recipe (ResNet-18, CIFAR-10 at 32 px, batch 256, views made per batch,
2 processes x 1 thread, precision auto) with the arm's train.py flags, for the wall-clock of the
MoCo v3 run of its seed; each arm is calibrated against MoCo v3 in interleaved rounds, probe.py
scores each backbone (kNN k 200, fast-linear), --equal-steps adds each arm at MoCo v3's step count.
All of bf_study.py's flags apply (--quality-args, --calibration-rounds, ...).

The arms: 2, 4 or 6 local crops of 17 px (scale 0.05-0.4, DINO's; not DINO's 14 px of 32, see
LOCAL); 3 or 4 global views of the same 256 images; 4 global views of 128 images (the views per step of
MoCo v3's 2 x 256: more views of fewer images, half the recipe's batch; lr scaled by the batch as
train.py does); BatchFormer as released without and with 4 local crops, per view and joint (--bf-views).

Outputs in --out (default bench-results/multicrop): as bench/bf_study.py's.
"""

import dataclasses
import sys

import bf_study
from cifar_pretraining import WARMUP_SHARE

# 17 px local crops, not DINO's 14 of 32 (train.py's default): with the recipe's ImageNet stem a 14 px crop
# reaches layer4 as a 1 x 1 map, where CPU bf16 convolutions return NaN gradients (train.py refuses it);
# 17 px is the smallest size that gives layer4 2 x 2 (docs/multicrop.md#views).
LOCAL = ["--local-crop-size", "17"]
# name -> train.py flags after the recipe; "{half-batch}" becomes half the recipe's batch (128), and
# "{epochs-half-batch}" and "{warmup-half-batch}" the run's --epochs and --warmup-epochs at that batch, whose
# epochs have twice the steps of the recipe's.
ARMS = {
    "local-2": ["--local-crops", "2", *LOCAL],
    "local-4": ["--local-crops", "4", *LOCAL],
    "local-6": ["--local-crops", "6", *LOCAL],
    "views-3": ["--global-views", "3"],
    "views-4": ["--global-views", "4"],
    "views-4-half-batch": ["--global-views", "4", "-b", "{half-batch}", "--epochs", "{epochs-half-batch}",
                           "--warmup-epochs", "{warmup-half-batch}"],
    "bf": ["--bf-loss", "pairs-sum"],
    "bf-local-4": ["--bf-loss", "pairs-sum", "--local-crops", "4", *LOCAL],
    "bf-local-4-joint": ["--bf-loss", "pairs-sum", "--local-crops", "4", *LOCAL, "--bf-views", "joint"],
}


def flags(arm: str, epochs: float) -> list[str]:
    """The arm's flags for a run of `epochs` recipe epochs; epochs 0 (a calibration run, whose length
    train_cmd sets): the half-batch arm's schedule flags are left out, its batch kept."""
    words = ARMS[arm]
    if not epochs:
        drop = {i for i, w in enumerate(words) if w in ("{epochs-half-batch}", "{warmup-half-batch}")}
        words = [w for i, w in enumerate(words) if i not in drop and i + 1 not in drop]
    # train.py's steps = round(steps per epoch at half the batch x epochs) = the planned steps
    half = epochs * STUDY["steps_per_epoch"] / STUDY["half_steps_per_epoch"]
    return [w.replace("{half-batch}", str(STUDY["batch"] // 2)).replace("{epochs-half-batch}", repr(half))
            .replace("{warmup-half-batch}", repr(half * WARMUP_SHARE)) for w in words]


# The study's recipe batch (--quality-args --batch-size) and steps per epoch at it and at its half (CIFAR-10's
# train set: 195 and 390), read when the study makes its setup.
STUDY = {"batch": 256, "steps_per_epoch": 195, "half_steps_per_epoch": 390}
setup_of = bf_study.setup_of


def setup_with_batch(args):
    setup = setup_of(args)
    batch = int(setup.recipe_value("-b"))
    STUDY.update(batch=batch, steps_per_epoch=setup.steps_per_epoch(),
                 half_steps_per_epoch=dataclasses.replace(setup, batch_size=batch // 2).steps_per_epoch())
    return setup


def main(argv=None) -> int:
    bf_study.VARIANTS.clear()
    bf_study.VARIANTS.update(ARMS)
    bf_study.flags, bf_study.setup_of = flags, setup_with_batch
    bf_study.__doc__, bf_study.TITLE, bf_study.RESULTS = __doc__, "Multi-crop arms", "multicrop"
    return bf_study.main(argv)


if __name__ == "__main__":
    sys.exit(main())
