"""The MoCo v3 loss and the BatchFormer variants against a naive per-row loop
(docs/method.md#moco-v3, #batchformer-losses)."""

import math

import pytest
import torch

from bfcl.loss import JOINT, PAIRS_MEAN, PAIRS_SUM, bf_loss_from_add_bf, contrastive_loss, moco_loss

N, D = 4, 6
ATOL = 2e-5  # the loss is computed in fp32; the reference in Python floats


def naive_ctr(q: torch.Tensor, k_all: torch.Tensor, positives: list[int], t: float) -> float:
    """Softmax cross-entropy written out row by row: mean_i [log Σ_j exp(s_ij) - s_i,pos(i)] · 2T,
    with s_ij = <q_i/|q_i|, k_j/|k_j|> / T."""
    q, k_all = q.tolist(), k_all.tolist()
    unit = lambda v: [a / math.sqrt(sum(b * b for b in v)) for a in v]
    keys = [unit(k) for k in k_all]
    total = 0.0
    for i, row in enumerate(q):
        qi = unit(row)
        logits = [sum(a * b for a, b in zip(qi, k)) / t for k in keys]
        total += math.log(sum(math.exp(s) for s in logits)) - logits[positives[i]]
    return total / len(q) * 2 * t


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("t", [1.0, 0.2])
def test_contrastive_loss_single_process(t):
    torch.manual_seed(0)
    q, k = rand(N, D), rand(N, D)
    expected = naive_ctr(q, k, list(range(N)), t)
    assert contrastive_loss(q, k, rank=0, temperature=t).item() == pytest.approx(expected, abs=ATOL)


def test_contrastive_loss_positives_are_offset_by_rank():
    """Keys gathered from two processes: rank 1's row i is positive with key i + N."""
    torch.manual_seed(1)
    q0, q1, k0, k1 = rand(N, D), rand(N, D), rand(N, D), rand(N, D)
    k_all = torch.cat([k0, k1])
    assert contrastive_loss(q0, k_all, 0, 1.0).item() == pytest.approx(
        naive_ctr(q0, k_all, list(range(N)), 1.0), abs=ATOL)
    assert contrastive_loss(q1, k_all, 1, 1.0).item() == pytest.approx(
        naive_ctr(q1, k_all, [i + N for i in range(N)], 1.0), abs=ATOL)
    # and not at i: the wrong offset gives a different value
    assert contrastive_loss(q1, k_all, 1, 1.0).item() != pytest.approx(
        naive_ctr(q1, k_all, list(range(N)), 1.0), abs=1e-3)


def test_two_processes_average_to_one_process_on_the_global_batch():
    """Mean of both ranks' losses (what gradient averaging optimises) == one process, batch 2N."""
    torch.manual_seed(2)
    q0, q1, k0, k1 = rand(N, D), rand(N, D), rand(N, D), rand(N, D)
    k_all = torch.cat([k0, k1])
    two = (contrastive_loss(q0, k_all, 0, 1.0) + contrastive_loss(q1, k_all, 1, 1.0)) / 2
    one = naive_ctr(torch.cat([q0, q1]), k_all, list(range(2 * N)), 1.0)
    assert two.item() == pytest.approx(one, abs=ATOL)


def test_moco_loss_without_batchformer_is_symmetrised():
    torch.manual_seed(3)
    q1, q2, k1, k2 = rand(N, D), rand(N, D), rand(N, D), rand(N, D)
    expected = naive_ctr(q1, k2, list(range(N)), 1.0) + naive_ctr(q2, k1, list(range(N)), 1.0)
    assert moco_loss(q1, q2, k1, k2, 0, 1.0, None).item() == pytest.approx(expected, abs=ATOL)


def two_process_batch(seed: int):
    """Per-process [plain ; BatchFormer] query and key blocks, as each process's model returns them.
    Returns {rank: (q1, q2)}, the gathered keys k1_all, k2_all laid out
    [p0 plain, p0 BF, p1 plain, p1 BF], and the separate pieces for building references."""
    torch.manual_seed(seed)
    pieces = {name: [rand(N, D) for _ in range(2)] for name in
              ("q1o", "q1b", "q2o", "q2b", "k1o", "k1b", "k2o", "k2b")}  # [rank0, rank1] each
    q = {r: (torch.cat([pieces["q1o"][r], pieces["q1b"][r]]), torch.cat([pieces["q2o"][r], pieces["q2b"][r]]))
         for r in range(2)}
    k1_all = torch.cat([pieces["k1o"][0], pieces["k1b"][0], pieces["k1o"][1], pieces["k1b"][1]])
    k2_all = torch.cat([pieces["k2o"][0], pieces["k2b"][0], pieces["k2o"][1], pieces["k2b"][1]])
    return q, k1_all, k2_all, pieces


def pairs_reference(pieces: dict, rank: int) -> float:
    """The 8 terms Σ_{x,y∈{o,b}} ctr(q1_x, k2_y) + ctr(q2_x, k1_y), each against its own key half
    gathered from both processes, positives at i + N·rank."""
    positives = [i + N * rank for i in range(N)]
    total = 0.0
    for x in "ob":
        for y in "ob":
            k2_half = torch.cat(pieces[f"k2{y}"])  # [rank0 half y ; rank1 half y]
            k1_half = torch.cat(pieces[f"k1{y}"])
            total += naive_ctr(pieces[f"q1{x}"][rank], k2_half, positives, 1.0)
            total += naive_ctr(pieces[f"q2{x}"][rank], k1_half, positives, 1.0)
    return total


@pytest.mark.parametrize("rank", [0, 1])
def test_pairs_sum_is_the_eight_terms(rank):
    q, k1_all, k2_all, pieces = two_process_batch(4)
    got = moco_loss(*q[rank], k1_all, k2_all, rank, 1.0, PAIRS_SUM).item()
    assert got == pytest.approx(pairs_reference(pieces, rank), abs=8 * ATOL)


@pytest.mark.parametrize("rank", [0, 1])
def test_pairs_mean_is_pairs_sum_over_four(rank):
    q, k1_all, k2_all, pieces = two_process_batch(5)
    pairs_sum = moco_loss(*q[rank], k1_all, k2_all, rank, 1.0, PAIRS_SUM)
    pairs_mean = moco_loss(*q[rank], k1_all, k2_all, rank, 1.0, PAIRS_MEAN)
    assert pairs_mean.item() == pytest.approx(pairs_sum.item() / 4, rel=1e-6)
    assert pairs_mean.item() == pytest.approx(pairs_reference(pieces, rank) / 4, abs=2 * ATOL)


@pytest.mark.parametrize("rank", [0, 1])
def test_joint_is_one_loss_over_all_2n_rows(rank):
    """Row i's positive is key row i of this process's 2N block; the same image's other-stream
    key (i ± N) is a negative."""
    q, k1_all, k2_all, _ = two_process_batch(6)
    positives = [i + 2 * N * rank for i in range(2 * N)]
    expected = naive_ctr(q[rank][0], k2_all, positives, 1.0) + naive_ctr(q[rank][1], k1_all, positives, 1.0)
    assert moco_loss(*q[rank], k1_all, k2_all, rank, 1.0, JOINT).item() == pytest.approx(expected, abs=2 * ATOL)


@pytest.mark.parametrize("bf_loss", [PAIRS_SUM, PAIRS_MEAN, JOINT])
def test_batchformer_losses_two_processes_equal_one_process(bf_loss):
    """The mean of both ranks' losses equals the loss of one process holding the whole global
    batch, laid out as one process lays it out: [all plain rows ; all BatchFormer rows]."""
    q, k1_all, k2_all, p = two_process_batch(7)
    two = sum(moco_loss(*q[r], k1_all, k2_all, r, 1.0, bf_loss) for r in range(2)) / 2
    one_q1 = torch.cat(p["q1o"] + p["q1b"])
    one_q2 = torch.cat(p["q2o"] + p["q2b"])
    one_k1 = torch.cat(p["k1o"] + p["k1b"])
    one_k2 = torch.cat(p["k2o"] + p["k2b"])
    one = moco_loss(one_q1, one_q2, one_k1, one_k2, 0, 1.0, bf_loss)
    assert two.item() == pytest.approx(one.item(), abs=8 * ATOL)


def test_unknown_variant_is_refused():
    q, k1_all, k2_all, _ = two_process_batch(8)
    with pytest.raises(ValueError, match="unknown BatchFormer loss"):
        moco_loss(*q[0], k1_all, k2_all, 0, 1.0, "pairs")


@pytest.mark.parametrize("add_bf, expected", [(0, None), (1, PAIRS_SUM), (36, PAIRS_MEAN), (2, JOINT), (34, PAIRS_SUM)])
def test_bf_loss_from_add_bf(add_bf, expected):
    assert bf_loss_from_add_bf(add_bf) == expected


def test_negative_add_bf_is_refused():
    with pytest.raises(ValueError, match="--add_bf"):
        bf_loss_from_add_bf(-1)
