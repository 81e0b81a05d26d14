"""MoCo v3 for ResNets and ViTs (Chen, Xie, He, ICCV 2021), with an optional BatchFormer.

Names follow the paper and its code: `base_encoder` (backbone + projector, trained by
gradients), `momentum_encoder` (its moving average), `predictor` (base side only), `q`, `k`, `m`.
The ViT backbone itself (torchvision's VisionTransformer with MoCo v3's init, sin-cos position
embedding and frozen patch projection) is built in bfcl/vit.py.
"""

import copy

import torch
import torchvision
from torch import nn

from bfcl.batchformer import BatchFormer

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")
VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")  # bfcl.vit.VIT_SIZES
ARCHS = RESNET_ARCHS + VIT_ARCHS
STEMS = ("imagenet", "small")


def is_vit(arch: str) -> bool:
    return arch in VIT_ARCHS


def uses_channels_last(arch: str) -> bool:
    """NHWC activations for ResNets in every precision and on every device: cuDNN's and oneDNN's
    convolutions are fastest in it (ResNet-18, 32 px: bf16 on a CPU core 12 % faster; fp32 on 2
    AVX2 cores 22 % faster, bench/speed.py --only compile). A ViT has one convolution, the patch
    projection: nothing to gain."""
    return not is_vit(arch)


def build_backbone(arch: str, stem: str = "imagenet", image_size: int = 224, patch_size: int = 16,
                   stop_grad_conv1: bool = True) -> nn.Module:
    """A backbone whose classifier is the identity: images [N, 3, H, W] -> features [N, C].

    ViTs (bfcl.vit.build_vit): the cls token after the final norm, C = width; image_size and
    patch_size fix the token grid (torchvision asserts the input size), and stop_grad_conv1
    freezes the patch projection. stem applies to ResNets only.

    C is 512 for resnet18/34 and 2048 for resnet50. zero_init_residual=True as in MoCo v3.
    stem="small" replaces the 7x7/2 conv and max-pool with a 3x3/1 conv for 32-96 px images
    (the usual CIFAR adaptation); it changes conv1's shape, so probes must use the same stem.
    Key names stay torchvision's, so an export loads into torchvision.models.<arch>().
    """
    if is_vit(arch):
        from bfcl.vit import build_vit  # torchvision's ViT module is only imported when needed

        return build_vit(arch, image_size, patch_size, stop_grad_conv1)
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


def mlp(in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool, num_layers: int = 2) -> nn.Sequential:
    """[N, in] -> [N, out]: (Linear(no bias) -> BN -> ReLU) x (num_layers - 1) -> Linear(no bias)
    [-> BN(affine=False)], as MoCo v3's _build_mlp."""
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Backbone followed by the projector (2 layers for ResNets, 3 for ViTs, both ending in
    BN without affine, as MoCo v3). BatchFormer, when on, runs between the two."""

    def __init__(self, arch: str, stem: str, dim: int, mlp_dim: int, **vit_options):
        super().__init__()
        self.backbone = build_backbone(arch, stem, **vit_options)
        self.projector = mlp(self.backbone.feature_dim, mlp_dim, dim, last_bn=True, num_layers=3 if is_vit(arch) else 2)


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
        image_size: int = 224,
        patch_size: int = 16,
        stop_grad_conv1: bool = True,
    ):
        super().__init__()
        vit_options = dict(image_size=image_size, patch_size=patch_size, stop_grad_conv1=stop_grad_conv1)
        self.base_encoder = Encoder(arch, stem, dim, mlp_dim, **vit_options)
        # MoCo v3: the ResNet predictor has no final BN, the ViT one has (affine=False)
        self.predictor = mlp(dim, mlp_dim, dim, last_bn=is_vit(arch))
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        self.momentum_encoder.requires_grad_(False)
        self.batchformer = BatchFormer(self.base_encoder.backbone.feature_dim) if batchformer else None
        if self.batchformer is not None:
            self.batchformer.requires_grad_(bf_trainable)

    def _embed(self, encoder: Encoder, x: torch.Tensor, batchformer: bool, context) -> torch.Tensor:
        """[N, 3, H, W] -> [N, dim], or [2N, dim] through BatchFormer in training.

        The projector sees plain and BatchFormer rows in one pass, so its BatchNorm statistics
        cover both (the paper's shared head).
        """
        features = encoder.backbone(x)
        if batchformer and self.batchformer is not None:
            features = self.batchformer(features, context)
        return encoder.projector(features)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, batchformer: bool = True, context=None):
        """batchformer=False skips BatchFormer for this step (train.py --bf-start-epoch); context
        is BatchFormer's (None: the local batch; see BatchFormer.forward)."""
        q1 = self.predictor(self._embed(self.base_encoder, x1, batchformer, context))
        q2 = self.predictor(self._embed(self.base_encoder, x2, batchformer, context))
        with torch.no_grad():  # BatchFormer draws its own dropout sample here
            k1 = self._embed(self.momentum_encoder, x1, batchformer, context)
            k2 = self._embed(self.momentum_encoder, x2, batchformer, context)
        return q1, q2, k1, k2

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """θ_k <- m·θ_k + (1 - m)·θ_q for parameters only; BN buffers keep their own statistics.

        Frozen base tensors (a ViT's patch projection and position embedding) are skipped: both
        copies hold the same values, and m·θ + (1 - m)·θ would only add rounding to them.
        """
        pairs = [(q, k) for q, k in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters())
                 if q.requires_grad]
        base, momentum = [q for q, _ in pairs], [k for _, k in pairs]
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, base, alpha=1.0 - m)


def training_memory(arch: str, stem: str, dim: int, mlp_dim: int, **moco_options) -> tuple[int, int]:
    """(parameters, bytes) of a MoCo model in training, counted on the meta device without allocating:
    fp32 weights of all parameters, plus a gradient and an optimizer momentum for each trained one
    (LARS and SGD keep one buffer; AdamW would keep two). Activations are not counted."""
    with torch.device("meta"):
        model = MoCo(arch, stem, dim, mlp_dim, **moco_options)
    parameters = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return parameters, 4 * (parameters + 2 * trained)
