"""--bf-context global across two real processes (gloo): bfcl.loop.global_context gathers the features WITH
gradients, so the loss of the other process reaches this process's backbone. A gather without
gradients (accelerator.gather, dist.all_gather) still gives every process the right forward values
and identical replicas; only this gradient tells them apart. The reference is the same layer over the
concatenated batch in one process."""

import os
import socket
import subprocess
import sys

import torch
from torch import nn

from bfcl.batchformer import BatchFormer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, IN, C = 3, 6, 8

# Each process: the same "backbone" (a Linear) and BatchFormer, its own N inputs; only rank 1 has a
# loss (rank 0's is 0 x its output), so every gradient on rank 0 came from rank 1 through the gather.
WORKER = r"""
import os, sys
import torch
from accelerate import Accelerator
from bfcl.loop import global_context
from test_bf_context_grad import build, inputs, loss_of

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
backbone, bf = build()
out = bf(backbone(inputs()[rank]), context=global_context(accelerator))
loss = loss_of(out) if rank == 1 else 0 * out.sum()
loss.backward()
torch.save({"out": out.detach(), "weight": backbone.weight.grad, "bias": backbone.bias.grad},
           os.path.join(sys.argv[1], f"rank{rank}.pt"))
"""


def build() -> tuple[nn.Linear, BatchFormer]:
    torch.manual_seed(0)
    return nn.Linear(IN, C).double(), BatchFormer(C, dropout=0.0).double().train()


def inputs() -> torch.Tensor:
    return torch.randn(2, N, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out[N:].square().sum()  # the BatchFormer rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_other_process_loss_reaches_this_process_backbone(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # The reference: one process, both batches as one sequence.
    backbone, bf = build()
    x0, x1 = inputs()
    rows = backbone(torch.cat([x0, x1]))
    mixed = bf.encoder_layer(rows.unsqueeze(0)).squeeze(0)
    for r, x in enumerate((x0, x1)):  # the forward: each process's rows attend over all 2N samples
        torch.testing.assert_close(got[r]["out"], torch.cat([rows[r * N:(r + 1) * N], mixed[r * N:(r + 1) * N]]))

    def grads(through_rank0: bool, through_rank1: bool) -> list[torch.Tensor]:
        """d loss_1 / d backbone, through the features of the processes named (the rest detached)."""
        backbone.zero_grad()
        f0, f1 = backbone(x0), backbone(x1)
        f0, f1 = (f0 if through_rank0 else f0.detach()), (f1 if through_rank1 else f1.detach())
        out1 = bf(f1, context=lambda rows: (torch.cat([f0, rows]), N))
        loss_of(out1).backward()
        return [backbone.weight.grad.clone(), backbone.bias.grad.clone()]

    to_rank0 = grads(True, False)
    assert to_rank0[0].abs().sum() > 0  # the reference itself is not zero
    torch.testing.assert_close([got[0]["weight"], got[0]["bias"]], to_rank0)  # rank 1's loss reached rank 0
    torch.testing.assert_close([got[1]["weight"], got[1]["bias"]], grads(False, True))
    # summed over the processes (what DDP's averaging sees, times 2): the one-process gradient
    torch.testing.assert_close([got[0]["weight"] + got[1]["weight"], got[0]["bias"] + got[1]["bias"]],
                               grads(True, True))
