"""What end-to-end fine-tuning trains with (docs/method.md#fine-tuning): recipes, lr schedule,
drop path, Mixup/CutMix, the soft-target loss and the training transform.

bfcl/finetune.py's loop (probe.py --mode finetune) trains a whole torchvision classifier (ResNet
with its head at `fc`, VisionTransformer with its head at `heads`) with these. Evaluation uses
bfcl.views.eval_transform.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.ops import StochasticDepth

from bfcl.optim import FAMILIES
from bfcl.schedules import learning_rate


@dataclass(frozen=True)
class FinetuneRecipe:
    """Every fine-tuning default in one place; the CLI overrides fields with dataclasses.replace."""

    name: str
    optimizer: str  # "sgd" | "adamw"
    base_lr: float  # the lr at a global batch of lr_batch; see scaled_lr
    lr_batch: int
    weight_decay: float
    momentum: float  # SGD only
    epochs: int
    warmup_epochs: int
    min_lr: float  # where the cosine ends
    label_smoothing: float
    mixup: float  # Beta(alpha, alpha); 0 = off
    cutmix: float  # Beta(alpha, alpha); 0 = off
    mix_switch_prob: float  # P(CutMix) when both are on
    randaugment: bool  # 2 ops, magnitude 9 of 10 (see train_transform)
    random_erasing: float  # probability; 0 = off
    drop_path: float  # stochastic depth rate of the last block (ViT only)
    layer_decay: float | None  # layer-wise lr decay (ViT only); None = off
    interpolation: str  # RandomResizedCrop's: "bilinear" | "bicubic"
    source: str
    nesterov: bool = False  # SGD only: Nesterov momentum (SimCLR's and BYOL's fine-tuning)

    def scaled_lr(self, global_batch: int) -> float:
        """The linear scaling rule: base_lr * global_batch / lr_batch."""
        return self.base_lr * global_batch / self.lr_batch


# torchvision references/classification/train.py: its defaults --opt sgd --lr 0.1 (for 8 GPUs x
# -b 32 = 256) --momentum 0.9 --wd 1e-4 --epochs 90, with the flags of its newer recipes
# --lr-scheduler cosineannealinglr --label-smoothing 0.1 --lr-warmup-method linear
# --lr-warmup-epochs 5 (--lr-min 0). Its warm-up starts at lr x --lr-warmup-decay 0.01; ours at 0.
# Crops are RandomResizedCrop + flip, bilinear (--interpolation default). No mixup, cutmix,
# auto-augment, random erasing or drop path (all off by default there).
RESNET_RECIPE = FinetuneRecipe(
    name="torchvision-resnet", optimizer="sgd", base_lr=0.1, lr_batch=256, weight_decay=1e-4,
    momentum=0.9, epochs=90, warmup_epochs=5, min_lr=0.0, label_smoothing=0.1, mixup=0.0,
    cutmix=0.0, mix_switch_prob=0.5, randaugment=False, random_erasing=0.0, drop_path=0.0,
    layer_decay=None, interpolation="bilinear",
    source="torchvision references/classification/train.py: sgd lr 0.1 (batch 256) momentum 0.9 "
           "wd 1e-4 90 epochs; cosineannealinglr, label-smoothing 0.1, 5 linear warm-up epochs",
)

# DeiT main.py defaults, which MoCo v3 fine-tunes with unchanged (MoCo v3 paper, appendix; 150
# epochs for ViT-B): --opt adamw --lr 5e-4 (scaled by batch/512) --weight-decay 0.05 --sched cosine
# --warmup-epochs 5 --min-lr 1e-5 --smoothing 0.1 --mixup 0.8 --cutmix 1.0 --mixup-prob 1.0
# --mixup-switch-prob 0.5 --aa rand-m9-mstd0.5-inc1 --reprob 0.25 --remode pixel --drop-path 0.1
# --train-interpolation bicubic. DeiT warms up from --warmup-lr 1e-6, ours from 0. DeiT has no
# layer-wise decay; MAE/BEiT use 0.65-0.75 (an option, off by default as in MoCo v3).
VIT_RECIPE = FinetuneRecipe(
    name="deit", optimizer="adamw", base_lr=5e-4, lr_batch=512, weight_decay=0.05,
    momentum=0.0, epochs=150, warmup_epochs=5, min_lr=1e-5, label_smoothing=0.1, mixup=0.8,
    cutmix=1.0, mix_switch_prob=0.5, randaugment=True, random_erasing=0.25, drop_path=0.1,
    layer_decay=None, interpolation="bicubic",
    source="DeiT main.py defaults (as used by MoCo v3): adamw lr 5e-4 (batch 512) wd 0.05 cosine "
           "warmup 5 min-lr 1e-5 smoothing 0.1 mixup 0.8 cutmix 1.0 rand-m9-mstd0.5 reprob 0.25 "
           "drop-path 0.1; 150 epochs (ViT-B, MoCo v3)",
)


# A pretrained ResNet with few labels (docs/finetune-recipes.md): SimCLR appendix B.5 fine-tunes
# its 1 % / 10 % subsets with SGD, Nesterov momentum 0.9, lr 0.05 x batch/256, no warm-up, no
# weight decay or other regulariser, random crop + flip only; SimCLRv2 §3 also drops warm-up and
# weight decay and uses 30 epochs at 10 % and 100 % (60 at 1 %); BYOL appendix C.1 likewise uses
# Nesterov SGD and sweeps lr in 0.005-0.1 at batch 1024. The from-scratch recipe's lr 0.1, wd 1e-4
# and smoothing erase what pretraining learnt on a small subset. base_lr 0.1, not SimCLR's 0.05: the
# best of 0.01, 0.03, 0.1 and 0.3 on 10 % of CIFAR-10 from a 15-minute bfcl backbone
# (`bench/downstream.py --sweep-lr`, docs/results.md#fine-tuning-lr-for-a-pretrained-start).
PRETRAINED_RESNET_RECIPE = FinetuneRecipe(
    name="simclr-semi-supervised", optimizer="sgd", base_lr=0.1, lr_batch=256, weight_decay=0.0,
    momentum=0.9, epochs=30, warmup_epochs=0, min_lr=0.0, label_smoothing=0.0, mixup=0.0,
    cutmix=0.0, mix_switch_prob=0.5, randaugment=False, random_erasing=0.0, drop_path=0.0,
    layer_decay=None, interpolation="bilinear", nesterov=True,
    source="SimCLR appendix B.5 / SimCLRv2 / BYOL appendix C.1 semi-supervised fine-tuning: sgd nesterov "
           "momentum 0.9, no warm-up, no weight decay, crop + flip, 30 epochs; lr 0.1 (batch 256) by bfcl's "
           "sweep (docs/finetune-recipes.md)",
)


def recipe_for(family: str, pretrained: bool = False) -> FinetuneRecipe:
    """VIT_RECIPE for "vit" (either start: MoCo v3 fine-tunes its ViTs with DeiT's recipe);
    for "resnet", PRETRAINED_RESNET_RECIPE from a pretrained start, else RESNET_RECIPE."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if family == "vit":
        return VIT_RECIPE
    return PRETRAINED_RESNET_RECIPE if pretrained else RESNET_RECIPE


def recipe_reason(family: str, pretrained: bool) -> str:
    """Why recipe_for(family, pretrained) is the default, for the start-up summary."""
    if family == "vit":
        return "a ViT: DeiT's recipe from either start, as MoCo v3 fine-tunes its ViTs"
    if pretrained:
        return ("a pretrained ResNet: the semi-supervised fine-tuning of SimCLR and BYOL (small lr, no weight "
                "decay, no warm-up, crop + flip); --random-init gets torchvision's from-scratch recipe")
    return ("a random-init ResNet: torchvision's from-scratch recipe; a --pretrained start gets "
            f"{PRETRAINED_RESNET_RECIPE.name}")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 to peak_lr, then half-cosine from peak_lr to min_lr at total_steps.

    schedules.learning_rate is the same curve ending at 0; the cosine part is lifted by min_lr
    (timm's CosineLRScheduler, which DeiT uses, ends at its lr_min the same way).
    """
    step = min(step, total_steps)
    if step < warmup_steps:
        return learning_rate(step, total_steps, warmup_steps, peak_lr)
    return min_lr + learning_rate(step, total_steps, warmup_steps, peak_lr - min_lr)


def add_drop_path(vit: VisionTransformer, rate: float) -> None:
    """Stochastic depth on both residual branches of every EncoderBlock, in place.

    Block i drops each sample's branch with p = linspace(0, rate, depth)[i] (DeiT/timm). In
    torchvision's EncoderBlock.forward the attention branch is `self.dropout(attn) + input` and
    the MLP branch `x + self.mlp(y)`, so StochasticDepth goes after `dropout` and at the end of
    `mlp` (an nn.Sequential). It has no parameters: state_dict keys do not change. Calling this
    again sets the new rates. In eval mode it is the identity.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop path rate must be in [0, 1], got {rate}")
    blocks = list(vit.encoder.layers)
    for block, p in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
        if isinstance(block.mlp[-1], StochasticDepth):  # added before: update the rates
            block.dropout[-1].p = block.mlp[-1].p = p
        else:
            block.dropout = nn.Sequential(block.dropout, StochasticDepth(p, mode="row"))
            block.mlp.append(StochasticDepth(p, mode="row"))


class MixupCutmix:
    """Mixup or CutMix on every batch (DeiT's --mixup-prob 1.0), CutMix with P = switch_prob.

    __call__(images [N, 3, H, W] float, labels [N] long) -> (images [N, 3, H, W], targets [N, K]).
    torchvision's v2.MixUp / v2.CutMix pair sample i with sample i - 1 (a roll; timm pairs i with
    N - 1 - i), so the batch must be shuffled. Row i of the targets is
    lam * onehot(y_i) + (1 - lam) * onehot(y_{i-1}); CutMix's lam is the uncut area of the box it
    actually pasted. All draws use torch's global CPU generator, so seeding it repeats the batch;
    images and labels may live on any device. Both alphas 0: images unchanged, one-hot targets.
    Label smoothing is left to soft_target_cross_entropy.
    """

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5):
        self.num_classes = num_classes
        mixup = T2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        cutmix = T2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None
        if mixup is not None and cutmix is not None:
            self.mix = T2.RandomChoice([mixup, cutmix], p=[1.0 - switch_prob, switch_prob])
        else:
            self.mix = mixup if mixup is not None else cutmix  # None when both are off

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is None:
            return images, F.one_hot(labels, self.num_classes).float()
        return self.mix(images, labels)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                              label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with label smoothing: logits [N, K], targets [N] (classes) or [N, K] (mixed).

    Soft targets are smoothed as t * (1 - s) + s / K, then the loss is -(t * log_softmax).sum(1)
    averaged over rows. This is what DeiT computes: timm's Mixup builds its targets from
    one-hot rows smoothed to (1 - s + s/K, s/K) before mixing, and since mixing is linear and rows
    sum to 1, smoothing before or after mixing gives the same targets. Hard labels use
    F.cross_entropy(label_smoothing=s), the same formula with one-hot targets.
    """
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[1]
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def train_transform(recipe: FinetuneRecipe, image_size: int, mean, std) -> T.Compose:
    """PIL image -> [3, image_size, image_size]: RandomResizedCrop (scale 0.08-1) + flip
    [+ RandAugment] + ToTensor + Normalize [+ RandomErasing].

    RandAugment against timm's rand-m9-mstd0.5-inc1 (DeiT): torchvision spreads magnitudes over
    num_magnitude_bins - 1 steps (default 31 bins, so m9 would be 30% strength), timm over 10;
    11 bins make m9 mean 90% of each op's range as in timm (rotate 27°, shear 0.27, enhance
    ±0.81). Still different: no magnitude noise (mstd 0.5), every chosen op is applied (timm
    applies each with p 0.5), no Invert/SolarizeAdd but an Identity op, and Posterize keeps
    8-4 bits (timm's increasing one 4-0). The fill is the mean colour, as timm's img_mean.
    RandomErasing uses per-pixel normal noise on the normalized image (timm's --remode pixel).
    """
    interpolation = T.InterpolationMode(recipe.interpolation)
    steps = [T.RandomResizedCrop(image_size, interpolation=interpolation), T.RandomHorizontalFlip()]
    if recipe.randaugment:
        fill = [round(255 * m) for m in mean]
        steps.append(T.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11,
                                   interpolation=interpolation, fill=fill))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if recipe.random_erasing > 0:
        steps.append(T.RandomErasing(p=recipe.random_erasing, value="random"))
    return T.Compose(steps)
