"""The batch order of pretraining and fine-tuning: EpochBatchSampler and loop.batches, against the
order they promise (docs/reliability.md#how-it-is-tested): the processes' shares concatenate to the one-process
global batch, a start mid-epoch continues the same order, and each epoch has its own order."""

import pytest
import torch

from bfcl import loop

EpochBatchSampler = loop.EpochBatchSampler  # through loop, which survives the sampler moving modules


def epoch(num_samples, global_batch, rank=0, processes=1, seed=0, epoch=0, start_step=0):
    """Every step's (index, augmentation seed) pairs of one process in one epoch."""
    return list(EpochBatchSampler(num_samples, global_batch, rank, processes, seed, epoch, start_step))


@pytest.mark.parametrize("processes", [2, 4])
def test_the_processes_shares_make_the_global_batch(processes):
    reference = epoch(50, 8)  # one process: 6 steps of 8, the last 2 samples dropped
    assert len(reference) == 6 and all(len(batch) == 8 for batch in reference)
    shares = [epoch(50, 8, rank, processes) for rank in range(processes)]
    for step, batch in enumerate(reference):
        assert all(len(share[step]) == 8 // processes for share in shares)
        assert [key for share in shares for key in share[step]] == batch, step  # rank order, seeds included


def test_an_epoch_visits_distinct_samples_and_drops_the_tail():
    indices = [i for batch in epoch(50, 8, seed=3) for i, _ in batch]
    assert len(indices) == 48 and len(set(indices)) == 48 and set(indices) <= set(range(50))
    seeds = [s for batch in epoch(50, 8, seed=3) for _, s in batch]
    assert len(set(seeds)) == 48  # every position draws its own augmentation


@pytest.mark.parametrize("processes, rank", [(1, 0), (2, 1)])
def test_a_mid_epoch_start_continues_the_same_order(processes, rank):
    full = epoch(50, 8, rank, processes, seed=1, epoch=2)
    for start in (1, 4, 5):
        sampler = EpochBatchSampler(50, 8, rank, processes, 1, 2, start)
        assert len(sampler) == 6 - start
        assert list(sampler) == full[start:], start


def test_the_order_and_the_augmentations_change_between_epochs_and_repeat_within_one():
    first, again, second = epoch(50, 8, seed=0, epoch=0), epoch(50, 8, seed=0, epoch=0), epoch(50, 8, seed=0, epoch=1)
    assert first == again
    order = lambda batches: [i for batch in batches for i, _ in batch]
    seeds = lambda batches: [s for batch in batches for _, s in batch]
    assert order(first) != order(second) and sorted(order(first)) != order(first)  # shuffled, and anew each epoch
    assert set(seeds(first)).isdisjoint(seeds(second))  # a sample seen again gets new crops
    assert order(epoch(50, 8, seed=1, epoch=0)) != order(first)  # and the run seed changes the order


class Keys(torch.utils.data.Dataset):
    """A dataset that returns its (index, seed) key, so a batch shows what the sampler asked for."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, seed = key
        return index, seed


def run_batches(start_step, last_step, rank=0, processes=1, n=20, global_batch=4, seed=5):
    """loop.batches as [(step, [(index, seed), ...])]: 5 steps an epoch of 20 samples."""
    out = []
    for step, (indices, seeds) in loop.batches(Keys(n), global_batch, rank, processes, seed, start_step, last_step,
                                               workers=0, pin_memory=False):
        out.append((step, list(zip(indices.tolist(), seeds.tolist()))))
    return out


def test_batches_run_across_epochs_in_each_epochs_order():
    steps = run_batches(0, 12)  # 2 full epochs and 2 steps of the third
    assert [s for s, _ in steps] == list(range(12))
    for e in range(3):
        expected = epoch(20, 4, seed=5, epoch=e)
        got = [batch for s, batch in steps if s // 5 == e]
        assert got == expected[:len(got)], e


def test_batches_resumed_mid_epoch_continue_the_uninterrupted_run():
    straight = run_batches(0, 12)
    for start in (3, 5, 7):  # inside epoch 0, at the epoch boundary, inside epoch 1
        assert run_batches(start, 12) == straight[start:], start
    assert run_batches(3, 7) == straight[3:7]  # and stop at last_step


def test_batches_of_two_processes_make_the_one_process_batches():
    one = run_batches(2, 9)
    ranks = [run_batches(2, 9, rank, 2) for rank in range(2)]
    for i, (step, batch) in enumerate(one):
        assert ranks[0][i][0] == ranks[1][i][0] == step
        assert ranks[0][i][1] + ranks[1][i][1] == batch
