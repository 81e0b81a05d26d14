"""The MoCo v3 contrastive loss and the BatchFormer loss variants.

Keys arrive already gathered from every process (the script does that); the loss only needs
this process's rank to find the positives. With one process, k_all is just the local keys.
"""

import torch
import torch.nn.functional as F

# The seed's `--add_bf` integers, named. 0 means no BatchFormer.
PAIRS_SUM = "pairs-sum"  # --add_bf 1 or 34: 8 terms summed, ≈4x the baseline loss (documented default)
PAIRS_MEAN = "pairs-mean"  # --add_bf 36: the same 8 terms divided by 4
JOINT = "joint"  # any other positive --add_bf: one loss over all 2N rows
BF_LOSSES = (PAIRS_SUM, PAIRS_MEAN, JOINT)


def bf_loss_from_add_bf(add_bf: int) -> str | None:
    """Map the seed's --add_bf integer to a named loss variant (None: BatchFormer off).

    The fork's main_moco.py tests `add_bf in [1, 34]` for the 8-term sum, so 34 is pairs-sum
    too; 36 is the mean; any other positive value takes its joint branch."""
    if add_bf < 0:
        raise ValueError(f"--add_bf must be 0 (off) or positive, got {add_bf}")
    if add_bf == 0:
        return None
    return {1: PAIRS_SUM, 34: PAIRS_SUM, 36: PAIRS_MEAN}.get(add_bf, JOINT)


def contrastive_loss(q: torch.Tensor, k_all: torch.Tensor, rank: int, temperature: float) -> torch.Tensor:
    """InfoNCE of local queries against keys from all processes, scaled by 2T as in MoCo v3.

    q:     [N, D] this process's queries.
    k_all: [P·N, D] keys of all P processes, process r's at rows [r·N, (r+1)·N).
    Row i's positive is k_all[i + N·rank]; every other key is a negative.
    Returns the scalar mean over the N local rows, in fp32.
    """
    q = F.normalize(q.float(), dim=1)
    k_all = F.normalize(k_all.float(), dim=1)
    logits = q @ k_all.T / temperature  # [N, P·N]
    n = q.shape[0]
    labels = torch.arange(n, device=q.device) + n * rank
    return F.cross_entropy(logits, labels) * (2 * temperature)


def _halves(k_all: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split gathered BatchFormer keys [P·2N, D] into plain and BatchFormer keys, [P·N, D] each.

    Each process contributed [plain ; BatchFormer] rows, so the gathered tensor is
    [p0 plain, p0 BF, p1 plain, p1 BF, ...]; after the split, positives sit at i + N·rank again.
    """
    blocks = k_all.view(-1, 2, n, k_all.shape[-1])  # [P, 2, N, D]
    dim = k_all.shape[-1]
    return blocks[:, 0].reshape(-1, dim), blocks[:, 1].reshape(-1, dim)


def moco_loss(q1, q2, k1_all, k2_all, rank: int, temperature: float, bf_loss: str | None) -> torch.Tensor:
    """The symmetrised MoCo v3 loss, ctr(q1, k2) + ctr(q2, k1), for each BatchFormer variant.

    bf_loss None: q [N, D], k_all [P·N, D]; the plain MoCo v3 loss.
    bf_loss set:  q [2N, D] = [plain o ; BatchFormer b] rows, k_all [P·2N, D] with each process's
    block laid out the same way.
      pairs-sum:  Σ over x, y in {o, b} of ctr(q1_x, k2_y) + ctr(q2_x, k1_y): 8 terms, not averaged.
      pairs-mean: the same divided by 4.
      joint:      ctr(q1, k2) + ctr(q2, k1) over all 2N rows; row i's positive is key row i, so the
                  same image's other-stream embedding counts as a negative.
    """
    if bf_loss is None or bf_loss == JOINT:
        return contrastive_loss(q1, k2_all, rank, temperature) + contrastive_loss(q2, k1_all, rank, temperature)
    if bf_loss not in BF_LOSSES:
        raise ValueError(f"unknown BatchFormer loss {bf_loss!r}; choose one of {', '.join(BF_LOSSES)}")
    n = q1.shape[0] // 2
    q1_halves, q2_halves = q1.split(n), q2.split(n)
    k1_halves, k2_halves = _halves(k1_all, n), _halves(k2_all, n)
    total = 0.0
    for x in range(2):
        for y in range(2):
            total = total + contrastive_loss(q1_halves[x], k2_halves[y], rank, temperature)
            total = total + contrastive_loss(q2_halves[x], k1_halves[y], rank, temperature)
    return total / 4 if bf_loss == PAIRS_MEAN else total
