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


def pair_loss(q, k_all, rank: int, temperature: float, bf_loss: str | None) -> torch.Tensor:
    """One query view against one key view, under a BatchFormer variant: what each of the two
    halves of moco_loss is. None and joint: ctr(q, k_all); pairs-sum: Σ over x, y in {o, b} of
    ctr(q_x, k_y), 4 terms; pairs-mean: the same divided by 4 (shapes as in moco_loss)."""
    if bf_loss is None or bf_loss == JOINT:
        return contrastive_loss(q, k_all, rank, temperature)
    if bf_loss not in BF_LOSSES:
        raise ValueError(f"unknown BatchFormer loss {bf_loss!r}; choose one of {', '.join(BF_LOSSES)}")
    n = q.shape[0] // 2
    total = 0.0
    for q_half in q.split(n):
        for k_half in _halves(k_all, n):
            total = total + contrastive_loss(q_half, k_half, rank, temperature)
    return total / 4 if bf_loss == PAIRS_MEAN else total


def view_pairs(global_views: int, local_views: int) -> list[tuple[str, int, int]]:
    """The (query kind, query view, key view) pairs of multiview_loss: every global view's query
    against every OTHER global view's key, then every local view's query against every global
    view's key. V·(V - 1) + L·V pairs; (global 0 -> key 1, global 1 -> key 0) for MoCo v3's two."""
    return ([("global", i, g) for i in range(global_views) for g in range(global_views) if i != g]
            + [("local", j, g) for j in range(local_views) for g in range(global_views)])


def multiview_loss(q_global, q_local, k_global_all, rank: int, temperature: float,
                   bf_loss: str | None) -> torch.Tensor:
    """Multi-crop MoCo v3 (train.py --global-views, --local-crops; docs/multicrop.md#loss).

    q_global: V query tensors, one per global view; q_local: L, one per local view; k_global_all:
    V gathered key tensors, the global views' only (the momentum encoder never sees a local view).
    Shapes per tensor as in moco_loss. Every pair of view_pairs contributes pair_loss (same
    temperature, same 2T scaling); the loss is 2 x their mean, so that MoCo v3's two views give
    ctr(q1, k2) + ctr(q2, k1), moco_loss up to the order of the additions, and more views change
    which pairs are averaged, not the loss's scale (nor, with LARS, the effective step)."""
    queries = {"global": q_global, "local": q_local}
    pairs = view_pairs(len(q_global), len(q_local))
    total = 0.0
    for kind, i, g in pairs:
        total = total + pair_loss(queries[kind][i], k_global_all[g], rank, temperature, bf_loss)
    return total * (2 / len(pairs))
