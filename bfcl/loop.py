"""The plumbing of a training loop that train.py (pretraining) and probe.py (fine-tuning) share:
the batches of every step across epochs, resumable mid-epoch, and the sums kept on the device
between sync points. No ranks are looked up here: the scripts pass them in."""

import time

import torch
from torch.utils.data import DataLoader

from bfcl.runs import ignore_stop_signals
from bfcl.views import EpochBatchSampler


def batches(dataset, global_batch: int, rank: int, processes: int, seed: int, start_step: int, last_step: int,
            workers: int, pin_memory: bool):
    """(step, batch) for every step from start_step to last_step, across epochs. The dataset takes
    (index, seed) keys (EpochBatchSampler): a resumed run starts inside its epoch, with the same
    order and the same augmentations."""
    steps_per_epoch = len(dataset) // global_batch
    step = start_step
    while step < last_step:
        epoch, epoch_step = divmod(step, steps_per_epoch)
        sampler = EpochBatchSampler(len(dataset), global_batch, rank, processes, seed, epoch, epoch_step)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                            worker_init_fn=ignore_stop_signals)
        for batch in loader:
            yield step, batch
            step += 1
            if step == last_step:
                return


class Window:
    """Sums since the last sync point, kept on the device so that a step never waits for the
    host: loss, non-finite losses, failed image reads, stop requests; and the host's time."""

    def __init__(self, device: torch.device):
        self.device, self.sums, self.steps = device, torch.zeros(4, device=device), 0
        self.start, self.data_wait, self.fetch_start = time.perf_counter(), 0.0, time.perf_counter()

    def data_arrived(self) -> None:
        self.data_wait += time.perf_counter() - self.fetch_start

    def add(self, loss: torch.Tensor, failed_reads: torch.Tensor, stop_requested: bool) -> None:
        # Host values go up through pinned memory without blocking: a plain .to(device) of a CPU
        # tensor makes the host wait for the whole step on a GPU.
        host = torch.tensor([failed_reads.sum().item(), float(stop_requested)], pin_memory=self.device.type == "cuda")
        loss = loss.detach().float().view(1)
        self.sums += torch.cat([loss, (~torch.isfinite(loss)).float(), host.to(self.device, non_blocking=True)])
        self.steps += 1
        self.fetch_start = time.perf_counter()

    def read(self, reduce_sum, processes: int) -> dict:
        """Sum over the processes with reduce_sum (the sync), then start a new window. "loss" is
        the mean over the window's steps and the processes; the counts are totals."""
        loss_sum, nonfinite, bad, stops = reduce_sum(self.sums).tolist()
        elapsed = time.perf_counter() - self.start
        out = {"loss": loss_sum / processes / self.steps, "nonfinite": int(nonfinite), "bad": int(bad),
               "stop": stops > 0,
               "steps": self.steps, "elapsed": elapsed, "data_wait": self.data_wait / elapsed}
        self.sums.zero_()
        self.steps, self.start, self.data_wait, self.fetch_start = 0, time.perf_counter(), 0.0, time.perf_counter()
        return out


class StopCheck:
    """Between sync points, ask every process whether it was told to stop, about once per
    `seconds` of wall-clock, so that a preemption notice is heard within its grace period even
    when --log-every steps take minutes.

    The interval is counted in steps that all processes agree on: each check all-reduces the
    stop flags and the time since the last check, and the mean step time sets the next interval.
    Fast steps therefore never pay for it (their interval runs past the next sync point), and no
    step waits for the host except at a check. The first check follows the first step.
    """

    def __init__(self, start_step: int, seconds: float = 30.0):
        self.seconds, self.every = seconds, 1
        self.last_step, self.last_time = start_step, time.perf_counter()

    def due(self, done: int) -> bool:
        return done - self.last_step >= self.every

    def poll(self, done: int, requested: bool, reduce_sum, processes: int, device: torch.device) -> bool:
        """Whether any process was asked to stop; also sets the next interval. A collective: every
        process must call it at the same step."""
        now = time.perf_counter()
        stops, elapsed = reduce_sum(torch.tensor([float(requested), now - self.last_time], device=device)).tolist()
        step_time = elapsed / processes / max(1, done - self.last_step)
        self.every = max(1, int(self.seconds / max(step_time, 1e-9)))
        self.last_step, self.last_time = done, now
        return stops > 0

    def synced(self, done: int) -> None:
        """A full sync point just read every process's stop flag: count the next interval from here."""
        self.last_step, self.last_time = done, time.perf_counter()


def global_context(accelerator):
    """BatchFormer's context over the whole global batch (train.py --bf-context global): every
    process's features, gathered WITH gradients, so each sample's BatchFormer row attends to all
    samples and the loss of every process reaches every backbone. Returns x [N, C] -> (x_all
    [P·N, C], this process's first row). One process: the local batch itself. Accelerate's gather
    has no gradient, hence torch.distributed's differentiable all_gather, imported only here."""
    if accelerator.num_processes == 1:
        return lambda x: (x, 0)
    from torch.distributed.nn.functional import all_gather
    start = accelerator.process_index
    return lambda x: (torch.cat(all_gather(x)), start * x.shape[0])
