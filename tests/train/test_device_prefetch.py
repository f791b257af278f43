"""DevicePrefetcher: batches pass through unchanged on the CPU, never more than ``limit`` are read, and a bad
batch is reported when it is taken (the step before it still runs); on a GPU (skipped without one; run by
benchmarks/gpu_check.sh) the copies made on the side stream equal the host batches, in order."""
from __future__ import annotations

import pytest
import torch

from unlearn_fast.train.device_prefetch import DevicePrefetcher


def _batches(n, seen=None):
    for i in range(n):
        if seen is not None:
            seen.append(i)
        yield torch.full((2, 3), float(i)), torch.tensor([i, -i])


def test_cpu_passes_batches_through_and_respects_the_limit():
    seen = []
    out = list(DevicePrefetcher(_batches(10, seen), "cpu", limit=4))
    assert [int(x[0, 0]) for x, _ in out] == [0, 1, 2, 3] and seen == [0, 1, 2, 3]
    assert all(torch.equal(lab, torch.tensor([i, -i])) for i, (_, lab) in enumerate(out))
    assert len(list(DevicePrefetcher(_batches(3), "cpu"))) == 3
    assert list(DevicePrefetcher(_batches(3), "cpu", limit=0)) == []


def test_disabled_prefetcher_is_a_passthrough_on_any_device_type():
    p = DevicePrefetcher(_batches(2), "cpu", enabled=False)
    assert not p.active and len(list(p)) == 2


def test_an_error_in_a_later_batch_surfaces_when_that_batch_is_taken():
    def bad():
        yield torch.zeros(1), torch.zeros(1)
        raise OSError("cannot read image x.png")
    p = DevicePrefetcher(bad(), "cpu")
    next(p)  # the good batch is served
    with pytest.raises(OSError, match="x.png"):
        next(p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_copies_equal_the_host_batches_in_order():
    host = [(torch.randn(8, 3, 64, 64).pin_memory(), torch.tensor([i])) for i in range(6)]
    seen = []
    p = DevicePrefetcher(iter(host), "cuda", limit=5)
    for (images, labels), (h_images, h_labels) in zip(p, host):
        assert images.is_cuda and labels.device.type == "cpu"
        images.mul_(1.0)  # work on the compute stream between takes
        seen.append(torch.equal(images.cpu(), h_images) and torch.equal(labels, h_labels))
    assert seen == [True] * 5


def test_trainer_prefetches_only_off_the_reference_step(make_mae_micro, monkeypatch):
    import unlearn_fast.train.trainer as trainer_mod
    from unlearn_fast.train.unlearn_setup import build_setup
    made = []
    real = trainer_mod.DevicePrefetcher

    def spy(batches, device, limit=None, enabled=True):
        made.append((enabled, limit))
        return real(batches, device, limit=limit, enabled=enabled)
    monkeypatch.setattr(trainer_mod, "DevicePrefetcher", spy)
    setup = build_setup(make_mae_micro(), "cpu", lr=1e-3, precision="fp32", forget_alpha=0.5)
    batches = [(torch.rand(2, 3, 32, 32), torch.tensor([100.0, -100.0])) for _ in range(3)]
    for mode in ("fast", "reference"):
        trainer_mod.train_loop(setup, lambda e: iter(batches), 3, epochs=1, lr=1e-3, progress=False, step_mode=mode)
    assert made == [(True, 3), (False, 3)]
