"""LARS (You et al., 2017) as MoCo v3 uses it for ResNets."""

import torch


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
