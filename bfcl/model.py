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
# What BatchFormer sees with several views (train.py --bf-views, docs/multicrop.md#batchformer):
# each view's rows as their own sequence (as released), or all views' rows as one sequence.
PER_VIEW, JOINT_VIEWS = "per-view", "joint"
BF_VIEWS = (PER_VIEW, JOINT_VIEWS)


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


def layer4_input_side(image_size: int, stem: str) -> int:
    """The side of the map a torchvision ResNet's layer4 gets from a square input: stride 2 in conv1
    and the max-pool (ImageNet stem only), then in layer2 and layer3, each ceil(side / 2)."""
    side = image_size if stem == "small" else (image_size - 1) // 2 + 1
    if stem != "small":
        side = (side - 1) // 2 + 1
    for _ in range(2):
        side = (side - 1) // 2 + 1
    return side


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

    forward(..., more_views, local_views) and forward_views: multi-crop (docs/multicrop.md#model).

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

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, batchformer: bool = True, context=None,
                more_views: tuple = (), local_views: torch.Tensor | None = None, bf_views: str = PER_VIEW):
        """batchformer=False skips BatchFormer for this step (train.py --bf-start-epoch); context
        is BatchFormer's (None: the local batch; see BatchFormer.forward).

        With no more_views, no local_views and bf_views per-view: MoCo v3's two views, (q1, q2, k1, k2).
        Otherwise multi-crop (forward_views): (queries of the global views, queries of the local
        views, keys of the global views), three lists."""
        if more_views or local_views is not None or bf_views != PER_VIEW:
            return self.forward_views([x1, x2, *more_views], local_views, batchformer, context, bf_views)
        q1 = self.predictor(self._embed(self.base_encoder, x1, batchformer, context))
        q2 = self.predictor(self._embed(self.base_encoder, x2, batchformer, context))
        with torch.no_grad():  # BatchFormer draws its own dropout sample here
            k1 = self._embed(self.momentum_encoder, x1, batchformer, context)
            k2 = self._embed(self.momentum_encoder, x2, batchformer, context)
        return q1, q2, k1, k2

    def _batchformer_groups(self, groups: list[torch.Tensor], context, bf_views: str) -> list[torch.Tensor]:
        """Features [B_i, C] of each view group -> [2B_i, C] = [plain ; BatchFormer] rows each.
        per-view: one BatchFormer sequence per group, as released for each view; joint: one
        sequence of all the groups' rows (docs/multicrop.md#batchformer)."""
        if bf_views not in BF_VIEWS:
            raise ValueError(f"unknown bf_views {bf_views!r}; choose one of {', '.join(BF_VIEWS)}")
        if bf_views == PER_VIEW or not self.batchformer.training:  # eval: BatchFormer is the identity
            return [self.batchformer(f, context) for f in groups]
        sizes = [f.shape[0] for f in groups]
        mixed = self.batchformer(torch.cat(groups), context)[sum(sizes):].split(sizes)
        return [torch.cat([f, m]) for f, m in zip(groups, mixed)]

    def _heads(self, encoder: Encoder, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """The projector once on all rows given (one tensor per view group, each [plain ; BatchFormer]
        rows): the shared-head rule, for every group together."""
        sizes = [r.shape[0] for r in rows]
        return list(encoder.projector(torch.cat(rows) if len(rows) > 1 else rows[0]).split(sizes))

    def forward_views(self, global_views: list[torch.Tensor], local_views: torch.Tensor | None = None,
                      batchformer: bool = True, context=None, bf_views: str = PER_VIEW):
        """Multi-crop (docs/multicrop.md): global views, each [B, 3, S, S], and local views
        [L·B, 3, s, s] (view-major), or None.

        Base side: each global view through backbone, BatchFormer and heads as forward() does one;
        the local views through the backbone in ONE pass (same-size crops batched, as DINO's
        multi-crop wrapper), BatchFormer on each local view's B rows (per-view) or on all views'
        rows together (joint), then projector and predictor in one pass over every local row,
        plain and BatchFormer rows alike (the shared heads). Momentum side: the global views only;
        it never sees a local view.

        Returns (q_global [V], q_local [L], k_global [V]): lists of [B, dim] tensors, [2B, dim]
        ([plain ; BatchFormer] rows) with BatchFormer in training.
        """
        b = global_views[0].shape[0]
        bf = batchformer and self.batchformer is not None

        def embed(encoder: Encoder, views: list[torch.Tensor], local: torch.Tensor | None):
            globals_ = [encoder.backbone(x) for x in views]
            locals_ = list(encoder.backbone(local).split(b)) if local is not None else []
            rows = self._batchformer_groups(globals_ + locals_, context, bf_views) if bf else globals_ + locals_
            g = [encoder.projector(r) for r in rows[:len(views)]]  # each global view its own pass, as forward()
            return g, (self._heads(encoder, rows[len(views):]) if locals_ else [])

        q_global, local_embeddings = embed(self.base_encoder, global_views, local_views)
        q_global = [self.predictor(z) for z in q_global]
        q_local = []
        if local_embeddings:
            sizes = [z.shape[0] for z in local_embeddings]
            q_local = list(self.predictor(torch.cat(local_embeddings)).split(sizes))
        with torch.no_grad():  # BatchFormer draws its own dropout sample here
            k_global, _ = embed(self.momentum_encoder, global_views, None)
        return q_global, q_local, k_global

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
