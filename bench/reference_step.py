"""The bare MoCo v3 step the benchmarks compare train.py against, on views already in memory.

Same model, optimizer and math as train.py's step: lr set on every group, BatchFormer's dropout
seed, both views through the base and momentum encoders, gathered keys (one process: the keys
themselves), loss, backward, LARS step, momentum update. Nothing else: no data loading, no
logging, no checkpoints, no reading of the loss.
"""

import time

import torch
from accelerate.utils import set_seed

from bfcl.batchformer import dropout_seed
from bfcl.loss import moco_loss
from bfcl.model import MoCo, is_vit, uses_channels_last
from bfcl.optim import build_optimizer, param_groups

PHASES = ("forward", "backward", "optimizer", "momentum update")


def build(arch: str, stem: str, mlp_dim: int, bf_loss: str | None, device: torch.device, seed: int = 0,
          image_size: int = 224, patch_size: int = 16):
    """MoCo + its recipe's optimizer (LARS for ResNets, AdamW for ViTs), built as train.py builds
    them: same seeding, parameter groups and memory format. Returns (model, optimizer)."""
    set_seed(seed)
    model = MoCo(arch, stem, 256, mlp_dim, batchformer=bf_loss is not None, image_size=image_size,
                 patch_size=patch_size).to(device)
    if uses_channels_last(arch):
        model = model.to(memory_format=torch.channels_last)
    groups, _ = param_groups(model)
    optimizer = build_optimizer("adamw" if is_vit(arch) else "lars", groups, 0.1 if is_vit(arch) else 1e-6)
    return model, optimizer


def make_views(batch: int, size: int, device: torch.device, seed: int = 0, arch: str = "resnet18"):
    """Two random normalised views [batch, 3, size, size], in train.py's memory format."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if uses_channels_last(arch) else torch.contiguous_format
    return tuple(torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=fmt) for _ in range(2))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(model, optimizer, views, steps: int, bf_loss: str | None, accelerator=None, phases: bool = False,
              schedule=None, first_step: int = 0):
    """Run steps first_step .. first_step + steps - 1 on the same views; returns per-step seconds.

    schedule(step) -> (lr, m), as train.py computes them (default: lr 0.1, m 0.99). The values
    matter on CPUs: how many denormal floats the step meets depends on the weights' history.
    phases=False: {"step": [s, ...]}, the device synchronised only once per step (after it).
    phases=True:  also one list per PHASES entry, synchronising after each phase (on a GPU
    that costs a little throughput; on a CPU nothing).
    `model` may be wrapped by accelerator.prepare (autocast); `moco` is the plain module.
    """
    moco = accelerator.unwrap_model(model, keep_torch_compile=False) if accelerator is not None else model
    device = next(moco.parameters()).device
    x1, x2 = views
    times = {name: [] for name in ("step",) + (PHASES if phases else ())}
    for step in range(first_step, first_step + steps):
        start = time.perf_counter()
        marks = [start]
        lr, m = schedule(step) if schedule is not None else (0.1, 0.99)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        torch.manual_seed(dropout_seed(0, step, 0))  # BatchFormer's dropout, as train.py (seed 0, one process)
        q1, q2, k1, k2 = model(x1, x2)
        loss = moco_loss(q1, q2, k1, k2, 0, 1.0, bf_loss)
        if phases:
            _sync(device), marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        (accelerator.backward(loss) if accelerator is not None else loss.backward())
        if phases:
            _sync(device), marks.append(time.perf_counter())
        optimizer.step()
        if phases:
            _sync(device), marks.append(time.perf_counter())
        moco.update_momentum_encoder(m)
        _sync(device)
        marks.append(time.perf_counter())
        times["step"].append(marks[-1] - start)
        if phases:
            for name, a, b in zip(PHASES, marks, marks[1:]):
                times[name].append(b - a)
    return times
