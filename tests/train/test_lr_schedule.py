"""lr schedule (REFERENCE.md §1.5): lr = blr·eff/256, linear warmup from 0, then a half-cosine to min_lr."""
from __future__ import annotations

import math

import pytest
import torch

from unlearn_fast.train.lr_schedule import base_lr, effective_batch_size, lr_at, set_lr


def test_effective_batch_and_base_lr():
    assert effective_batch_size(32, 1, 4) == 128
    assert effective_batch_size(16, 3, 2) == 96
    assert base_lr(None, 1e-4, 128) == pytest.approx(5e-5, rel=1e-12)  # the README's 4 GPUs
    assert base_lr(None, 1.5e-4, 4096) == pytest.approx(2.4e-3, rel=1e-12)
    assert base_lr(3e-4, 1e-4, 128) == 3e-4  # an explicit --lr wins
    assert isinstance(base_lr("0.001", 1e-4, 128), float)


@pytest.mark.parametrize("epoch,expected", [
    (0.0, 0.0),                     # the first update runs at lr 0
    (1.0, 0.2e-3),
    (2.5, 0.5e-3),                  # mid warmup
    (5.0, 1e-3),                    # end of warmup = lr
    (5.5, 0.5e-3),                  # cosine midpoint (min_lr 0)
    (5.25, 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.25))),
    (6.0, 0.0),                     # end = min_lr
])
def test_reference_defaults_at_known_points(epoch, expected):
    # defaults: epochs 6, warmup 5, min_lr 0
    assert lr_at(epoch, 1e-3, 0.0, 5, 6) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_min_lr_and_monotonicity():
    lr, min_lr = 1e-3, 1e-5
    assert lr_at(3.0, lr, min_lr, 2, 4) == pytest.approx(min_lr + (lr - min_lr) * 0.5, rel=1e-12)
    assert lr_at(4.0, lr, min_lr, 2, 4) == pytest.approx(min_lr, rel=1e-12)
    assert lr_at(0.0, lr, min_lr, 2, 4) == 0.0  # warmup ramps from 0, not from min_lr (as the reference)
    pts = [i / 10 for i in range(41)]
    vals = [lr_at(e, lr, min_lr, 2, 4) for e in pts]
    assert all(a <= b for a, b in zip(vals[:20], vals[1:21]))    # rising during warmup
    assert all(a >= b for a, b in zip(vals[20:], vals[21:]))     # falling after


def test_no_warmup_and_degenerate_schedules():
    assert lr_at(0.0, 1e-3, 0.0, 0, 3) == 1e-3       # no warmup: start at lr
    assert lr_at(1.5, 1e-3, 0.0, 0, 3) == pytest.approx(0.5e-3)
    assert lr_at(7.0, 1e-3, 0.0, 10, 10) == pytest.approx(0.7e-3)  # all warmup
    assert lr_at(10.0, 1e-3, 0.0, 10, 10) == 1e-3    # epochs <= warmup: no division by zero


def test_per_iteration_fraction():
    # the trainer passes step / steps_per_epoch + epoch: step 3 of 8 in epoch 1, warmup 2
    assert lr_at(3 / 8 + 1, 8e-4, 0.0, 2, 6) == pytest.approx(8e-4 * (11 / 8) / 2, rel=1e-12)


def test_set_lr_float_and_tensor_groups():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    t = torch.tensor(1.0)
    opt.param_groups[0]["lr"] = t
    set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] is t and t.item() == 0.5  # in place: a captured graph stays valid
    assert opt.param_groups[1]["lr"] == 0.5
