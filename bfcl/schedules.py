"""Schedules as pure functions of the step, so resuming needs only the step.

MoCo v3 sets both every iteration from the fractional epoch; step / steps_per_epoch is that.
"""

import math


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup from 0 to peak_lr over warmup_steps, then half-cosine to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum(step: int, total_steps: int, base_momentum: float, cosine: bool) -> float:
    """m = 1 - ½(1 + cos(π·t/T))(1 - m₀): rises from m₀ to 1 (--moco-m-cos); else m₀ throughout."""
    if not cosine:
        return base_momentum
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / total_steps)) * (1.0 - base_momentum)
