"""Red-team checks of the four-values-per-Philox-call noise (kernels/batch_noise.py) through the op
``ops.sample_batch_noise`` forced onto the Triton kernels (TRITON_INTERPRET=1 on the CPU, see conftest.py):
element counts that are not multiples of 4 and cross the 1024-element program blocks, one element, the
largest seed / step, integer step and seed tensors of any width (taken mod 2^32 / 2^64), every output dtype.

Oracle: the keying documented in the kernel module, restated in Python (``_documented_draws`` of
test_triton_batch_noise.py). Tolerances: uniform exact (integer Philox, one fp32 multiply); normal 2e-5
absolute (log/cos ulps), and the op's normal noise within 1e-6 of clamp(z * std + mean) with the fp64-restated
batch statistics rounded to fp32 (the kernel's fp32 statistics differ from them in the last bits).
"""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("triton")
from tests.kernels.test_triton_batch_noise import _documented_draws, _store_as  # noqa: E402
from unlearn_fast.kernels import philox_standard_normal  # noqa: E402
from unlearn_fast.ops import sample_batch_noise, sample_batch_noise_reference  # noqa: E402

SIZES = (1, 2, 3, 5, 1023, 1025, 2051)  # not multiples of 4; across program blocks of 1024
KEYS = [(0, 0), (2 ** 64 - 1, 2 ** 32 - 1), (123456789012345, 4000000000)]


@pytest.fixture
def triton_op(device, monkeypatch):
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "triton")
    return device


@pytest.mark.parametrize("seed,step", KEYS)
def test_every_size_takes_the_documented_draw_of_each_element(triton_op, seed, step):
    uniform_ref, normal_ref = _documented_draws(seed, step, max(SIZES))
    for n in SIZES:
        x = torch.rand(n, device=triton_op)
        u = sample_batch_noise(x, "uniform", seed=seed, step=step)
        assert torch.equal(u.cpu(), uniform_ref[:n]), n  # element k's value does not depend on n
        z = philox_standard_normal((n,), seed, step, triton_op)
        assert (z.cpu().double() - normal_ref[:n]).abs().max().item() < 2e-5, n
        if n > 1:
            v = x.cpu().double()
            mean, std = v.mean().float(), v.std().float()
            expected = torch.clamp(z.cpu() * std + mean, 0.0, 1.0)
            got = sample_batch_noise(x, "normal", seed=seed, step=step).cpu()
            assert (got - expected).abs().max().item() < 1e-6, n
        c = sample_batch_noise(x, "constant", seed=seed, step=step).cpu()
        assert torch.allclose(c, x.cpu().double().mean().float().expand(n), rtol=1e-6, atol=0), n


def test_one_element_normal_is_nan_like_torch(triton_op):
    x = torch.tensor([0.25], device=triton_op)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about zero degrees of freedom
        assert torch.isnan(sample_batch_noise(x, "normal", seed=1, step=2)).all()
        assert torch.isnan(sample_batch_noise_reference(x.cpu(), "normal", torch.Generator().manual_seed(0))).all()
    assert 0.0 <= sample_batch_noise(x, "uniform", seed=1, step=2).item() < 1.0
    assert sample_batch_noise(x, "constant", seed=1, step=2).item() == 0.25


@pytest.mark.parametrize("seed,step", KEYS[1:])
def test_integer_tensors_of_any_width_name_the_same_stream(triton_op, seed, step):
    x = torch.rand(2, 3, 5, 7, device=triton_op)  # 210 elements
    a = sample_batch_noise(x, seed=seed, step=step)
    assert torch.equal(a, sample_batch_noise(x, seed=seed, step=step))  # reproducible
    as_i64 = lambda v, bits: v - 2 ** bits if v >= 2 ** (bits - 1) else v  # noqa: E731  (two's complement)
    seed_t = torch.tensor([as_i64(seed, 64)], dtype=torch.int64, device=triton_op)
    for step_t in (torch.tensor(step, dtype=torch.int64), torch.tensor([as_i64(step, 32)], dtype=torch.int32),
                   torch.tensor([step + 5 * 2 ** 32], dtype=torch.int64)):  # mod 2^32
        assert torch.equal(a, sample_batch_noise(x, seed=seed_t, step=step_t.to(triton_op)))
    assert not torch.equal(a, sample_batch_noise(x, seed=seed, step=(step + 1) % 2 ** 32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "uniform", "constant"])
def test_output_dtype_and_range(triton_op, dtype, kind):
    x = torch.rand(3, 5, 9, device=triton_op).to(dtype)  # 135 elements
    out = sample_batch_noise(x, kind, seed=7, step=9)
    assert out.dtype == dtype and out.shape == x.shape and bool(torch.isfinite(out).all())
    assert bool(((out >= 0) & (out <= 1)).all())
    if kind == "uniform":
        assert bool((out < 1).all())
        below_one = {torch.float16: 1 - 2 ** -11, torch.bfloat16: 1 - 2 ** -8}.get(dtype, 1 - 2 ** -24)
        expected = _documented_draws(7, 9, 135)[0].clamp(max=below_one).reshape(3, 5, 9)  # fp32, capped below 1
        assert torch.equal(out.cpu(), _store_as(expected, dtype, triton_op).cpu())


def test_a_non_contiguous_batch_is_drawn_in_its_logical_order(triton_op):
    x = torch.rand(4, 6, 5, device=triton_op).transpose(0, 2)  # [5, 6, 4], not contiguous
    u = sample_batch_noise(x, "uniform", seed=3, step=4)
    assert u.shape == x.shape and torch.equal(u.cpu().reshape(-1), _documented_draws(3, 4, x.numel())[0])
