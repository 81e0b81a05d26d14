"""The pretraining optimizers: LARS for ResNets, AdamW for ViTs (MoCo v3's choices), and the
parameter groups that pretraining and fine-tuning both take.

`param_groups` puts BatchFormer's weights, when they are trained, in groups of their own so
that they can run at --bf-lr-scale times the lr; it finds them through `model.batchformer`,
the module, never through a name filter.
"""

import torch
from torch import nn

OPTIMIZERS = ("lars", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum, weight decay and a layer-wise trust ratio.

    For a tensor p with ndim > 1:  g <- g + wd·p;  g <- g · (η·‖p‖/‖g‖) (factor 1 if a norm is 0).
    Tensors with ndim <= 1 (BN weights and biases) get neither decay nor trust scaling.
    Then μ <- momentum·μ + g;  p <- p - lr·μ.  η is the trust coefficient (0.001).
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(g)
                    # where() instead of an `if` keeps the step free of host synchronisation
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    g = g.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(g)
                p.add_(mu, alpha=-group["lr"])
        return loss


FAMILIES = ("resnet", "vit")


def param_groups(model: nn.Module, family: str | None = None, weight_decay: float | None = None,
                 layer_decay: float | None = None, batchformer: nn.Module | None = None,
                 bf_lr_scale: float = 1.0) -> tuple[list[dict], list[str]]:
    """Optimizer groups of the trainable tensors, and their names in the optimizer's order: one
    function for pretraining (train.py) and fine-tuning (bfcl/finetune.py), with or without
    BatchFormer. Frozen tensors (the momentum encoder, a frozen BatchFormer, a ViT's patch
    projection under --stop-grad-conv1) are left out, so weight decay never touches them.

    Each group is {"params", "weight_decay" (left out when weight_decay is None: the optimizer's
    own), "lr_scale"}; the caller sets group["lr"] = lr * group["lr_scale"] every step, and
    names[i] is the parameter the optimizer's state_dict calls i (checkpoints use them).

    family "vit": no weight decay for biases and norm weights (ndim <= 1), class_token and
    encoder.pos_embedding (timm's param_groups_weight_decay with DeiT's no_weight_decay()).
    Otherwise (ResNets, pretraining) weight decay on every tensor, as torchvision's reference.
    layer_decay (ViT only): lr_scale = layer_decay ** (depth + 1 - layer id), so the head keeps
    the full lr and the patch embedding gets layer_decay ** (depth + 1) (BEiT, MAE).
    batchformer (default: model.batchformer if any): its tensors come last, named
    "batchformer.<name>", in groups of their own at bf_lr_scale, never merged with the model's;
    found through the module, never through a name filter.
    Within each part, groups with equal (weight_decay, lr_scale) merge, in order of first appearance.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if layer_decay is not None and family != "vit":
        raise ValueError(f"layer_decay={layer_decay} needs a ViT; pass None for a {family}")
    if batchformer is None:
        batchformer = getattr(model, "batchformer", None)
    no_decay_names = {"class_token", "encoder.pos_embedding"} if family == "vit" else set()
    depth = len(model.encoder.layers) if layer_decay is not None else 0

    def decay(name: str, p: torch.Tensor) -> float | None:
        return 0.0 if family == "vit" and (p.ndim <= 1 or name in no_decay_names) else weight_decay

    bf_ids = {id(p) for p in batchformer.parameters()} if batchformer is not None else set()
    main = [(n, p, decay(n, p), 1.0 if layer_decay is None else layer_decay ** (depth + 1 - _vit_layer_id(n, depth)))
            for n, p in model.named_parameters() if p.requires_grad and id(p) not in bf_ids]
    bf = [(f"batchformer.{n}", p, decay(f"batchformer.{n}", p), bf_lr_scale)
          for n, p in (batchformer.named_parameters() if batchformer is not None else ()) if p.requires_grad]
    groups, names = [], []
    for part in (main, bf):
        merged: dict[tuple, tuple[list, list]] = {}  # dicts keep insertion order
        for name, p, wd, scale in part:
            params, part_names = merged.setdefault((wd, scale), ([], []))
            params.append(p)
            part_names.append(name)
        for (wd, scale), (params, part_names) in merged.items():
            groups.append({"params": params, "lr_scale": scale} if wd is None else
                          {"params": params, "weight_decay": wd, "lr_scale": scale})
            names += part_names
    return groups, names


def _vit_layer_id(name: str, depth: int) -> int:
    """0 for the patch embedding, class token and position embedding; i + 1 for encoder_layer_i;
    depth + 1 for the final norm and the head (BEiT/MAE's layer ids for layer-wise decay)."""
    if name.startswith(("conv_proj.", "class_token", "encoder.pos_embedding")):
        return 0
    if name.startswith("encoder.layers.encoder_layer_"):
        return int(name.split(".")[2].removeprefix("encoder_layer_")) + 1
    if name.startswith(("encoder.ln.", "heads.")):
        return depth + 1
    raise ValueError(f"no layer id for {name!r}: expected torchvision VisionTransformer names")


def build_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """LARS (momentum 0.9, trust 0.001; MoCo v3's ResNet choice) or AdamW (its ViT choice,
    default betas, decay on every tensor as in MoCo v3's main_moco.py)."""
    if name == "lars":
        return LARS(groups, weight_decay=weight_decay, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
