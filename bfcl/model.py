"""MoCo v3 for ResNets (Chen, Xie, He, ICCV 2021), with an optional BatchFormer.

Names follow the paper and its code: `base_encoder` (backbone + projector, trained by
gradients), `momentum_encoder` (its moving average), `predictor` (base side only), `q`, `k`, `m`.
"""

import copy

import torch
import torchvision
from torch import nn

from bfcl.batchformer import BatchFormer

ARCHS = ("resnet18", "resnet34", "resnet50")
STEMS = ("imagenet", "small")


def build_backbone(arch: str, stem: str = "imagenet") -> nn.Module:
    """A torchvision ResNet whose `fc` is the identity: images [N, 3, H, W] -> features [N, C].

    C is 512 for resnet18/34 and 2048 for resnet50. zero_init_residual=True as in MoCo v3.
    stem="small" replaces the 7x7/2 conv and max-pool with a 3x3/1 conv for 32-96 px images
    (the usual CIFAR adaptation); it changes conv1's shape, so probes must use the same stem.
    Key names stay torchvision's, so an export loads into torchvision.models.<arch>().
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    backbone = getattr(torchvision.models, arch)(zero_init_residual=True)
    if stem == "small":
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    backbone.feature_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return backbone


def mlp(in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """Linear(no bias) -> BN -> ReLU -> Linear(no bias) [-> BN(affine=False)]: [N, in] -> [N, out]."""
    layers = [
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    ]
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Backbone followed by the projector. BatchFormer, when on, runs between the two."""

    def __init__(self, arch: str, stem: str, dim: int, mlp_dim: int):
        super().__init__()
        self.backbone = build_backbone(arch, stem)
        self.projector = mlp(self.backbone.feature_dim, mlp_dim, dim, last_bn=True)


class MoCo(nn.Module):
    """Base encoder + predictor, momentum encoder, and the optional BatchFormer.

    forward(x1, x2) with views [N, 3, H, W] returns q1, q2 (with gradient) and k1, k2 (without),
    each [N, dim], or [2N, dim] with BatchFormer in training ([plain ; BatchFormer] rows).

    BatchFormer is ONE module used by both encoders, on each view separately. The released
    code made it part of both encoders, so freezing the momentum encoder froze it too: its
    weights stayed at their random init while gradients still flowed through it into the
    backbone. That produced the published numbers and is the default here
    (bf_trainable=False). It is kept outside both encoders so that this is explicit, it is
    stored once in checkpoints, and the momentum update never touches it.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        stem: str = "imagenet",
        dim: int = 256,
        mlp_dim: int = 4096,
        batchformer: bool = False,
        bf_trainable: bool = False,
    ):
        super().__init__()
        self.base_encoder = Encoder(arch, stem, dim, mlp_dim)
        self.predictor = mlp(dim, mlp_dim, dim, last_bn=False)  # no final BN for ResNets
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        self.momentum_encoder.requires_grad_(False)
        self.batchformer = BatchFormer(self.base_encoder.backbone.feature_dim) if batchformer else None
        if self.batchformer is not None:
            self.batchformer.requires_grad_(bf_trainable)

    def _embed(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, dim], or [2N, dim] through BatchFormer in training.

        The projector sees plain and BatchFormer rows in one pass, so its BatchNorm statistics
        cover both (the paper's shared head).
        """
        features = encoder.backbone(x)
        if self.batchformer is not None:
            features = self.batchformer(features)
        return encoder.projector(features)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        q1 = self.predictor(self._embed(self.base_encoder, x1))
        q2 = self.predictor(self._embed(self.base_encoder, x2))
        with torch.no_grad():  # BatchFormer draws its own dropout sample here
            k1 = self._embed(self.momentum_encoder, x1)
            k2 = self._embed(self.momentum_encoder, x2)
        return q1, q2, k1, k2

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """θ_k <- m·θ_k + (1 - m)·θ_q for parameters only; BN buffers keep their own statistics."""
        base = list(self.base_encoder.parameters())
        momentum = list(self.momentum_encoder.parameters())
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, base, alpha=1.0 - m)
