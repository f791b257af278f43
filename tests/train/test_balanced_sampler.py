"""Batch samplers: exact forget/retain counts, rank shards, per-epoch seeding, resume, errors."""
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from unlearn_fast.train.balanced_sampler import (BalancedUnlearnSampler, ReferenceShuffleBatchSampler,
                                                 forget_mask, proportional_forget_per_batch)


def mixed_labels(n_forget, n_retain, seed=0):
    labels = [-100.0] * n_forget + [100.0] * n_retain
    random.Random(seed).shuffle(labels)  # forget rows scattered through the dataset
    return labels


def rank_batches(make, world_size, epoch=0):
    """[rank][step] -> index list, each rank from its own sampler instance (as on separate processes)."""
    out = []
    for rank in range(world_size):
        sampler = make(rank)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("batch_size,forget_per_batch", [(8, 3), (1, 1), (1, 0), (5, 5), (7, 0), (6, 1)])
def test_every_batch_has_exact_forget_and_retain_rows(batch_size, forget_per_batch):
    labels = mixed_labels(37, 53)
    sampler = BalancedUnlearnSampler(labels, batch_size, forget_per_batch, seed=3)
    r = batch_size - forget_per_batch
    steps = min(37 // forget_per_batch if forget_per_batch else 10**9, 53 // r if r else 10**9)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sampler.steps_per_epoch == steps
    for batch in batches:
        assert len(batch) == batch_size
        assert [labels[i] < 0 for i in batch] == [True] * forget_per_batch + [False] * r  # forget rows first
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)  # drop_last: no row twice in an epoch


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_partition_each_global_batch(world_size):
    labels = mixed_labels(41, 60, seed=1)
    make = lambda rank: BalancedUnlearnSampler(labels, 6, 2, seed=7, rank=rank, world_size=world_size)
    per_rank = rank_batches(make, world_size, epoch=2)
    steps = min(41 // (2 * world_size), 60 // (4 * world_size))
    assert all(len(b) == steps for b in per_rank)
    seen = []
    for step in range(steps):
        global_batch = [i for rank in range(world_size) for i in per_rank[rank][step]]
        assert len(set(global_batch)) == 6 * world_size  # disjoint shards
        seen += global_batch
        for rank in range(world_size):
            assert Counter(labels[i] < 0 for i in per_rank[rank][step]) == {True: 2, False: 4}
    assert len(set(seen)) == len(seen)
    # the global order does not depend on how it is sharded: 1 rank of 6*W rows draws the same rows
    whole = BalancedUnlearnSampler(labels, 6 * world_size, 2 * world_size, seed=7)
    whole.set_epoch(2)
    whole_batches = list(whole)
    for step in range(steps):
        assert set(whole_batches[step]) == {i for rank in range(world_size) for i in per_rank[rank][step]}


def test_set_epoch_and_seed_change_the_order_reproducibly():
    labels = mixed_labels(30, 30)
    a = BalancedUnlearnSampler(labels, 4, 2, seed=0)
    b = BalancedUnlearnSampler(labels, 4, 2, seed=0)
    c = BalancedUnlearnSampler(labels, 4, 2, seed=1)
    epoch0 = list(a)
    assert epoch0 == list(a) == list(b)
    assert epoch0 != list(c)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0 and sorted(map(sorted, epoch1)) != sorted(map(sorted, epoch0))
    b.set_epoch(1)
    assert list(b) == epoch1


def test_start_step_skips_the_first_batches():
    labels = mixed_labels(40, 40)
    full = BalancedUnlearnSampler(labels, 8, 4, seed=2, rank=1, world_size=2)
    full.set_epoch(4)
    everything = list(full)
    full.set_epoch(4, start_step=3)
    assert len(full) == len(everything) - 3 and list(full) == everything[3:]
    full.set_epoch(5)  # a new epoch starts from 0 again
    assert len(full) == full.steps_per_epoch
    resumed = BalancedUnlearnSampler(labels, 8, 4, seed=2, rank=1, world_size=2, start_step=2)
    assert len(resumed) == resumed.steps_per_epoch - 2
    full.set_epoch(0)
    assert list(resumed) == list(full)[2:]
    full.set_epoch(0, start_step=full.steps_per_epoch)
    assert list(full) == [] and len(full) == 0


def test_drop_last_false_covers_every_row_with_full_batches():
    labels = mixed_labels(11, 29)
    sampler = BalancedUnlearnSampler(labels, 5, 2, seed=0, drop_last=False, world_size=2, rank=0)
    other = BalancedUnlearnSampler(labels, 5, 2, seed=0, drop_last=False, world_size=2, rank=1)
    batches = list(sampler) + list(other)
    steps = max(-(-11 // 4), -(-29 // 6))
    assert len(sampler) == len(other) == steps == 5
    assert all(len(b) == 5 and sum(labels[i] < 0 for i in b) == 2 for b in batches)
    assert {i for b in batches for i in b} == set(range(40))


def test_usable_as_dataloader_batch_sampler():
    labels = torch.tensor(mixed_labels(20, 25), dtype=torch.float64)
    ds = TensorDataset(torch.arange(45), labels)
    loader = DataLoader(ds, batch_sampler=BalancedUnlearnSampler(labels, 9, 4, seed=0))
    got = list(loader)
    assert len(got) == len(loader) == min(20 // 4, 25 // 5)
    for idx, lab in got:
        assert idx.shape == (9,) and (lab[:4] < 0).all() and (lab[4:] > 0).all()


def test_bool_mask_and_proportional_forget_per_batch():
    labels = mixed_labels(30, 10)
    mask = forget_mask(labels)
    assert mask.dtype == torch.bool and int(mask.sum()) == 30
    assert torch.equal(forget_mask(mask), mask)
    assert list(BalancedUnlearnSampler(mask, 4, 3)) == list(BalancedUnlearnSampler(labels, 4, 3))
    assert proportional_forget_per_batch(labels, 8) == 6
    assert proportional_forget_per_batch(mixed_labels(1, 99), 8) == 1   # kept >= 1 when forget rows exist
    assert proportional_forget_per_batch(mixed_labels(99, 1), 8) == 7   # and <= batch - 1
    assert proportional_forget_per_batch(mixed_labels(0, 5), 8) == 0
    assert proportional_forget_per_batch(mixed_labels(12, 12), 32) == 16


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=100, forget_per_batch=50), "a batch larger than the data"),
    (dict(batch_size=8, forget_per_batch=4, world_size=4), "a batch larger than the data"),
    (dict(batch_size=4, forget_per_batch=5), "forget_per_batch"),
    (dict(batch_size=4, forget_per_batch=-1), "forget_per_batch"),
    (dict(batch_size=0, forget_per_batch=0), "batch_size"),
    (dict(batch_size=4, forget_per_batch=2, rank=2, world_size=2), "rank"),
    (dict(batch_size=4, forget_per_batch=2, world_size=0), "world_size"),
    (dict(batch_size=4, forget_per_batch=2, start_step=99), "start_step"),
    (dict(labels=[100.0] * 10, batch_size=4, forget_per_batch=1), "no forget rows"),
    (dict(labels=[-100.0] * 10, batch_size=4, forget_per_batch=1), "no retain rows"),
    (dict(labels=[[1.0]], batch_size=1, forget_per_batch=0), "1-D"),
])
def test_balanced_sampler_errors(kwargs, match):
    args = dict(labels=mixed_labels(6, 6))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BalancedUnlearnSampler(**args)


def test_start_step_beyond_epoch_via_set_epoch():
    sampler = BalancedUnlearnSampler(mixed_labels(6, 6), 4, 2)
    with pytest.raises(ValueError, match="start_step"):
        sampler.set_epoch(1, start_step=sampler.steps_per_epoch + 1)


# ---------------------------------------------------------------- reference shuffle

@pytest.mark.parametrize("n,batch_size,world_size", [(50, 4, 1), (50, 4, 3), (13, 1, 2), (13, 13, 1)])
def test_reference_shuffle_shards_one_seeded_permutation(n, batch_size, world_size):
    make = lambda rank: ReferenceShuffleBatchSampler(n, batch_size, seed=4, rank=rank, world_size=world_size)
    per_rank = rank_batches(make, world_size, epoch=1)
    steps = n // (batch_size * world_size)
    assert all(len(b) == steps for b in per_rank)
    flat = [i for step in range(steps) for rank in range(world_size) for i in per_rank[rank][step]]
    assert all(len(b) == batch_size for rb in per_rank for b in rb)
    assert len(set(flat)) == len(flat) == steps * batch_size * world_size
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(make(0)._epoch_seed(1)))
    assert flat == expected[:len(flat)].tolist()


def test_reference_shuffle_epochs_resume_drop_last_and_errors():
    labels = mixed_labels(10, 15)
    s = ReferenceShuffleBatchSampler(labels, 4)  # a sized sequence works as the row count
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert len(e0) == len(e1) == 6 and e0 != e1
    s.set_epoch(1, start_step=4)
    assert list(s) == e1[4:] and len(s) == 2
    padded = ReferenceShuffleBatchSampler(25, 4, drop_last=False)
    batches = list(padded)
    assert len(batches) == 7 and all(len(b) == 4 for b in batches)
    assert {i for b in batches for i in b} == set(range(25))
    # the random composition: forget rows per batch vary (unlike the balanced sampler)
    compositions = {sum(labels[i] < 0 for i in b) for e in range(4) for b in (s.set_epoch(e) or list(s))}
    assert len(compositions) > 1
    with pytest.raises(ValueError, match="a batch larger than the data"):
        ReferenceShuffleBatchSampler(7, 4, world_size=2)
    with pytest.raises(ValueError, match="at least one row"):
        ReferenceShuffleBatchSampler(0, 4)
