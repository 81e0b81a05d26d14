"""`--mixed-precision auto` on a CPU with native bf16: time this run's own model in fp32 and bf16 at
start-up and keep the faster (bfcl/precision.py holds the timing, the cache and the rule; this file
builds what is timed from train.py's config). docs/reliability.md, case 15."""

import os

import torch

from bfcl.checkpoint import peek_precision
from bfcl.loss import moco_loss
from bfcl.model import MoCo, is_vit, uses_channels_last
from bfcl.precision import PROBE_STEPS, PROBE_ENV, auto_is_measured, cache_key, decide_auto, rule_fallback


def decide_precision(config, bf_loss: str | None, processes: int, requested: str | None, device_type: str,
                     chosen: str | None, why: str) -> tuple[str | None, str]:
    """make_accelerator's decide: the precision this run trains in, and why (the summary's words).

    Where auto decides (--mixed-precision auto, or no flag and no launcher setting), a resume keeps
    the precision its checkpoint trained in, whatever this machine would pick; on a CPU with native
    bf16 a fresh start takes the faster of bf16 and fp32 on this run's model (cached, else measured:
    bfcl.precision.decide_auto), or today's rule where measuring cannot run. Explicit choices, the
    launcher's setting and GPUs keep the rule (resume_checkpoint compares them with the checkpoint's)."""
    named = (lambda text: text.replace("auto: ", "auto (no --mixed-precision, none from the launcher): ", 1)) \
        if requested is None else (lambda text: text)
    if chosen is None or not why.startswith("auto"):
        return chosen, why
    kept = peek_precision(config.output_dir, config.resume)
    if kept is not None:
        return kept[0], named(f"auto: kept from {kept[1]}, which trained in it (a resume does not choose again)")
    if not auto_is_measured(requested, device_type):
        return chosen, why
    if os.environ.get(PROBE_ENV) == "0":
        return chosen, named(rule_fallback(f"{PROBE_ENV}=0")[1])
    if config.max_steps and config.max_steps < PROBE_STEPS:
        return chosen, named(rule_fallback(f"--max-steps {config.max_steps} is below the {PROBE_STEPS} steps of each "
                                           "precision timing needs")[1])
    local = config.batch_size // processes
    model = (f"{config.arch}, " + (f"patch {config.patch_size}" if is_vit(config.arch) else f"{config.stem} stem")
             + f", BatchFormer {'on' if bf_loss else 'off'}, MLP {config.moco_mlp_dim}/{config.moco_dim}")
    key = cache_key(processes, torch.get_num_threads(), model, config.image_size, local)
    shape = f"{processes} x batch {local} x {config.image_size} px"
    chosen, why = decide_auto(key, lambda: precision_probe_step(config, local, bf_loss), local * processes, shape)
    return chosen, named(why)


def precision_probe_step(config, local_batch: int, bf_loss: str | None):
    """What bfcl.precision.time_precisions times for auto: one forward and backward of a model built as
    this run's (MoCo, BatchFormer, channels-last as configured) on synthetic views of the run's batch
    per process and image size, in fp32 or under bf16 autocast (as Accelerate wraps the forward). The
    model is built under a forked RNG and the views come from their own generator, so the run's
    model, its random state and its losses are those of a run whose precision is fixed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MoCo(config.arch, config.stem, config.moco_dim, config.moco_mlp_dim, batchformer=bf_loss is not None,
                     bf_trainable=config.bf_trainable, image_size=config.image_size, patch_size=config.patch_size,
                     stop_grad_conv1=config.stop_grad_conv1)
    memory_format = torch.channels_last if uses_channels_last(config.arch) else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    views = torch.randn(2, local_batch, 3, config.image_size, config.image_size,
                        generator=torch.Generator().manual_seed(0))
    x1, x2 = (v.contiguous(memory_format=memory_format) for v in views)

    def step(precision: str) -> None:
        with torch.random.fork_rng(devices=[]):  # BatchFormer's dropout draws from the global generator
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                q1, q2, k1, k2 = model(x1, x2, batchformer=bf_loss is not None)
            loss = moco_loss(q1, q2, k1, k2, 0, config.moco_t, bf_loss)
            model.zero_grad(set_to_none=True)
            loss.backward()
    return step
