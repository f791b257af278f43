"""Red-team checks of train_loop with the DevicePrefetcher: a batch source that ends before steps_per_epoch is
one clear error (it used to log the epoch's losses as 0.0, skip the non-finite check of the steps since the
last read-back, and write a checkpoint that claims a full epoch); and the one-ahead CUDA path of
DevicePrefetcher (simulated on the CPU with stand-in streams) keeps order, limit and error timing."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import unlearn_fast.train.device_prefetch as device_prefetch
from unlearn_fast.train.checkpoint import load_checkpoint_file
from unlearn_fast.train.device_prefetch import DevicePrefetcher
from unlearn_fast.train.side_stream import SideStream
from unlearn_fast.train.trainer import train_loop
from unlearn_fast.train.unlearn_setup import build_setup

pytestmark = pytest.mark.usefixtures("single_thread")

LR = 1e-3


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([100.0, -100.0, 100.0, -100.0])  # reference labels: forget < 100
    return [(torch.rand(4, 3, 32, 32, generator=g), labels.clone()) for _ in range(n)]


@pytest.mark.parametrize("step_mode", ["fast", "reference"])
def test_a_batch_source_that_ends_early_stops_the_run_and_writes_nothing(make_mae_micro, tmp_path, step_mode):
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", forget_alpha=0.5)
    data = _batches(2)
    with pytest.raises(ValueError, match=r"epoch 0 produced 2 of its 3 batches"):
        train_loop(setup, lambda e: iter(data), 3, epochs=1, lr=LR, progress=False, step_mode=step_mode,
                   output_dir=str(tmp_path), args_dict={})
    assert os.listdir(tmp_path) == []  # no log line of zeros, no checkpoint claiming a full epoch


def test_a_short_later_epoch_keeps_the_earlier_checkpoint(make_mae_micro, tmp_path):
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", forget_alpha=0.5)
    data = {0: _batches(3, 0), 1: _batches(1, 1)}
    with pytest.raises(ValueError, match=r"epoch 1 produced 1 of its 3 batches"):
        train_loop(setup, lambda e: iter(data[e]), 3, epochs=2, lr=LR, progress=False, step_mode="fast",
                   output_dir=str(tmp_path), args_dict={})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0.pth", "checkpoint-0.safetensors", "log.txt"]
    assert load_checkpoint_file(str(tmp_path / "checkpoint-0.pth"))["epoch"] == 0


def test_a_resumed_epoch_counts_the_steps_already_done(make_mae_micro, tmp_path):
    """start_step_in_epoch=2 of 4: the source must give the remaining 2; 1 is short, 2 is a full epoch."""
    data = _batches(2)
    progress = {"epoch_sums": [0.5, 0.25, 0.25], "epoch_steps": 2, "epoch_lr_sum": 2 * LR}
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", forget_alpha=0.5)
    with pytest.raises(ValueError, match=r"epoch 0 produced 3 of its 4 batches"):
        train_loop(setup, lambda e: iter(data[:1]), 4, epochs=1, lr=LR, progress=False, start_step_in_epoch=2,
                   epoch_progress=progress)
    setup = build_setup(make_mae_micro(), "cpu", lr=LR, precision="fp32", forget_alpha=0.5)
    history = train_loop(setup, lambda e: iter(data), 4, epochs=1, lr=LR, progress=False, start_step_in_epoch=2,
                         epoch_progress=progress)
    assert len(history) == 1 and history[0]["train_loss"] > 0.5 / 4  # the resumed sums plus two real steps
    with pytest.raises(ValueError, match="no batches"):  # resumed, but the source gives nothing
        train_loop(setup, lambda e: iter([]), 4, epochs=1, lr=LR, progress=False, start_step_in_epoch=2,
                   epoch_progress=progress)


# ---- the one-ahead (CUDA) path of DevicePrefetcher, with stand-in streams on the CPU ----

class _FakeStream:
    device = None

    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


@pytest.fixture
def one_ahead(monkeypatch):
    """A DevicePrefetcher factory whose CUDA path runs on the CPU; returns (make, log)."""
    log = []
    compute = _FakeStream(log, "compute")
    monkeypatch.setattr(device_prefetch.torch.cuda, "Stream", lambda device=None: _FakeStream(log, "side"))
    monkeypatch.setattr(device_prefetch.torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(device_prefetch.torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(device_prefetch.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append(f"record {s.name}"))

    def make(batches, limit=None):
        p = DevicePrefetcher.__new__(DevicePrefetcher)
        p.device, p.active, p.it, p.left = torch.device("cpu"), True, iter(batches), limit
        p.side, p.ready = SideStream("cpu"), None
        p.side.stream = _FakeStream(log, "side")
        p.ready = p._read_and_copy()  # as __init__ does on a CUDA device
        return p
    return make, log


def _counted(n, reads, fail_at=None, interrupt_at=None):
    for i in range(n):
        reads.append(i)
        if i == fail_at:
            raise OSError(f"cannot read image {i}.png")
        if i == interrupt_at:
            raise KeyboardInterrupt
        yield torch.full((2, 3), float(i)), torch.tensor([i])


def test_one_ahead_keeps_order_reads_one_ahead_and_never_past_the_limit(one_ahead):
    make, log = one_ahead
    reads = []
    p = make(_counted(10, reads), limit=4)
    assert reads == [0]  # the first batch is read (and its copy queued) when the prefetcher is made
    got = []
    for images, labels in p:
        got.append(int(images[0, 0]))
        assert len(reads) == min(len(got) + 1, 4)  # batch k+1 is read while batch k is served
    assert got == [0, 1, 2, 3] and reads == [0, 1, 2, 3]
    assert "compute waits side" in log and "record compute" in log and "side waits compute" in log


def test_one_ahead_reports_a_bad_batch_when_it_is_taken(one_ahead):
    make, _ = one_ahead
    reads = []
    p = make(_counted(5, reads, fail_at=2))
    assert [int(next(p)[0][0, 0]) for _ in range(2)] == [0, 1]  # step 1 still runs after batch 2 failed to read
    with pytest.raises(OSError, match="2.png"):
        next(p)
    with pytest.raises(StopIteration):
        next(p)


def test_one_ahead_does_not_defer_an_interrupt(one_ahead):
    make, _ = one_ahead
    p = make(_counted(5, [], interrupt_at=1))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while reading batch 1 ahead stops at once
        next(p)
    assert list(make(_counted(5, []), limit=0)) == []
