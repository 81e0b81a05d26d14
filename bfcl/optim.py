"""The pretraining optimizers: LARS for ResNets, AdamW for ViTs (MoCo v3's choices), and the
parameter groups both take.

`param_groups` puts BatchFormer's weights, when they are trained, in a group of their own so
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


def param_groups(model: nn.Module, bf_lr_scale: float = 1.0) -> tuple[list[dict], list[str]]:
    """Trainable parameters in one group (lr_scale 1), plus one for a trainable BatchFormer
    (lr_scale bf_lr_scale); and the parameter names in optimizer order, which the checkpoint
    uses to name optimizer state. The caller sets group["lr"] = lr * group["lr_scale"] each step.

    Frozen tensors (the momentum encoder, a frozen BatchFormer, a ViT's patch projection under
    --stop-grad-conv1) are left out, so weight decay never touches them.
    """
    batchformer = getattr(model, "batchformer", None)
    bf_ids = {id(p) for p in batchformer.parameters()} if batchformer is not None else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    main = [(n, p) for n, p in named if id(p) not in bf_ids]
    bf = [(n, p) for n, p in named if id(p) in bf_ids]
    groups = [{"params": [p for _, p in main], "lr_scale": 1.0}]
    if bf:
        groups.append({"params": [p for _, p in bf], "lr_scale": bf_lr_scale})
    return groups, [n for n, _ in main + bf]


def build_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """LARS (momentum 0.9, trust 0.001; MoCo v3's ResNet choice) or AdamW (its ViT choice,
    default betas, decay on every tensor as in MoCo v3's main_moco.py)."""
    if name == "lars":
        return LARS(groups, weight_decay=weight_decay, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
