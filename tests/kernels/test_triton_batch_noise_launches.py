"""unlearn_fast/kernels/batch_noise.py: the fp64 moments combine kernel, seed/step/mean/std passed as kernel
arguments (python numbers) vs read from device memory (tensors), and sample_batch_noise on the Triton backend.

Runs on the CPU under TRITON_INTERPRET=1 (see conftest.py; Triton's interpreter runs the fp64 combine in numpy
float64), compiled on a GPU when there is one.

Tolerances:
- combine vs torch's fp64 Chan combine of the same per-block (mean, M2) partials: equal after rounding to fp32
  (both sums are fp64 with ~1e-16 relative error; they could differ in fp32 only if a value fell within that of
  an fp32 rounding boundary, ~2^-29 odds, and the fixed inputs here do not). vs torch.mean / torch.std of the
  fp64 input: mean rtol 1e-6, std rtol 1e-5 (fp32 block partials), as test_triton_batch_noise.py.
- python-int vs tensor seed/step, python-number vs tensor mean/std: bit for bit (the same 64-bit key and
  counter, the same fp32 values).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
from unlearn_fast.kernels import batch_mean_std, philox_batch_noise, philox_standard_normal  # noqa: E402
from unlearn_fast.kernels.batch_noise import _block_moments, _combine_moments  # noqa: E402

MOMENT_BLOCK = 4096  # elements per block of the moments kernel (the count of every block but the last)


def _torch_chan_combine(partial: torch.Tensor, numel: int):
    """The parallel combine of (mean_b, M2_b) in fp64 by torch (what the op did before the combine kernel)."""
    mean_b, m2_b = partial.double().cpu().unbind(0)
    n_blocks = mean_b.shape[0]
    count = torch.full((n_blocks,), float(MOMENT_BLOCK), dtype=torch.float64)
    count[-1] = numel - (n_blocks - 1) * MOMENT_BLOCK
    mean = (count * mean_b).sum() / numel
    m2 = m2_b.sum() + (count * (mean_b - mean).square()).sum()
    std = (m2 / (numel - 1)).sqrt() if numel > 1 else m2 * float("nan")
    return mean.float(), std.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("numel", [1, 2, 4095, 4096, 4097, 3 * 4096 + 5, 2 * 3 * 64 * 65])
def test_combine_matches_torch_fp64_combine(device, numel, dtype):
    g = torch.Generator().manual_seed(numel)
    x = (torch.rand(numel, generator=g) * 3 - 0.5 + 100.0 * (numel % 2)).to(dtype).to(device)
    partial = _block_moments(x)
    mean, std = torch.empty((), device=device), torch.empty((), device=device)
    _combine_moments(partial, numel, mean, std)
    ref_mean, ref_std = _torch_chan_combine(partial, numel)
    assert torch.equal(mean.cpu(), ref_mean)
    assert torch.equal(std.cpu(), ref_std) or (numel == 1 and math.isnan(std.item()))
    m, s = batch_mean_std(x)  # the public entry point: the same two launches
    assert torch.equal(m, mean) and (torch.equal(s, std) or numel == 1)
    assert abs(m.item() - x.double().mean().item()) <= 1e-6 * abs(x.double().mean().item())
    if numel > 1:
        assert abs(s.item() - x.double().std().item()) <= 1e-5 * x.double().std().item()


@pytest.mark.parametrize("rblock", [1, 2, 4])
def test_combine_loops_over_many_blocks(device, rblock):
    # 7 blocks with 1/2/4 lanes: several loop steps and a ragged last one (the default 1024 lanes need 4M elements)
    numel = 6 * MOMENT_BLOCK + 123
    g = torch.Generator().manual_seed(rblock)
    x = (1000.0 + 0.03 * torch.randn(numel, generator=g)).to(device)  # a large offset: Chan's form matters
    partial = _block_moments(x)
    mean, std = torch.empty((), device=device), torch.empty((), device=device)
    _combine_moments(partial, numel, mean, std, rblock=rblock)
    ref_mean, ref_std = _torch_chan_combine(partial, numel)
    assert torch.equal(mean.cpu(), ref_mean) and torch.equal(std.cpu(), ref_std)


SEEDS = [0, 1, 7, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 5, 2 ** 63, 2 ** 64 - 1]
STEPS = [0, 1, 16, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]


def _as_int64_tensor(v: int, device) -> torch.Tensor:
    return torch.tensor(v - 2 ** 64 if v >= 2 ** 63 else v, dtype=torch.int64, device=device)


@pytest.mark.parametrize("kind", ["normal", "uniform", "standard"])
def test_int_and_tensor_seed_step_give_the_same_draws(device, kind):
    # python ints travel as int32 words in kernel arguments, tensors are loaded: the same key and counter
    x = torch.rand(3, 50, device=device)
    for seed in SEEDS:
        for step in STEPS:
            if kind == "standard":
                draw = lambda s, t: philox_standard_normal((3, 50), s, t, device)  # noqa: E731
            else:
                draw = lambda s, t: philox_batch_noise(x, s, t, kind=kind)  # noqa: E731
            by_int = draw(seed, step)
            assert torch.equal(by_int, draw(_as_int64_tensor(seed, device), _as_int64_tensor(step, device)))
            assert torch.equal(by_int, draw(seed, _as_int64_tensor(step, device)))
            if step < 2 ** 31:  # an int32 step tensor reads the same
                assert torch.equal(by_int, draw(_as_int64_tensor(seed, device),
                                                torch.tensor([step], dtype=torch.int32, device=device)))


def test_number_and_tensor_mean_std_give_the_same_noise(device):
    x = torch.rand(4, 3, 11, 13, device=device)
    z = philox_standard_normal(x.shape, 5, 9, device)
    twin = torch.clamp(z * 0.7 + 0.1, -0.5, 0.8)  # fp32, no FMA on either side
    by_number = philox_batch_noise(x, 5, 9, mean=0.1, std=0.7, low=-0.5, high=0.8)
    assert torch.equal(by_number, twin)
    for dtype in (torch.float32, torch.float64):  # converted to fp32 in the kernel, as torch's .float() rounds
        m, s = torch.tensor(0.1, dtype=dtype, device=device), torch.tensor([0.7], dtype=dtype, device=device)
        assert torch.equal(philox_batch_noise(x, 5, 9, mean=m, std=s, low=-0.5, high=0.8), twin)
    mixed = philox_batch_noise(x, 5, 9, std=0.7)  # batch mean from the kernels, std a number
    mean, _ = batch_mean_std(x)
    assert torch.equal(mixed, torch.clamp(z * 0.7 + mean, 0.0, 1.0))
    const = philox_batch_noise(x, 5, 9, kind="constant", mean=torch.tensor(0.25, device=device))
    assert torch.equal(const, torch.full_like(x, 0.25))
    with pytest.raises(ValueError, match="mean must be a real number"):
        philox_batch_noise(x, 5, 9, mean=torch.tensor(True, device=device))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", ["normal", "uniform", "constant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_op_on_triton_is_the_kernel(device, monkeypatch, kind, dtype):
    from unlearn_fast.ops import batch_mean_std as op_batch_mean_std
    from unlearn_fast.ops import sample_batch_noise
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    images = torch.rand(3, 3, 9, 7, device=device).to(dtype)
    out = sample_batch_noise(images, kind, seed=11, step=torch.tensor(4, device=device))
    assert out.dtype == dtype and out.shape == images.shape
    assert torch.equal(out, philox_batch_noise(images, 11, 4, kind=kind))
    assert torch.equal(out, sample_batch_noise(images, kind, seed=11, step=4))
    mean, std = op_batch_mean_std(images)
    k_mean, k_std = batch_mean_std(images)
    assert torch.equal(mean, k_mean) and torch.equal(std, k_std)
