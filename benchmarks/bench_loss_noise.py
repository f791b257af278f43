"""Loss + noise: the fused ops against their eager PyTorch twins (forward + backward for the loss).

    pytest benchmarks/bench_loss_noise.py -k cpu
    pytest benchmarks/bench_loss_noise.py -k gpu

``extra_info`` carries the ratio to the eager twin (``speedup_vs_reference``) and, on the GPU, the achieved
bandwidth counting the fewest bytes the op must move (fused loss: read latent + one target row, write the
gradient in forward; read it and write the latent gradient in backward = 20 B per fp32 element; noise:
read the images once for the moments, write the noise once = 8 B per element).
"""
from __future__ import annotations

import pytest
import torch
from step_harness import median_seconds, sync

from unlearn_fast.ops import (retain_forget_l2_loss, retain_forget_l2_loss_reference, sample_batch_noise,
                              sample_batch_noise_reference)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LOSS_SHAPES = {"cpu": (16, 65, 256), "gpu": (64, 129, 768)}
NOISE_SHAPES = {"cpu": (16, 3, 64, 64), "gpu": (64, 3, 256, 256)}


def _loss_fns(dev):
    shape = LOSS_SHAPES["gpu" if dev == "cuda" else "cpu"]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(shape, device=dev, generator=g).requires_grad_(True)
    guide, ng = torch.randn(shape, device=dev, generator=g), torch.randn(shape, device=dev, generator=g)
    f = torch.arange(shape[0], device=dev) % 2 == 0

    def run(op):
        def go():
            r, fl = op(x, guide, ng, f)
            (r + 0.2 * fl).backward()
            x.grad = None
        return go
    return run(retain_forget_l2_loss), run(retain_forget_l2_loss_reference), x.numel() * 20


def _noise_fns(dev):
    shape = NOISE_SHAPES["gpu" if dev == "cuda" else "cpu"]
    x = torch.rand(shape, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    fused = lambda: sample_batch_noise(x, seed=0, step=1)  # noqa: E731
    eager = lambda: sample_batch_noise_reference(x, "normal", gen)  # noqa: E731
    return fused, eager, x.numel() * 8


def _bench(benchmark, dev, which):
    fused, eager, nbytes = (_loss_fns if which == "loss" else _noise_fns)(dev)
    reps = 50 if dev == "cuda" else 10
    ref = median_seconds(eager, dev, reps, warmup=3)

    def one():
        fused()
        sync(dev)
    benchmark.pedantic(one, rounds=reps, iterations=1, warmup_rounds=3)
    med = benchmark.stats.stats.median
    benchmark.extra_info.update({"op": which, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                                 "eager_s": ref, "fused_s": med, "speedup_vs_reference": ref / med,
                                 "fused_GB_per_s": nbytes / med / 1e9, "min_bytes": nbytes})


def test_cpu_loss_fused_vs_eager(benchmark):
    _bench(benchmark, "cpu", "loss")


def test_cpu_noise_fused_vs_eager(benchmark):
    _bench(benchmark, "cpu", "noise")


@needs_gpu
def test_gpu_loss_fused_vs_eager(benchmark):
    _bench(benchmark, "cuda", "loss")


@needs_gpu
def test_gpu_noise_fused_vs_eager(benchmark):
    _bench(benchmark, "cuda", "noise")
