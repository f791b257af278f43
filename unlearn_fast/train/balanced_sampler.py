"""Batch samplers with a static batch layout, seeded per epoch and sharded across ranks.

`BalancedUnlearnSampler` gives every batch exactly `forget_per_batch` forget rows (first) and
`batch_size - forget_per_batch` retain/proxy rows (after), so the forget/retain split of a batch is a
constant: a CUDA graph or fused kernel can be captured once for it. `ReferenceShuffleBatchSampler` is the
reference's plain shuffle (random composition per batch), seeded instead of time-seeded (REFERENCE.md §1.4).

Both draw one global order per (seed, epoch), identical on every rank; each global batch holds
world_size * batch_size rows and rank r takes its slice, so the ranks partition every global batch.

    sampler = BalancedUnlearnSampler(dataset.labels, batch_size=32, forget_per_batch=16,
                                     seed=0, rank=rank, world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=8)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch, start_step=resume_step if epoch == start_epoch else 0)
        for images, labels in loader: ...
"""
from __future__ import annotations

import math
import numbers
from typing import Iterator

import torch

from .seeding import derive_seed


def forget_mask(labels) -> torch.Tensor:
    """[N] bool: True for forget rows; a bool input is taken as is. Numeric labels follow the reference
    (REFERENCE.md §1.3): -100.0 forget, 100.0 retain/proxy; the steps read ``labels < 100`` as forget, so a label
    in [0, 100) (0/1 class flags, signs +1) or NaN, which this sampler and the steps would read differently, is
    refused."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool:
        return labels.clone()
    if labels.is_complex() or not (labels.is_floating_point() or labels.dtype.is_signed or labels.dtype == torch.uint8):
        raise TypeError(f"labels must be numbers (-100.0 forget / 100.0 retain) or a bool mask, got {labels.dtype}")
    bad = torch.isnan(labels) | ((labels >= 0) & (labels < 100)) if labels.is_floating_point() else \
        (labels >= 0) & (labels < 100)
    if bool(bad.any()):
        example = labels[bad][:4].tolist()
        raise ValueError(f"labels must be the reference's -100.0 (forget) / 100.0 (retain), or a bool mask with True "
                         f"= forget; got {example} (a label in [0, 100) or NaN is ambiguous: the training step reads "
                         "labels < 100 as forget)")
    return labels < 100


def proportional_forget_per_batch(labels, batch_size: int) -> int:
    """The forget rows per batch matching the data's forget share, kept in [1, batch_size - 1] when both
    kinds of row exist (the reference's oversampling makes the share about 1/2)."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    is_forget = forget_mask(labels)
    n, n_forget = len(is_forget), int(is_forget.sum())
    if n == 0:
        raise ValueError("labels are empty")
    f = round(batch_size * n_forget / n)
    if 0 < n_forget < n and batch_size >= 2:
        f = min(max(f, 1), batch_size - 1)
    return f


class _ShardedBatchSampler:
    """Epoch/resume bookkeeping shared by both samplers: subclasses give `steps_per_epoch` and
    `_global_batches(generator, first_step)` (each global batch a list of per-rank index lists)."""

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int, drop_last: bool):
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not _is_int(world_size) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.drop_last, self.epoch, self.start_step = bool(drop_last), 0, 0

    def _finish_init(self, start_step: int) -> None:
        self._check_start_step(start_step)
        self.start_step = int(start_step)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's order; skip its first `start_step` batches (resume mid-epoch)."""
        self._check_start_step(start_step)
        self.epoch, self.start_step = int(epoch), int(start_step)

    def _check_start_step(self, start_step: int) -> None:
        if not _is_int(start_step) or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}] (batches per epoch), "
                             f"got {start_step!r}")

    @property
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def _global_batches(self, generator: torch.Generator, first_step: int) -> Iterator[list[list[int]]]:
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches left in this epoch for this rank (start_step already skipped)."""
        return self.steps_per_epoch - self.start_step

    def _epoch_seed(self, epoch: int) -> int:
        return derive_seed(self.seed, "batch_sampler", epoch)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator()
        g.manual_seed(self._epoch_seed(self.epoch))
        for per_rank in self._global_batches(g, self.start_step):
            yield per_rank[self.rank]


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _cycled(perm: torch.Tensor, start: int, count: int) -> list[int]:
    """perm[start : start + count], wrapping around (pads the last batches when drop_last is False)."""
    idx = torch.arange(start, start + count) % len(perm)
    return perm[idx].tolist()


class BalancedUnlearnSampler(_ShardedBatchSampler):
    """Batches of exactly `forget_per_batch` forget rows then `batch_size - forget_per_batch` others.

    labels: the reference's ±100 (forget -100) or a bool is_forget mask (see :func:`forget_mask`). The forget
    and the retain rows are each permuted per (seed, epoch). drop_last=True: an epoch ends when either pool runs out (the rest waits for
    the next epoch's permutation). drop_last=False: the epoch lasts until both pools are used; the shorter
    pool and the last batch wrap around, so every batch is still full.
    """

    def __init__(self, labels, batch_size: int, forget_per_batch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, start_step: int = 0):
        super().__init__(batch_size, seed, rank, world_size, drop_last)
        if not _is_int(forget_per_batch) or not 0 <= forget_per_batch <= batch_size:
            raise ValueError(f"forget_per_batch must be in [0, batch_size={batch_size}], "
                             f"got {forget_per_batch!r}")
        is_forget = forget_mask(labels)
        self.forget_indices = torch.nonzero(is_forget).flatten()   # [N_F]
        self.retain_indices = torch.nonzero(~is_forget).flatten()  # [N_R]
        self.forget_per_batch = int(forget_per_batch)
        self.retain_per_batch = self.batch_size - self.forget_per_batch
        for what, per_batch, pool in (("forget", self.forget_per_batch, self.forget_indices),
                                      ("retain", self.retain_per_batch, self.retain_indices)):
            if per_batch > 0 and len(pool) == 0:
                raise ValueError(f"{per_batch} {what} rows per batch were asked for, but the data has no "
                                 f"{what} rows")
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"a batch larger than the data: {world_size} rank(s) x ({forget_per_batch} forget + "
                f"{self.retain_per_batch} retain) rows per step, but the data has {len(self.forget_indices)} "
                f"forget and {len(self.retain_indices)} retain rows; lower batch_size (--batch_size), move "
                "forget_per_batch (--forget_per_batch) so that both kinds fit, or pass drop_last=False")
        self._finish_init(start_step)

    @property
    def steps_per_epoch(self) -> int:
        counts = []
        for per_batch, pool in ((self.forget_per_batch, self.forget_indices),
                                (self.retain_per_batch, self.retain_indices)):
            if per_batch > 0:
                per_step = per_batch * self.world_size
                counts.append(len(pool) // per_step if self.drop_last else math.ceil(len(pool) / per_step))
        return min(counts) if self.drop_last else max(counts)

    def _global_batches(self, generator, first_step):
        forget = self.forget_indices[torch.randperm(len(self.forget_indices), generator=generator)]
        retain = self.retain_indices[torch.randperm(len(self.retain_indices), generator=generator)]
        f, r, world = self.forget_per_batch, self.retain_per_batch, self.world_size
        for step in range(first_step, self.steps_per_epoch):
            f_rows = _cycled(forget, step * f * world, f * world) if f else []
            r_rows = _cycled(retain, step * r * world, r * world) if r else []
            yield [f_rows[k * f:(k + 1) * f] + r_rows[k * r:(k + 1) * r] for k in range(world)]


class ReferenceShuffleBatchSampler(_ShardedBatchSampler):
    """The reference's batches: one seeded permutation of all rows per epoch cut into batches, so the
    forget/retain mix varies per batch. `data` is the number of rows or any sized sequence (the labels).
    drop_last=False pads the last global batch by wrapping around.

    pad_to_world=True counts steps as the reference's ``DistributedSampler`` + ``DataLoader(drop_last=True)``
    do: each rank gets ceil(N / world_size) rows (the permutation padded by wrapping around) and
    ceil(N / world_size) // batch_size batches, which can be one more than N // (world_size * batch_size).
    With one process both counts are N // batch_size."""

    def __init__(self, data, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, start_step: int = 0, pad_to_world: bool = False):
        super().__init__(batch_size, seed, rank, world_size, drop_last)
        self.pad_to_world = bool(pad_to_world)
        self.num_samples = int(data) if _is_int(data) else len(data)
        if self.num_samples < 1:
            raise ValueError("ReferenceShuffleBatchSampler needs at least one row")
        if self.steps_per_epoch == 0:
            raise ValueError(f"a batch larger than the data: {world_size} rank(s) x {batch_size} rows per "
                             f"step, but the data has {self.num_samples} rows; lower batch_size or use "
                             "drop_last=False")
        self._finish_init(start_step)

    @property
    def steps_per_epoch(self) -> int:
        if self.pad_to_world:  # rows per rank first (DistributedSampler pads them up), then batches
            per_rank = math.ceil(self.num_samples / self.world_size)
            return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)
        per_step = self.batch_size * self.world_size
        return self.num_samples // per_step if self.drop_last else math.ceil(self.num_samples / per_step)

    def _global_batches(self, generator, first_step):
        perm = torch.randperm(self.num_samples, generator=generator)
        b, world = self.batch_size, self.world_size
        for step in range(first_step, self.steps_per_epoch):
            rows = _cycled(perm, step * b * world, b * world)
            yield [rows[k * b:(k + 1) * b] for k in range(world)]
