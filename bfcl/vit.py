"""Vision Transformers as MoCo v3 builds them (Chen, Xie, He, ICCV 2021, §4 and its `vits.py`).

The model is torchvision's `VisionTransformer` (so exported weights load into torchvision), given
MoCo v3's fixed 2-D sin-cos position embedding, its initialisation and its frozen patch projection
(docs/method.md#vit-recipe). `timm_to_torchvision` renames the timm keys of the original checkpoints.

torchvision's defaults already match MoCo v3's architecture (timm's ViT with qkv_bias=True):
LayerNorm eps 1e-6, biases on every Linear, exact GELU, dropout 0, pre-norm blocks, the cls token
after the final norm. Its initialisation does not match and is redone in `_init_moco_v3`.
"""

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

# (width, depth, heads); MLP width is 4 x width. MoCo v3's ViT-Small has 12 heads (DeiT's has 6).
# ViT-Tiny is not in MoCo v3: it is ours, for small images and CPUs.
VIT_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 12), "vit_base": (768, 12, 12)}


def sincos_pos_embedding(grid_size: int, dim: int) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos embedding, temperature 1e4: [1, 1 + grid_size², dim].

    Row 0 (the cls token) is zeros. Rows follow meshgrid(w, h, indexing='ij') flattened, so the
    slow index is the one MoCo v3 calls "w" and it fills the first dim/2 channels; torchvision
    flattens patches row-major, so those channels end up encoding the patch row. Reproduced as
    written rather than "fixed", so original checkpoints see the embedding they were trained with.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    pos_dim = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)  # [dim/4]
    coords = torch.arange(grid_size, dtype=torch.float32)
    gw, gh = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each
    out_w = torch.outer(gw.flatten(), omega)  # [G², dim/4]
    out_h = torch.outer(gh.flatten(), omega)
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)  # [G², dim]
    cls = torch.zeros(1, dim)
    return torch.cat([cls, emb], dim=0).unsqueeze(0)


def _init_moco_v3(vit: VisionTransformer) -> None:
    """Redo torchvision's init the way MoCo v3's `vits.py` does (docs/method.md#vit-recipe).

    torchvision draws in_proj as one [3D, D] xavier matrix (bound sqrt(6/4D)), out_proj with
    PyTorch's default Linear init, MLP biases N(0, 1e-6), a learned pos embedding N(0, 0.02),
    a zero cls token and a truncated-normal patch projection; none of that is MoCo v3's.
    """
    width = vit.hidden_dim
    for module in vit.modules():
        if isinstance(module, nn.Linear):  # MLP fc1/fc2 and attention out_proj
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            # q, k, v as three separate D x D matrices: bound sqrt(6 / (out/3 + in)).
            bound = math.sqrt(6.0 / (width + width))
            nn.init.uniform_(module.in_proj_weight, -bound, bound)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(vit.class_token, std=1e-6)
    conv = vit.conv_proj
    bound = math.sqrt(6.0 / (3 * conv.kernel_size[0] * conv.kernel_size[1] + width))
    nn.init.uniform_(conv.weight, -bound, bound)
    nn.init.zeros_(conv.bias)


def resample_pos_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """A position embedding [1, 1 + G², D] for a grid x grid token grid: the cls row as it is, the
    G x G patch rows resized bicubically (align_corners=False), as DINO's interpolate_pos_encoding
    does for its local crops: a patch keeps its RELATIVE place in the crop, so a local crop reads
    as a whole image at a lower resolution (docs/multicrop.md#vit). Rows are patches row-major,
    as torchvision's tokens; the grid G itself is returned unchanged."""
    old = math.isqrt(pos.shape[1] - 1)
    if grid == old:
        return pos
    patches = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, D, G, G]
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


class MoCoViT(VisionTransformer):
    """torchvision's VisionTransformer that also takes square inputs of another size, a multiple
    of the patch (train.py --local-crops with a ViT): their token grid gets the position
    embedding resampled to it (resample_pos_embedding). At image_size, exactly torchvision's
    forward; the state dict is torchvision's, so exports load into VisionTransformer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h == w == self.image_size:
            return super().forward(x)
        if h != w or h % self.patch_size:
            raise ValueError(f"a ViT with {self.patch_size} px patches takes square inputs of a multiple of "
                             f"{self.patch_size} px, got {h} x {w}")
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)  # [n, g², D], patches row-major
        tokens = torch.cat([self.class_token.expand(n, -1, -1), tokens], dim=1)
        encoder = self.encoder
        tokens = tokens + resample_pos_embedding(encoder.pos_embedding, h // self.patch_size)
        tokens = encoder.ln(encoder.layers(encoder.dropout(tokens)))
        return self.heads(tokens[:, 0])


def build_vit(
    arch: str, image_size: int = 224, patch_size: int = 16, stop_grad_conv1: bool = True
) -> VisionTransformer:
    """A MoCo v3 ViT on torchvision's class: images [N, 3, S, S] -> cls features [N, width].

    S is image_size, or another multiple of the patch (local crops, MoCoViT). `heads` is the identity, so
    the output is the cls token after the final LayerNorm; `feature_dim` is the width.
    The position embedding is a frozen Parameter (requires_grad False) holding
    `sincos_pos_embedding`; stop_grad_conv1 freezes the patch projection at its random init
    (MoCo v3's --stop-grad-conv1, which the paper found stabilises training, §4.2).
    Attention: torchvision calls nn.MultiheadAttention with need_weights=False, which in torch 2.14
    runs F.scaled_dot_product_attention (the native fast path in grad-free inference).
    """
    if arch not in VIT_SIZES:
        raise ValueError(f"unknown ViT arch {arch!r}; choose one of {', '.join(VIT_SIZES)}")
    if image_size % patch_size != 0:
        raise ValueError(
            f"image size {image_size} is not divisible by patch size {patch_size}; "
            f"use a multiple of it such as {image_size // patch_size * patch_size or patch_size}"
        )
    width, depth, heads = VIT_SIZES[arch]
    vit = MoCoViT(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=depth,
        num_heads=heads,
        hidden_dim=width,
        mlp_dim=4 * width,
    )
    vit.heads = nn.Identity()
    _init_moco_v3(vit)
    grid = image_size // patch_size
    vit.encoder.pos_embedding = nn.Parameter(sincos_pos_embedding(grid, width), requires_grad=False)
    vit.conv_proj.requires_grad_(not stop_grad_conv1)
    vit.arch = arch
    vit.feature_dim = width
    return vit


# timm (MoCo v3 checkpoints) -> torchvision key names. Block keys are relative to blocks.N /
# encoder.layers.encoder_layer_N; both hold qkv as one [3D, D] matrix in q, k, v order.
_TOP_KEYS = {
    "cls_token": "class_token",
    "pos_embed": "encoder.pos_embedding",
    "patch_embed.proj.weight": "conv_proj.weight",
    "patch_embed.proj.bias": "conv_proj.bias",
    "norm.weight": "encoder.ln.weight",
    "norm.bias": "encoder.ln.bias",
}
_BLOCK_KEYS = {
    "norm1": "ln_1",
    "attn.qkv.weight": "self_attention.in_proj_weight",
    "attn.qkv.bias": "self_attention.in_proj_bias",
    "attn.proj": "self_attention.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.3",
}
_DROPPED = ("head.", "fc.", "momentum_encoder.", "predictor.")  # projector / classifier / other nets
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _strip_prefixes(key: str) -> str:
    """'module.base_encoder.blocks.0...' -> 'blocks.0...' (MoCo v3 .pth.tar or DDP-saved keys)."""
    for prefix in ("module.", "base_encoder."):
        key = key.removeprefix(prefix)
    return key


def is_timm_vit_state(state: dict) -> bool:
    """True when the keys are timm's ViT names (with or without MoCo v3's prefixes)."""
    return any(_strip_prefixes(k) == "patch_embed.proj.weight" for k in state)


def _torchvision_key(key: str) -> str:
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    match = _BLOCK.fullmatch(key)
    if match:
        index, rest = match.groups()
        for old, new in _BLOCK_KEYS.items():
            if rest == old or rest.startswith(old + "."):
                return f"encoder.layers.encoder_layer_{index}.{new}{rest[len(old):]}"
    raise ValueError(f"unexpected key {key!r} in a timm ViT state dict; it has no torchvision name")


def timm_to_torchvision(state: dict) -> dict:
    """Rename a timm / MoCo v3 ViT state dict to torchvision's `VisionTransformer` keys.

    Tensors are passed through unchanged (cls [1, 1, D], pos [1, 1 + G², D], qkv [3D, D] keep
    their shapes). `module.` and `base_encoder.` prefixes are stripped; the projector or classifier
    (`head.*`, `fc.*`), `momentum_encoder.*` and `predictor.*` are dropped. Any other unknown key
    raises ValueError naming it.
    """
    out = {}
    for key, tensor in state.items():
        key = _strip_prefixes(key)
        if key.startswith(_DROPPED):
            continue
        out[_torchvision_key(key)] = tensor
    return out


def vit_config_from_state(state: dict) -> dict:
    """build_vit's arguments read off a torchvision-keyed ViT state dict.

    Width and patch come from conv_proj.weight [D, 3, p, p], the grid from
    encoder.pos_embedding [1, 1 + G², D], depth from the encoder_layer_N keys. Heads cannot be
    read off the tensors; width and depth identify our sizes.
    """
    if "conv_proj.weight" not in state or "encoder.pos_embedding" not in state:
        raise ValueError(
            "not a torchvision ViT state dict (no conv_proj.weight / encoder.pos_embedding); "
            "convert timm keys with timm_to_torchvision first"
        )
    width, _, patch_size, _ = state["conv_proj.weight"].shape
    tokens = state["encoder.pos_embedding"].shape[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"position embedding has {tokens} patch tokens, not a square grid")
    layers = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.")
    depth = len({m.group(1) for k in state if (m := layers.match(k))})
    for arch, (arch_width, arch_depth, _) in VIT_SIZES.items():
        if (arch_width, arch_depth) == (width, depth):
            return dict(arch=arch, patch_size=patch_size, image_size=grid * patch_size)
    raise ValueError(
        f"no ViT size has width {width} and depth {depth}; known: "
        + ", ".join(f"{a} {w}x{d}" for a, (w, d, _) in VIT_SIZES.items())
    )
